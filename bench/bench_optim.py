"""One optimizer step on 256M bf16 parameters: low-bit AdamW recipes vs ``torch.optim.AdamW(fused=True)`` (GPU).

    PYTHONPATH=. python bench/bench_optim.py [--out DIR] [--params-m 256] [--iters 20] [--sweep]

Each low-bit recipe runs on the path the optimizer picks by default (``fused``: the multi-tensor Triton kernel of
lowbit_amp/kernels/adam_triton.py, where it serves the formats) and, for O3, also on the per-parameter
``torch.compile``d update (``compiled``: ``fused=False``) it replaces. Timings are medians of CUDA-event-timed steps
after warm-up (which includes Triton/torch.compile compilation). Memory: ``state_bytes_per_param`` is the
``torch.cuda.memory_allocated`` growth caused by the first step (the optimizer state it creates, master copies
included); ``peak_step_bytes_per_param`` is ``torch.cuda.max_memory_allocated`` during a step above the resident set
(the step's temporaries). Gradients are given as the O2/O3 layers produce them: ``Fp8Grad`` for the low-bit recipes,
bf16 for torch. The parity columns compare the timed path with the eager reference (``compile=False``) on the same
inputs: max |Δw| and the fraction of bit-identical weights. ``--sweep`` also times the O3 kernel over
blocks-per-program × warps and with the approximate pow. Writes ``bench_optim.json`` (GPU name, versions, date) to
``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch
from torch import nn

from lowbit_amp.config import LinearConfig
from lowbit_amp.grads import to_fp8_weight_grad
from lowbit_amp.optim import LowBitAdamW

O3 = {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "bf16_sr"}  # configs/O3.yaml's optimizer
O3_EXPAND = {**O3, "exp_avg_sq": "e4m3_expand"}  # the 8-bit second moment (opt-in)
RECIPES: list[tuple[str, dict | None]] = [
    ("torch AdamW fused (bf16 states)", None),
    ("O3 fused: e4m3 m, fp16 v, bf16_sr", O3),
    ("fused: e4m3 m, e4m3_expand v, bf16_sr", O3_EXPAND),
    ("O3 compiled (fused=False)", {**O3, "fused": False}),
]
MORE = [  # --all: slow to warm up (torch.compile), and unchanged by the fused kernel
    ("FP8-LM: e4m3 m, fp16 v, fp16 master (compiled: fp16 master is not fused)",
     {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "fp16"}),
]


def make_params(total: int, rows: int, device: torch.device) -> list[nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(0)
    count = max(1, total // (rows * rows))
    return [nn.Parameter(0.02 * torch.randn(rows, rows, device=device, generator=gen).to(torch.bfloat16))
            for _ in range(count)]


def set_grads(params: list[nn.Parameter], fp8: bool) -> None:
    gen = torch.Generator(device=params[0].device).manual_seed(1)
    for p in params:
        g = 1e-3 * torch.randn(p.shape, device=p.device, generator=gen)
        p.grad = to_fp8_weight_grad(g, p, LinearConfig(weight_grad="e4m3")) if fp8 else g.to(p.dtype)


def time_steps(opt: torch.optim.Optimizer, iters: int, pipelined: bool = False) -> list[float]:
    """Per-step CUDA-event times. Synchronised (default): the host is idle-waited before each step, so a step's time
    includes the host work before its first kernel starts (what a step costs when nothing else is queued).
    Pipelined: steps are enqueued back to back and synchronised once (triton.testing.do_bench's protocol), so host
    work overlaps the previous step's kernels and a step's time is the GPU time when that exceeds the host time."""
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        events.append((start, end))
        if not pipelined:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def bench(name: str, storage: dict | None, args: argparse.Namespace, device: torch.device,
          with_parity: bool = True) -> dict:
    torch.cuda.empty_cache()
    params = make_params(args.params_m * 2**20, args.rows, device)
    n = sum(p.numel() for p in params)
    set_grads(params, fp8=storage is not None)
    if storage is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    else:
        opt = LowBitAdamW(params, lr=1e-4, **storage)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    state_bytes = torch.cuda.memory_allocated() - resident
    for _ in range(2):
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = time_steps(opt, args.iters)
    peak = torch.cuda.max_memory_allocated() - base
    pipelined = time_steps(opt, args.iters, pipelined=True)
    row = {"recipe": name, "params": n, "step_ms_median": statistics.median(times), "step_ms_min": min(times),
           "pipelined_step_ms_median": statistics.median(pipelined),
           "state_bytes_per_param": state_bytes / n, "peak_step_bytes_per_param": peak / n}
    if storage is not None:
        row["measured_state_storage_bytes_per_param"] = opt.state_bytes() / n  # type: ignore[attr-defined]
        if with_parity:
            row["parity_max_abs_diff_vs_eager"], row["parity_bit_identical_vs_eager"] = parity(storage, device)
    del opt, params
    return row


def parity(storage: dict, device: torch.device) -> tuple[float, float]:
    """``(max |w - w_eager|, fraction of bit-identical weights)`` after 3 steps on one 1000x1000 parameter (ragged
    blocks included), the benchmarked path against ``compile=False`` (the eager reference)."""
    results = []
    for reference in (False, True):
        gen = torch.Generator(device=device).manual_seed(2)
        p = nn.Parameter((0.02 * torch.randn(1000, 1000, device=device, generator=gen)).to(torch.bfloat16))
        opt = LowBitAdamW([p], lr=1e-3, **({**storage, "compile": False} if reference else storage))
        for _ in range(3):
            p.grad = to_fp8_weight_grad(torch.randn(p.shape, device=device, generator=gen), p,
                                        LinearConfig(weight_grad="e4m3"))
            opt.step()
        results.append(p.detach())
    same = (results[0].view(torch.int16) == results[1].view(torch.int16)).float().mean().item()
    return (results[0].float() - results[1].float()).abs().max().item(), same


def anchor_protocol(device: torch.device) -> list[dict]:
    """shared/anchors/anchor_gpu.py's protocol exactly: ONE 65536x4096 bf16 parameter (256M), ``triton.testing.do_bench``
    (warmup 50, rep 200, median) of ``opt.step`` — the numbers shared/ANCHORS.md lists for the peers."""
    from triton.testing import do_bench

    rows = []
    for name, storage in [("torch AdamW fused", None), ("O3 fused", O3), ("e4m3_expand v fused", O3_EXPAND)]:
        torch.cuda.empty_cache()
        gen = torch.Generator(device=device).manual_seed(0)
        p = nn.Parameter(torch.randn(65536, 4096, device=device, generator=gen).to(torch.bfloat16))
        set_grads([p], fp8=storage is not None)
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True) if storage is None else LowBitAdamW([p], lr=1e-4, **storage)
        base = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        state = (torch.cuda.memory_allocated() - base) / p.numel()
        rows.append({"recipe": f"anchor protocol: {name}", "step_ms": do_bench(opt.step, warmup=50, rep=200,
                                                                              return_mode="median"),
                     "state_bytes_per_param": state})
        rows[-1]["vs_torch_fused"] = rows[-1]["step_ms"] / rows[0]["step_ms"]
        print(f"| {rows[-1]['recipe']} | {rows[-1]['step_ms']:.3f} | {rows[-1]['vs_torch_fused']:.2f}x | "
              f"{state:.2f} |", flush=True)
        del opt, p
    return rows


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """O3 fused step time over blocks-per-program x warps, and with the approximate pow."""
    import lowbit_amp.optim.update as U

    rows = []
    defaults = (U.FUSED_BLOCKS_PER_PROGRAM, U.FUSED_NUM_WARPS, U.FUSED_EXACT_POW, U.FUSED_TORCH_BIAS_CORRECTION)
    for config in [(1, 1, False, False), (8, 2, False, False), (8, 4, False, False), (16, 4, False, False),
                   (32, 8, False, False), (8, 4, True, False), (8, 4, False, True)]:
        U.FUSED_BLOCKS_PER_PROGRAM, U.FUSED_NUM_WARPS, U.FUSED_EXACT_POW, U.FUSED_TORCH_BIAS_CORRECTION = config
        bpp, warps, exact, torch_bc = config
        storage = O3_EXPAND if exact else O3  # the exact pow only changes the e4m3_expand codec
        row = bench(f"{'e4m3_expand' if exact else 'O3'} fused bpp={bpp} warps={warps} exact_pow={exact} "
                    f"torch_bc={torch_bc}", storage, args, device,
                    with_parity=exact or torch_bc)
        rows.append(row)
        print(f"  {row['recipe']}: {row['step_ms_median']:.3f} ms", flush=True)
    U.FUSED_BLOCKS_PER_PROGRAM, U.FUSED_NUM_WARPS, U.FUSED_EXACT_POW, U.FUSED_TORCH_BIAS_CORRECTION = defaults
    for name, storage in [("O3", O3), ("e4m3_expand", O3_EXPAND)]:  # what the approximate div/sqrt buys
        U.FUSED_FAST_MATH = False
        rows.append(bench(f"{name} fused, IEEE div/sqrt", storage, args, device))
        U.FUSED_FAST_MATH = True
        print(f"  {rows[-1]['recipe']}: {rows[-1]['step_ms_median']:.3f} ms", flush=True)
    many = argparse.Namespace(**{**vars(args), "rows": 1024})  # 256 parameters of 1M: per-parameter overheads
    for name, storage in [("torch AdamW fused, 1024x1024 params", None), ("O3 fused, 1024x1024 params", O3),
                          ("e4m3_expand v fused, 1024x1024 params", O3_EXPAND)]:
        rows.append(bench(name, storage, many, device, with_parity=False))
        print(f"  {name}: {rows[-1]['step_ms_median']:.3f} ms", flush=True)
    profile_step(O3, args, device)
    print_kernel_resources()
    return rows


def print_kernel_resources() -> None:
    """Registers, spills and shared memory of every compiled variant of the fused AdamW kernel (what limits its
    occupancy: the E4M3-expand variant is compute-heavier than its instruction count explains). Reads Triton's
    per-device kernel cache; prints nothing it cannot find (the cache layout differs across Triton versions)."""
    from lowbit_amp.kernels import adam_triton as K  # noqa: N812

    for name, fn in (("fused_adam_kernel", K.fused_adam_kernel), ("fused_adam_prologue", K.fused_adam_prologue)):
        for caches in getattr(fn, "device_caches", {}).values():
            kernel_cache = caches[0] if isinstance(caches, tuple) else caches
            for key, kernel in getattr(kernel_cache, "items", lambda: [])():
                try:
                    kernel._init_handles()
                except Exception:  # noqa: BLE001  (older/newer Triton: attributes may already be set, or differ)
                    pass
                constexprs = dict(getattr(kernel, "constants", None) or {})
                print(f"  {name}: regs={getattr(kernel, 'n_regs', '?')} spills={getattr(kernel, 'n_spills', '?')} "
                      f"shared={getattr(kernel.metadata, 'shared', '?')} warps={getattr(kernel.metadata, 'num_warps', '?')} "
                      f"{str(constexprs or key)[:160]}", flush=True)


def profile_step(storage: dict, args: argparse.Namespace, device: torch.device) -> None:
    """Where one O3 fused step's GPU time goes (kernel names and CUDA time), printed."""
    params = make_params(args.params_m * 2**20, args.rows, device)
    set_grads(params, fp8=True)
    opt = LowBitAdamW(params, lr=1e-4, **storage)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--params-m", type=int, default=256, help="millions (2**20) of parameters")
    parser.add_argument("--rows", type=int, default=4096, help="each parameter is rows x rows")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="also time O3 fused over launch configurations")
    parser.add_argument("--all", action="store_true", help="also the recipes the fused kernel does not serve")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_optim.py needs a CUDA GPU (it times fused GPU optimizer steps).")
    device = torch.device("cuda")
    rows = []
    for name, storage in RECIPES + (MORE if args.all else []):
        rows.append(bench(name, storage, args, device))
        print(f"  {name}: {rows[-1]['step_ms_median']:.3f} ms", flush=True)
    reference = rows[0]["step_ms_median"]
    print("| anchor protocol | step ms (do_bench median) | vs torch fused | state B/param |")
    anchor_rows = anchor_protocol(device)
    if args.sweep:
        write_json(args, rows)
        rows += sweep(args, device)
    reference_pipelined = rows[0]["pipelined_step_ms_median"]
    print("| recipe | step ms (median) | vs torch fused | pipelined ms | vs torch fused | state B/param "
          "| step temporaries B/param | parity max|dw| | bit-identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["vs_torch_fused"] = r["step_ms_median"] / reference
        r["pipelined_vs_torch_fused"] = r["pipelined_step_ms_median"] / reference_pipelined
        print(f"| {r['recipe']} | {r['step_ms_median']:.3f} | {r['vs_torch_fused']:.2f}x | "
              f"{r['pipelined_step_ms_median']:.3f} | {r['pipelined_vs_torch_fused']:.2f}x | "
              f"{r['state_bytes_per_param']:.2f} | {r['peak_step_bytes_per_param']:.2f} | "
              f"{r.get('parity_max_abs_diff_vs_eager', float('nan')):.2e} | "
              f"{r.get('parity_bit_identical_vs_eager', float('nan')):.6f} |")
    write_json(args, rows + anchor_rows)


def write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "params": rows[0]["params"], "rows": rows}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_optim.json"), "w") as handle:
        json.dump(meta, handle, indent=1)


if __name__ == "__main__":
    main()
