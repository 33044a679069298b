"""Where a training step leaves the GPU idle: kernel-to-kernel gaps of one anchor variant, with the host op behind each.

    PYTHONPATH=. python bench/trace_gaps.py [variant ...]     # default: lowbit_O1_compile bf16_compile (d4096 anchor)

Why: a step can be slower than the sum of its kernels when the GPU waits for Python (launch-bound stretches) or for a
host sync. The e2e table cannot tell those apart from slow kernels; this can. For each variant it profiles two steps
(torch.profiler, after warm-up), takes the GPU kernels/memcpys/memsets in stream order, and reports per step: busy
time, span, idle total, and the largest gaps, each with the kernel before it and the host op (innermost
``aten::``/``lowbit_amp::``/Python-level record) that launched the kernel after it. Writes
``$OUT/trace_<variant>.json.gz`` (the Chrome trace, for Perfetto) and ``$OUT/trace_gaps.json``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_all import profiled_steps  # noqa: E402  (the anchor variants, built exactly as the e2e benchmark does)

OUT = os.environ.get("OUT") or os.path.join(os.getcwd(), "out")
ANCHOR = dict(dim=4096, heads=32, ffn=14336, layers=2, batch=2, seq=4096)
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def trace(variant: str) -> dict:
    prof = profiled_steps(variant, **ANCHOR, steps=2)
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "trace.json")
    prof.export_chrome_trace(path)
    os.makedirs(OUT, exist_ok=True)
    with open(path, "rb") as src, gzip.open(os.path.join(OUT, f"trace_{variant}.json.gz"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    with open(path) as handle:
        events = json.load(handle)["traceEvents"]
    shutil.rmtree(tmp)
    return analyse(variant, events)


def analyse(variant: str, events: list[dict], steps: int = 2) -> dict:
    """Gaps between consecutive GPU events over the whole profiled window (``steps`` steps; per-step figures are
    averages). The window starts right after a synchronisation (as the e2e benchmark's, every 4 steps), from an idle
    GPU; the first kernel is the reference point. Each gap is attributed to the innermost host op (any thread) that launched the kernel after
    it — the op the GPU was waiting for."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and e.get("ph") == "X"), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host_ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")
                       and e.get("ph") == "X"), key=lambda e: e["ts"])
    if not gpu:
        return {"variant": variant, "error": "no GPU events in the trace"}
    busy = sum(k["dur"] for k in gpu)
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    gaps = []
    for before, after in zip(gpu, gpu[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > 5.0:
            launch = launches.get(after["args"].get("correlation"))
            owner = innermost(host_ops, launch["ts"], launch.get("tid")) if launch else "?"
            gaps.append({"gap_us": round(gap, 1), "at_us": round(after["ts"] - gpu[0]["ts"]),
                         "before": before["name"][:80], "after": after["name"][:80], "launched_by": owner})
    gaps.sort(key=lambda g: -g["gap_us"])
    host_steps = [e["dur"] for e in events if e.get("name") == "## step ##" and e.get("cat") == "user_annotation"]
    report = {"variant": variant, "steps": steps, "busy_ms_per_step": round(busy / 1000 / steps, 3),
              "span_ms_per_step": round(span / 1000 / steps, 3),
              "idle_ms_per_step": round((span - busy) / 1000 / steps, 3), "gpu_events": len(gpu),
              "host_step_ms": [round(d / 1000, 3) for d in host_steps], "largest_gaps": gaps[:25]}
    by_owner: dict[str, float] = {}
    for g in gaps:
        by_owner[g["launched_by"]] = by_owner.get(g["launched_by"], 0.0) + g["gap_us"]
    report["gap_us_by_launching_op"] = {k: round(v, 1) for k, v in sorted(by_owner.items(), key=lambda kv: -kv[1])[:15]}
    return report


def innermost(host_ops: list[dict], ts: float, tid: object) -> str:
    """Name of the innermost host op of thread ``tid`` whose interval contains ``ts`` (the one with the latest start)."""
    best = None
    for op in host_ops:
        if op["ts"] > ts:
            break
        if op["ts"] + op["dur"] >= ts and op.get("tid") == tid and op.get("name") != "## step ##":
            best = op
    return best["name"][:90] if best else "(none)"


def main(argv: list[str]) -> None:
    variants = argv or ["lowbit_O1_compile", "bf16_compile"]
    reports = [trace(v) for v in variants]
    for r in reports:
        print(f"\n== {r['variant']} (per step): GPU busy {r.get('busy_ms_per_step')} ms, span "
              f"{r.get('span_ms_per_step')} ms, idle {r.get('idle_ms_per_step')} ms ({r.get('gpu_events')} GPU events; "
              f"host step ms under the profiler {r.get('host_step_ms')})")
        for g in r.get("largest_gaps", [])[:12]:
            print(f"  {g['gap_us']:8.1f} us @{g['at_us']:>6} after {g['before'][:36]:36s} -> {g['after'][:36]:36s} "
                  f"by {g['launched_by']}")
        print("  idle by launching op:", json.dumps(r.get("gap_us_by_launching_op", {}))[:600])
    with open(os.path.join(OUT, "trace_gaps.json"), "w") as handle:
        json.dump(reports, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
