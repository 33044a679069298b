"""Where an INT8 layer's time goes inside the anchor step: each GEMM and each quantization, timed with CUDA events.

Why: the profiler's tables say how long the INT8 kernels take in total, not which of the three GEMMs (forward, grad
input, grad weight) is slow, with which operand shapes, strides and fallback fractions. This script wraps the two
functions the INT8 autograd Function calls (``quantize_act`` and ``int8_block_mm_nt``) with CUDA events, runs the
anchor step (4096-wide, 2 blocks, 8192 tokens) for the given variants, and prints one line per (GEMM, shape): mean ms,
TOPS, fallback fraction of operand ``a``, whether operands are contiguous. GPU only.

    PYTHONPATH=. python bench/int8_breakdown.py [lowbit_int8row_eager lowbit_int8_eager]
    PYTHONPATH=. python bench/int8_breakdown.py --host [variant]   # cProfile of the step's host time
    PYTHONPATH=. python bench/int8_breakdown.py --quant            # the row quantizer on transposed views
"""

from __future__ import annotations

import collections
import functools
import sys

import torch

sys.path.insert(0, "bench")
import bench_all

import lowbit_amp.nn.int8_function as fn
from lowbit_amp.int8.fallback import FallbackOperand, main_of

RECORDS: list[tuple] = []
PHASE = ["fwd"]


def _wrap_gemm(orig):  # type: ignore[no-untyped-def]
    def gemm(a, b, out_dtype, bias=None, b_hp=None, backend="auto"):  # type: ignore[no-untyped-def]
        main = main_of(a)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = orig(a, b, out_dtype, bias, b_hp, backend)
        end.record()
        label = "wgrad" if out_dtype == torch.float32 else ("fwd" if PHASE[0] == "fwd" else "dgrad")
        frac = a.fraction if isinstance(a, FallbackOperand) else None
        layout = (main.q.is_contiguous(), b.q.is_contiguous(), b_hp is None or b_hp.is_contiguous())
        RECORDS.append(("gemm " + label, tuple(main.q.shape), tuple(b.q.shape), layout, frac, start, end))
        return out
    return gemm


def _wrap_quant(orig):  # type: ignore[no-untyped-def]
    def quant(x2d, cfg, fallback, rounding="nearest", generator=None, backend="auto"):  # type: ignore[no-untyped-def]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = orig(x2d, cfg, fallback, rounding, generator, backend)
        end.record()
        RECORDS.append((f"quant {PHASE[0]}{' fb' if fallback else ''}", tuple(x2d.shape), (), (x2d.is_contiguous(),),
                        None, start, end))
        return out
    return quant


def _wrap_weight(orig):  # type: ignore[no-untyped-def]
    def weight_blocks(layer, weight, transposed):  # type: ignore[no-untyped-def]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = orig(layer, weight, transposed)
        end.record()
        RECORDS.append((f"weight{'ᵀ' if transposed else ''} (cached)", tuple(weight.shape), (),
                        (out.q.is_contiguous(),), None, start, end))
        return out
    return weight_blocks


