"""What is live at the peak of a training step, grouped by where it was allocated (CUDA only).

Why: issue 7's peak-memory target is missed by ~0.6 GiB on the 4096-wide anchor and the held/saved columns of
bench/bench_coat.py do not say which tensors make the rest of the peak (backward transients, casts, the loss). This
records the CUDA caching allocator's history over a few steady-state steps of one variant, replays the alloc/free
events to find the moment of the largest allocated total, and prints the tensors alive then, grouped by the innermost
frame inside lowbit_amp/bench (or torch's autograd when no such frame exists), largest first.

    PYTHONPATH=. python bench/memory_peak_breakdown.py --variant O3e+fp8act+nocache [--top 25] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_all import anchor_step  # noqa: E402
from bench_coat import ANCHOR, _build  # noqa: E402

MiB = 2**20


def site(frames: list[dict]) -> str:
    """The allocation's innermost frame in this repository (file:line function), else the innermost Python frame."""
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    for f in python:
        name = f["filename"]
        if "lowbit_amp" in name or "/bench/" in name:
            return f"{name.split('/')[-2]}/{name.split('/')[-1]}:{f['line']} {f['name']}"
    if python:
        f = python[0]
        return f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
    return "(no python frame: autograd engine / C++)"


def peak_live(snapshot: dict, device: int = 0) -> tuple[int, dict[int, tuple[int, str]], int]:
    """Replay the trace: (baseline bytes before the trace, live allocations at the peak, peak total)."""
    trace = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    # Blocks allocated before recording started appear only in the segments; count them as a constant baseline.
    traced_addrs = {e["addr"] for e in trace if e["action"] == "alloc"}
    baseline = sum(b["size"] for seg in snapshot["segments"] if seg["device"] == device
                   for b in seg["blocks"] if b["state"] == "active_allocated" and b["address"] not in traced_addrs)
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], site(e.get("frames", [])))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] in ("free_requested", "free"):
            item = live.pop(e["addr"], None)
            if item is not None:
                total -= item[0]
    return baseline, at_peak, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="O3e+fp8act+nocache")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", default=None)
    parser.add_argument("--fused-encode", action="store_true",
                        help="encode FP8 weight gradients with the fused cast kernel "
                             "(lowbit_amp.grads.fp8_grad.FUSED_ENCODE)")
    args = parser.parse_args()
    if args.fused_encode:
        import lowbit_amp.grads.fp8_grad as fp8_grad

        fp8_grad.FUSED_ENCODE = True
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model, opt = _build(args.variant, ANCHOR, dev)
    x = torch.randn(ANCHOR["batch"], ANCHOR["seq"], ANCHOR["dim"], device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        anchor_step(model, opt, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=500000, stacks="python")
    for _ in range(args.steps):
        anchor_step(model, opt, x)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    baseline, at_peak, traced_peak = peak_live(snapshot)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for size, where in at_peak.values():
        groups[where][0] += size
        groups[where][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    tag = " (fused encode)" if args.fused_encode else ""
    print(f"variant {args.variant}{tag}: max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB; "
          f"replayed peak {(baseline + traced_peak) / 2**30:.3f} GiB = held before the traced steps "
          f"{baseline / 2**30:.3f} + allocated during them {traced_peak / 2**30:.3f}")
    print(f"{'MiB':>9} {'n':>4}  allocation site (live at the peak)")
    for where, (size, n) in rows[:args.top]:
        print(f"{size / MiB:9.1f} {n:4d}  {where}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variant": args.variant, "max_allocated": torch.cuda.max_memory_allocated(),
                       "baseline": baseline, "traced_peak": traced_peak,
                       "groups": [{"site": w, "bytes": s, "count": n} for w, (s, n) in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
