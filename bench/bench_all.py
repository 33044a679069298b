"""lowbit_amp speed benchmark: casts, per-shape linear layers and the anchor training workloads, in one process.

Usage (on a CUDA machine, from the repo root):
    PYTHONPATH=. python bench/bench_all.py [cast] [linear] [e2e_big] [e2e_small] [profile] [profile_compile]
    (no args: all but the profiles)

Every section prints a table and appends JSON lines (GPU, versions, date, git commit) to ``$OUT/bench.jsonl``
(``$OUT`` defaults to ./out). Timings: medians of CUDA-event measurements (``triton.testing.do_bench`` for kernels and
layers; the end-to-end steps use the same protocol as shared/anchors/anchor_gpu.py: 3 warm-up steps, then the median of
5 runs of 4 steps). Variants run side by side in this one process so their ratios share clocks and thermals.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import warnings
import time

import torch
import torch.nn as nn

from lowbit_amp.models.llama_block import LlamaBlock
from rounds import summarize  # bench/rounds.py: this script's directory is on sys.path when it runs

OUT = os.environ.get("OUT") or os.path.join(os.getcwd(), "out")
DEV = "cuda"


def _git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict:
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": _git_commit()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    return info


META: dict = {}


def emit(rec: dict) -> None:
    os.makedirs(OUT, exist_ok=True)
    line = json.dumps({**META, **rec})
    with open(os.path.join(OUT, "bench.jsonl"), "a") as f:
        f.write(line + "\n")


def ms(fn, grad_to_none=None) -> float:  # type: ignore[no-untyped-def]
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


# --------------------------------------------------------------------------------------------------------- casts
def _copy_bandwidth_tbps() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (the memory-bound floor's denominator)."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / ms(lambda: dst.copy_(src)) / 1e9


def bench_cast() -> None:
    """Fused Triton cast vs the eager reference (and vs Inductor's fusion of it), with the memory-bound floor."""
    import copy

    from lowbit_amp.config import ScalingConfig
    from lowbit_amp.kernels.fp8_cast import fused_quantize
    from lowbit_amp.quant.operand import quantize_operand
    from lowbit_amp.scaling.state import ScalingState

    bw = _copy_bandwidth_tbps()
    print(f"\n== casts (device copy bandwidth {bw:.2f} TB/s) ==")
    print(f"{'shape':>14} {'mode':>13} {'ref eager':>10} {'compiled':>9} {'fused':>8} {'speedup':>8} {'floor':>7}")
    for rows, cols in [(16384, 4096), (8192, 14336), (8192, 1024), (4096, 4096)]:
        x = torch.randn(rows, cols, device=DEV, dtype=torch.bfloat16)
        with_compiled = (rows, cols) == (16384, 4096)  # Inductor's fusion, once (each compile costs seconds)
        for mode in ("current", "delayed_warm"):
            state = ScalingState(ScalingConfig(algo="current" if mode == "current" else "delayed"), "e4m3").to(DEV)
            if mode == "delayed_warm":
                state.scale.fill_(10.0)
                state._warm = True
            ref_state = copy.deepcopy(state)
            ref_state._warm = state._warm

            def ref() -> tuple[torch.Tensor, torch.Tensor]:  # returns its outputs so Inductor cannot drop them
                lp, _ = quantize_operand(x, ref_state)
                return lp, lp.t().contiguous()

            t_ref = ms(ref)
            t_comp = ms(torch.compile(ref)) if with_compiled else None
            t_fused = ms(lambda: fused_quantize(x, state, True))
            n = rows * cols
            floor_bytes = n * (2 + 1 + 1) + (2 * n if mode == "current" else 0)  # read x (twice if current), write lp, lpᵀ
            floor = floor_bytes / bw / 1e9
            comp = f"{t_comp:9.3f}" if t_comp is not None else f"{'-':>9}"
            print(f"{rows}x{cols:>6} {mode:>13} {t_ref:10.3f} {comp} {t_fused:8.3f} {t_ref / t_fused:7.1f}x {floor:7.3f}")
            emit({"section": "cast", "shape": [rows, cols], "mode": mode, "ref_eager_ms": round(t_ref, 4),
                  "ref_compiled_ms": round(t_comp, 4) if t_comp is not None else None, "fused_ms": round(t_fused, 4), "floor_ms": round(floor, 4),
                  "copy_TBps": round(bw, 3)})
    # Host-side cost per launch (what eager mode pays per cast on the CPU, independent of size).
    small = torch.randn(256, 256, device=DEV, dtype=torch.bfloat16)
    state = ScalingState(ScalingConfig(), "e4m3").to(DEV)
    state.scale.fill_(10.0)
    state._warm = True
    for _ in range(20):
        fused_quantize(small, state, True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(1000):
        fused_quantize(small, state, True)
    host_us = (time.perf_counter() - t0) * 1000
    torch.cuda.synchronize()
    print(f"host time per fused cast call (delayed, warm): {host_us:.1f} us")
    emit({"section": "cast_host_overhead", "host_us_per_call": round(host_us, 2)})
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fused_quantize(small, state, True)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


# --------------------------------------------------------------------------------------------------------- linear
LINEAR_SHAPES = [  # (M tokens, K in, N out): the two anchor workloads' layers, plus smaller ones for the policy
    (8192, 4096, 12288), (8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096),
    (8192, 1024, 3072), (8192, 1024, 1024), (8192, 1024, 4096), (8192, 4096, 1024),
    (8192, 2048, 2048), (8192, 768, 768), (8192, 512, 512), (2048, 1024, 1024), (2048, 4096, 4096),
]


def _linear_times(layer: nn.Module, x: torch.Tensor, reset) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    g = torch.randn(x.shape[0], layer.out_features, device=DEV, dtype=x.dtype)
    params = [x, layer.weight]

    def fwd() -> None:
        reset()
        layer(x)

    y = layer(x)

    def bwd() -> None:
        y.backward(g, retain_graph=True)

    def both() -> None:
        reset()
        layer(x).backward(g)

    return ms(fwd, params), ms(bwd, params), ms(both, params)


def bench_linear() -> None:
    """bf16 nn.Linear vs LowBitLinear (O1: delayed input/grad scaling, current weight scaling, weight cast every call
    as in one micro-batch per optimizer step). ``LINEAR_LEVEL=int8``: the INT8 preset's layer instead (the shape
    policy's INT8 threshold)."""
    from lowbit_amp import resolve_config
    from lowbit_amp.nn.linear import LowBitLinear
    from lowbit_amp.scaling.manager import ScalingManager

    level = os.environ.get("LINEAR_LEVEL", "O1")
    linear_cfg = resolve_config(level).linear
    print(f"\n== linear layer, bf16 vs lowbit {level} (ms; ratio = bf16 / low-bit) ==")
    results: list[tuple[int, int, float]] = []
    print(f"{'M x K x N':>20} {'bf16 fwd':>9} {'bwd':>7} {'both':>7} | {'low fwd':>8} {'bwd':>7} {'both':>7} | "
          f"{'fwd x':>6} {'bwd x':>6} {'both x':>6}")
    for m, k, n in LINEAR_SHAPES:
        torch.manual_seed(0)
        ref = nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        t_bf = _linear_times(ref, x, lambda: None)
        low = LowBitLinear.from_linear(ref, linear_cfg)
        manager = ScalingManager(low)
        low(x).backward(torch.randn(m, n, device=DEV, dtype=torch.bfloat16))
        manager.update()  # warm: delayed scaling reads its scale from the history from now on

        def reset() -> None:
            low._weight_cache = None

        t_lb = _linear_times(low, x, reset)
        r = [a / b for a, b in zip(t_bf, t_lb)]
        print(f"{m:>6}x{k:>5}x{n:>6} {t_bf[0]:9.3f} {t_bf[1]:7.3f} {t_bf[2]:7.3f} | {t_lb[0]:8.3f} {t_lb[1]:7.3f} "
              f"{t_lb[2]:7.3f} | {r[0]:6.2f} {r[1]:6.2f} {r[2]:6.2f}")
        emit({"section": "linear", "level": level, "M": m, "K": k, "N": n, "bf16_ms": [round(t, 4) for t in t_bf],
              "fp8_ms": [round(t, 4) for t in t_lb], "speedup_fwd_bwd_both": [round(v, 3) for v in r]})
        results.append((m, k * n, r[2]))
    # The shape policy's threshold: the smallest K*N (at 8192 tokens) from which every measured layer gains.
    at_8k = sorted((kn, both) for m, kn, both in results if m == 8192)
    losing = [kn for kn, both in at_8k if both < 1.0]
    threshold = next((kn for kn, _ in at_8k if not losing or kn > max(losing)), None)
    print(f"shape policy: smallest K*N from which every measured 8192-token layer gains: {threshold}")
    emit({"section": "linear_policy", "level": level, "min_gemm_size_suggested": threshold})


# --------------------------------------------------------------------------------------------------------- e2e
Block = LlamaBlock  # the anchor's block (shared/anchors/anchor_gpu.py), one definition in the package


def _make_variant(name: str, dim: int, heads: int, ffn: int, layers: int):  # type: ignore[no-untyped-def]
    model = nn.Sequential(*[Block(dim, heads, ffn) for _ in range(layers)]).to(DEV, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    note = ""
    if name.startswith("lowbit"):
        import lowbit_amp as amp

        # "lowbit_O1_all_*": the shape-aware policy switched off (every aligned linear in FP8), to show what it saves.
        overrides = {"modules": {"min_gemm_size": 0}} if "_all_" in name else {}
        if "_min50m_" in name:  # INT8's per-layer break-even (bench_all linear, LINEAR_LEVEL=int8, run ze): 4096x12288
            overrides = {"modules": {"min_gemm_size": 4096 * 12288}}
        # "lowbit_O1_dw_*": the weight scaled from its amax history (delayed: the default since 2026-12-01, so the
        # same as lowbit_O1_*); "lowbit_O1_cw_*": current weight scaling (the old default: an amax pass before each
        # weight cast), kept as the A/B of that change (issue 6, docs/performance.md).
        if "_dw_" in name or "_cw_" in name:
            overrides["linear"] = {"weight": {"scaling": {"algo": "delayed" if "_dw_" in name else "current"}}}
        if "_noshare_" in name:  # every layer casts its own input (lowbit_amp/nn/shared_input_cast.py off)
            overrides.setdefault("linear", {})["share_input_cast"] = False
        level = next((lvl for key, lvl in INT8_LEVELS.items() if f"_{key}_" in name), "O1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the policy-kept-everything warning; the note below says it
            model, opt = amp.initialize(model, opt, opt_level=level, **overrides)
        report = amp.amp_state(model).report
        note = f"{len(report.converted)}/{len(report.decisions)} linears {'INT8' if level != 'O1' else 'FP8'}"
        if not report.converted:
            note += " (shape policy kept every linear in bf16; model unchanged)"
    elif name.startswith("torchao"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    if name.endswith("compile"):
        model = torch.compile(model)
    return model, opt, note


# "lowbit_<key>_eager" / "_compile": the INT8 layouts (docs/int8.md) in the same anchor step; compiled, only the row
# layout with round-to-nearest runs its kernels inside the graph (lowbit_amp/int8/compiled_ops.py).
INT8_LEVELS = {"int8": "int8", "int8block": "configs/int8_block.yaml", "int8row": "configs/int8_row.yaml",
               "int8rowhp": "bench/configs/int8_row_hp.yaml"}
E2E_VARIANTS = ["bf16_eager", "lowbit_O1_eager", "bf16_compile", "lowbit_O1_compile", "lowbit_O1_cw_compile",
                "torchao_tensorwise_compile", "torchao_tensorwise_eager"]
E2E_SMALL_VARIANTS = ["bf16_eager", "lowbit_O1_eager", "lowbit_O1_all_eager", "bf16_compile", "lowbit_O1_compile", "lowbit_O1_cw_compile",
                      "lowbit_O1_all_compile", "torchao_tensorwise_compile"]


def _apply_switches(name: str) -> None:
    """Process-wide switches a variant's name selects, set before each of its steps (interleaved rounds alternate
    variants; Dynamo guards on the switch, so each compiled variant keeps the graph it was traced with):
    ``_top_``: the compiled FP8 cast through its triton_op (lowbit_amp/kernels/fp8_cast_op.py, VIA_TRITON_OP)."""
    if name.startswith("lowbit"):
        from lowbit_amp.kernels import fp8_cast_op

        fp8_cast_op.set_via_triton_op("_top_" in name)


def anchor_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """One training step of the anchor protocol (shared/anchors/anchor_gpu.py): mean-square loss of the output,
    backward, optimizer step, gradients set to None. Shared by every benchmark that times or profiles the anchor."""
    loss = model(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _timed_steps(step, host: list[float] | None = None) -> list[float]:  # type: ignore[no-untyped-def]
    """Five timings of four back-to-back steps each (the anchor protocol; ``STEPS_PER_WINDOW``), ms per step, sorted.
    With ``host``, the host's enqueue time per step of each window (until the last step returns, before the
    synchronisation) is appended to it: a window whose host time nears its GPU time is launch-bound, not GPU-bound."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    n = STEPS_PER_WINDOW
    for _ in range(5):
        t0 = time.perf_counter()
        start.record()
        for _ in range(n):
            step()
        end.record()
        if host is not None:
            host.append((time.perf_counter() - t0) * 1e3 / n)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    return sorted(times)


# Steps timed back to back between synchronisations: 4 is the anchor protocol (shared/anchors/anchor_gpu.py) and the
# default; STEPS_PER_WINDOW=16 is a diagnostic only — if a variant's per-step time drops with longer windows, part of
# its time is the GPU waiting after each synchronisation, not its kernels (docs/performance.md: ~2.5 ms per compiled
# O1 step that no kernel accounts for).
STEPS_PER_WINDOW = int(os.environ.get("STEPS_PER_WINDOW", "4"))


def _time_variant(name: str, tag: str, dim: int, heads: int, ffn: int, layers: int, batch: int, seq: int) -> dict:
    """One variant's step time (anchor protocol) and peak memory; its model is freed on return."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, opt, note = _make_variant(name, dim, heads, ffn, layers)
    x = torch.randn(batch, seq, dim, device=DEV, dtype=torch.bfloat16)
    _apply_switches(name)

    def step() -> torch.Tensor:
        return anchor_step(model, opt, x)

    t0 = time.time()
    for _ in range(3):
        loss = step()
    torch.cuda.synchronize()
    warm = time.time() - t0
    times = _timed_steps(step)
    # Host time to enqueue one step from an idle GPU: when it approaches step_ms the step is launch-bound (the GPU
    # waits for Python), which no kernel speedup can fix.
    host = []
    for _ in range(3):
        torch.cuda.synchronize()
        t_host = time.perf_counter()
        loss = step()
        host.append((time.perf_counter() - t_host) * 1000)
    torch.cuda.synchronize()
    rec = {"section": "e2e", "workload": tag, "variant": name, "step_ms": round(times[2], 2),
           "host_enqueue_ms": round(sorted(host)[1], 2),
           "step_ms_min_max": [round(times[0], 2), round(times[-1], 2)], "tok_per_s": round(batch * seq / times[2] * 1000),
           "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2), "warm_s": round(warm, 1),
           "loss_finite": bool(torch.isfinite(loss).item()), "note": note}
    print(json.dumps(rec), flush=True)
    return rec


def e2e_rounds(tag: str, dim: int, heads: int, ffn: int, layers: int, batch: int, seq: int, variants: list[str],
               rounds: int) -> dict:
    """Every variant built and warmed once, kept alive, then timed in ``rounds`` interleaved rounds (the anchor
    protocol's median per round), each ratio taken against bf16 of the same mode *in the same round*: clocks and
    temperature drift over a run by more than the gaps measured here (compiled bf16 41.9-43.7 ms between runs), and
    sequential variants each see a different part of that drift (bench/rounds.py)."""
    torch._dynamo.reset()
    x = torch.randn(batch, seq, dim, device=DEV, dtype=torch.bfloat16)
    steps = {}
    for name in variants:
        torch.manual_seed(0)
        model, opt, _ = _make_variant(name, dim, heads, ffn, layers)
        steps[name] = (lambda model=model, opt=opt, name=name: (_apply_switches(name), anchor_step(model, opt, x))[1])
        for _ in range(3):
            steps[name]()
        torch.cuda.synchronize()
    log, host_log = [], []
    for i in range(rounds):
        row, host_row = {}, {}
        for name, step in steps.items():
            host: list[float] = []
            row[name] = _timed_steps(step, host)[2]
            host_row[name] = sorted(host)[2]
        log.append(row)
        host_log.append(host_row)
        print(f"  round {i}: " + "  ".join(f"{name} {t:.2f} (host {host_row[name]:.2f})" for name, t in row.items()),
              flush=True)

    def baseline_of(name: str) -> str:
        return f"bf16_{'compile' if name.endswith('compile') else 'eager'}"

    summary = {}
    for name, v in summarize(log, variants, baseline_of).items():
        has = "ratio_median" in v
        summary[name] = {"step_ms_median": round(v["ms_median"], 2),
                         "vs_bf16_same_mode_median": round(v["ratio_median"], 3) if has else None,
                         "vs_bf16_same_mode_min_max": [round(v["ratio_min"], 3), round(v["ratio_max"], 3)] if has else None}
    print(f"\n== {tag}: {rounds} interleaved rounds, median step ms and per-round ratio to bf16 of the same mode ==")
    for name, v in summary.items():
        print(f"{name:>28} {v['step_ms_median']:8.2f}  {v['vs_bf16_same_mode_median']}  "
              f"[min, max] {v['vs_bf16_same_mode_min_max']}")
    rec = {"section": "e2e_rounds", "workload": tag, "rounds": rounds, "steps_per_window": STEPS_PER_WINDOW,
           "summary": summary,
           "log": [{k: round(t, 3) for k, t in r.items()} for r in log],
           "host_enqueue_ms_log": [{k: round(t, 3) for k, t in r.items()} for r in host_log]}
    emit(rec)
    return rec


def e2e(tag: str, dim: int, heads: int, ffn: int, layers: int, batch: int, seq: int,
        variants: list[str] = E2E_VARIANTS) -> list[dict]:
    try:
        import torchao  # noqa: F401
    except ImportError:
        variants = [v for v in variants if not v.startswith("torchao")]
        print("torchao not importable: its variants are skipped")
    if os.environ.get("BENCH_VARIANTS"):  # e.g. BENCH_VARIANTS=bf16_compile,lowbit_O1_compile for a quick check; names
        # outside the section's list are run too (lowbit_int8row_eager, ...), in the order given
        asked = os.environ["BENCH_VARIANTS"].split(",")
        variants = [v for v in asked if v in variants or v.startswith("lowbit_")]
    if os.environ.get("E2E_ROUNDS"):  # interleaved rounds instead of one pass (see e2e_rounds)
        e2e_rounds(tag, dim, heads, ffn, layers, batch, seq, variants, int(os.environ["E2E_ROUNDS"]))
        return []
    rows = [_time_variant(name, tag, dim, heads, ffn, layers, batch, seq) for name in variants]
    base = {mode: next((r["step_ms"] for r in rows if r["variant"] == f"bf16_{mode}"), None) for mode in ("eager", "compile")}
    print(f"\n== {tag}: step time, ratio to bf16 of the same mode ==")
    print(f"{'variant':>28} {'step ms':>8} {'vs bf16 same mode':>18} {'vs bf16 eager':>14} {'peak GiB':>9}")
    for r in rows:
        mode = "compile" if r["variant"].endswith("compile") else "eager"
        r["vs_bf16_same_mode"] = round(base[mode] / r["step_ms"], 3) if base[mode] else None
        r["vs_bf16_eager"] = round(base["eager"] / r["step_ms"], 3) if base["eager"] else None
        ratios = " ".join(f"{v:>16.2f}" if v is not None else f"{'-':>16}" for v in
                          (r["vs_bf16_same_mode"], r["vs_bf16_eager"]))
        print(f"{r['variant']:>28} {r['step_ms']:8.2f} {ratios} {r['peak_GiB']:9.2f}  {r['note']}")
        emit(r)
    return rows


def profiled_steps(variant: str, dim: int, heads: int, ffn: int, layers: int, batch: int, seq: int,
                   steps: int = 2):  # type: ignore[no-untyped-def]
    """A torch.profiler run of ``steps`` training steps of ``variant`` (each inside a ``## step ##`` record), after 4
    warm-up steps and a synchronisation; the model is freed on return. Shared by :func:`profile` and
    bench/trace_gaps.py."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch._dynamo.reset()
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    model, opt, _ = _make_variant(variant, dim, heads, ffn, layers)
    x = torch.randn(batch, seq, dim, device=DEV, dtype=torch.bfloat16)

    def step() -> None:
        with torch.profiler.record_function("## step ##"):
            anchor_step(model, opt, x)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof


def profile(tag: str, dim: int, heads: int, ffn: int, layers: int, batch: int, seq: int, variant: str,
            by_cpu: bool = False) -> None:
    """Where the time goes in one lowbit step: top CUDA kernels, written to $OUT/profile_<tag>.txt; with ``by_cpu``
    also the ops by self CPU time (where host syncs and Python-heavy dispatch show)."""
    prof = profiled_steps(variant, dim, heads, ffn, layers, batch, seq)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    if by_cpu:
        table += "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                                      max_name_column_width=70)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"profile_{tag}_{variant}.txt"), "w") as f:
        f.write(table)
    print(f"\n== profile {tag} {variant} (2 steps) ==")
    print("\n".join(table.splitlines()[:25]))
    by_kind = kernel_time_by_kind(prof, steps=2)
    print(f"GPU kernel ms per step by kind: {by_kind}")
    emit({"section": "profile_by_kind", "workload": tag, "variant": variant, "ms_per_step": by_kind})


KERNEL_KINDS = (("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "_mm_kernel")), ("fp8_cast", ("_cast_kernel", "_amax_partials")),
                ("attention", ("flash", "sdpa", "fmha", "attention")), ("optimizer", ("multi_tensor_apply", "adam")),
                ("memset", ("memset",)))


def kernel_time_by_kind(prof, steps: int) -> dict:  # type: ignore[no-untyped-def]
    """GPU kernel time per step grouped by name (GEMMs, FP8 casts, attention, optimizer, memsets, the rest): where a
    step's time goes, to set against the bytes or FLOPs each kind must move."""
    from torch.autograd import DeviceType

    sums: dict[str, float] = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for event in prof.events():  # device-side events only: key_averages' ops also carry their kernels' time
        if event.device_type != DeviceType.CUDA:
            continue
        if getattr(event, "is_user_annotation", False) or "#" in event.name:
            continue  # record_function ranges mirrored on the GPU ("## step ##", "Optimizer.step#AdamW.step"): not kernels
        name = event.name.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in name for p in pats)), "other")
        sums[kind] += event.time_range.elapsed_us()
    total = sum(sums.values())
    return {k: round(v / 1e3 / steps, 3) for k, v in sums.items()} | {"total": round(total / 1e3 / steps, 3)}


def main(argv: list[str]) -> None:
    META.update(_versions())
    row_config = os.environ.get("INT8_ROW_CONFIG")  # A/B of the INT8 row GEMM's kernel configurations end to end
    if row_config:
        from lowbit_amp.kernels import int8_row_gemm

        if row_config not in int8_row_gemm.ROW_CONFIGS:
            raise SystemExit(f"INT8_ROW_CONFIG={row_config!r}: not one of {sorted(int8_row_gemm.ROW_CONFIGS)}")
        int8_row_gemm.DEFAULT_ROW_CONFIG = row_config
        META["int8_row_config"] = row_config
    print(json.dumps(META))
    what = argv or ["cast", "linear", "e2e_big", "e2e_small"]
    for section in what:
        if section == "cast":
            bench_cast()
        elif section == "linear":
            bench_linear()
        elif section == "e2e_big":
            e2e("d4096_ffn14336_L2_tok8192", 4096, 32, 14336, 2, 2, 4096)
        elif section == "e2e_small":
            e2e("d1024_ffn4096_L8_tok8192", 1024, 16, 4096, 8, 8, 1024, E2E_SMALL_VARIANTS)
        elif section == "profile":
            profile("d4096", 4096, 32, 14336, 2, 2, 4096, "lowbit_O1_eager")
            profile("d1024", 1024, 16, 4096, 8, 8, 1024, "lowbit_O1_eager")
        elif section == "profile_int8":  # the INT8 layouts' anchor step (both tables: GPU kernels and CPU ops)
            for variant in os.environ.get("PROFILE_VARIANTS", "lowbit_int8row_eager,lowbit_int8_eager").split(","):
                profile("d4096", 4096, 32, 14336, 2, 2, 4096, variant, by_cpu=True)
        elif section == "profile_compile":  # the compiled O1 step next to compiled bf16 (what the 1.45x target compares)
            profile("d4096", 4096, 32, 14336, 2, 2, 4096, "lowbit_O1_compile")
            profile("d4096", 4096, 32, 14336, 2, 2, 4096, "bf16_compile")
        else:
            raise SystemExit(f"unknown section {section!r}; use cast, linear, e2e_big, e2e_small, profile, "
                             "profile_int8, profile_compile")


if __name__ == "__main__":
    main(sys.argv[1:])