def _warm_anchor(variant: str):  # type: ignore[no-untyped-def]
    """The 4096-wide anchor model of ``variant`` with its input, after three warm-up steps."""
    torch.manual_seed(0)
    model, opt, note = bench_all._make_variant(variant, 4096, 32, 14336, 2)
    x = torch.randn(2, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        bench_all.anchor_step(model, opt, x)
    torch.cuda.synchronize()
    return model, opt, note, x


def run(variant: str) -> None:
    model, opt, note, x = _warm_anchor(variant)
    RECORDS.clear()
    steps = 3
    for _ in range(steps):
        PHASE[0] = "fwd"
        loss = model(x).float().pow(2).mean()
        PHASE[0] = "bwd"
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    groups: dict[tuple, list] = collections.defaultdict(list)
    for label, ashape, bshape, layout, frac, start, end in RECORDS:
        groups[(label, ashape, bshape, layout)].append((start.elapsed_time(end), None if frac is None else float(frac)))
    print(f"\n== {variant} ({note}): per step, mean over {steps} steps ==")
    total = 0.0
    for (label, ashape, bshape, layout), vals in sorted(groups.items()):
        ms = sum(v[0] for v in vals) / steps
        total += ms
        n = len(vals) // steps
        fr = [v[1] for v in vals if v[1] is not None]
        ops = 2 * ashape[0] * ashape[1] * bshape[0] if bshape else 0
        tops = f"{ops * n / (ms * 1e-3) / 1e12:6.0f} TOPS" if ops else " " * 11
        frs = f" fallback {sum(fr) / len(fr):.3f}" if fr else ""
        print(f"  {label:13s} a{ashape!s:15s} b{bshape!s:15s} contig {layout}  x{n}  {ms:7.2f} ms {tops}{frs}")
    print(f"  total in INT8 quantize + GEMM calls: {total:.2f} ms per step")
    del model, opt
    torch.cuda.empty_cache()


def host_profile(variant: str, steps: int = 3) -> None:
    """cProfile of ``steps`` anchor steps (host time: what bounds a step whose enqueue time nears its GPU time)."""
    import cProfile
    import pstats

    model, opt, _, x = _warm_anchor(variant)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        bench_all.anchor_step(model, opt, x)
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n== host profile {variant}, {steps} steps ==")
    pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    del model, opt
    torch.cuda.empty_cache()


def _ms(fn, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def quant_sweep() -> None:
    """The row quantizer on the weight gradient's transposed operands (xᵀ, dyᵀ: views of row-major activations),
    with the default rows per program and with 64 / 128 (a stride-1 row dim: more rows per program make each load
    longer contiguous runs), and copy-then-quantize; the contiguous tensor next to it as the bound. What decides
    ``_rows_per_program`` for transposed inputs (docs/int8.md, "End to end")."""
    from lowbit_amp.kernels.int8_row_quant import triton_quantize_rows

    print("\n== row quantizer on transposed views (ms) ==")
    for tokens, feat in [(8192, 4096), (8192, 14336)]:
        x = torch.randn(tokens, feat, device="cuda", dtype=torch.bfloat16)
        x[::97, ::13] *= 40.0  # some outlier tiles
        xt = x.t()
        for fallback in (False, True):
            def quant(src, rb=None, fb=fallback, split=None):  # type: ignore[no-untyped-def]
                # hp: the int8 preset's fallback (the K-split kernel serves it; residual needs whole rows)
                return triton_quantize_rows(src, 128, fb, 6.0, rows_per_program=rb, mode="hp", split=split)

            row = {"contiguous x": _ms(functools.partial(quant, x)),
                   "xᵀ default (K split)": _ms(functools.partial(quant, xt)),
                   "xᵀ whole rows": _ms(functools.partial(quant, xt, split=False)),
                   "xᵀ copy+quant": _ms(lambda src=xt: quant(src.contiguous()))}
            for rb in (16, 32, 64):
                row[f"xᵀ whole rows rb={rb}"] = _ms(functools.partial(quant, xt, rb, split=False))
            if fallback:
                row["xᵀ residual"] = _ms(lambda src=xt: triton_quantize_rows(src, 128, True, 6.0))
            def codes(op, fb=fallback):  # type: ignore[no-untyped-def]
                return op.main.q if fb else op.q

            ref = codes(quant(xt, split=False))
            same = all(torch.equal(codes(quant(xt, rb, split=False)), ref) for rb in (16, 64))
            same = same and torch.equal(codes(quant(xt)), ref)
            cells = "  ".join(f"{k} {v:.3f}" for k, v in row.items())
            print(f"  {feat}x{tokens} (xᵀ of {tokens}x{feat}) fallback={fallback}: {cells}  codes equal: {same}")


def flags_sweep() -> None:
    """GPU time of the fallback detector alone (one-program median kernel; 30 calls per INT8 anchor step, never timed
    on its own) next to torch's kthvalue and median, at the anchor's tile counts (8192 tokens: 64 x 32, 64 x 112,
    96 x 64 tiles) and the kernel's largest. Decides whether a faster median (fewer block-wide reductions than its 31
    bisection steps) is worth writing."""
    from lowbit_amp.kernels.outlier_flags import triton_outlier_flags

    print("\n== fallback detector: GPU time per call (ms, kernels' CUDA time from the profiler; wall per call) ==")
    for shape in [(64, 32), (64, 112), (96, 64), (128, 256)]:
        amax = torch.rand(shape, device="cuda") + 0.5
        amax[::7, ::5] *= 30.0
        fns = {"kernel": lambda a=amax: triton_outlier_flags(a, 6.0),
               "kthvalue": lambda a=amax: a.flatten().kthvalue((a.numel() - 1) // 2 + 1),
               "median": lambda a=amax: a.flatten().median()}
        cells = []
        for name, fn in fns.items():
            cells.append(f"{name} {_gpu_ms(fn):.4f} (wall {_ms(fn, reps=50):.4f})")
        print(f"  {shape[0]}x{shape[1]} tiles: " + "  ".join(cells))


def _gpu_ms(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
    """Sum of the CUDA kernel time per call (torch.profiler): GPU time even where the host bounds the wall time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_time_total and not e.cpu_children)
    return total_us / reps / 1000.0


def main(variants: list[str]) -> None:
    if variants and variants[0] == "--quant":
        quant_sweep()
        return
    if variants and variants[0] == "--flags":
        flags_sweep()
        return
    if variants and variants[0] == "--host":
        for v in variants[1:] or ["lowbit_int8row_eager"]:
            host_profile(v)
        return
    fn.int8_block_mm_nt = _wrap_gemm(fn.int8_block_mm_nt)
    fn.quantize_act = _wrap_quant(fn.quantize_act)
    fn._weight_blocks = _wrap_weight(fn._weight_blocks)
    for v in variants or ["lowbit_int8row_eager", "lowbit_int8rowhp_eager", "lowbit_int8_eager"]:
        run(v)


if __name__ == "__main__":
    main(sys.argv[1:])
