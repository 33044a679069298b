"""INT8 block-scaled GEMM with dynamic fallback vs bf16 and vs ``torch._int_mm`` (GPU).

Run: PYTHONPATH=. python bench/bench_int8.py [--out DIR] [--configs all|default|NAME,...] [--top N]
     [--extra ptr,interleave,fb1]      (writes bench_int8.json; docs/int8.md used --extra fb1 --top 2)
     [--row all|NAME,...]              also the row-scaled GEMM (lowbit_amp/int8/row_scaled.py) per config, without
                                       and with its residual fallback; --configs none skips the block-scaled ones
     [--rounds N]                      then N interleaved rounds of bf16 and the default row GEMM (each mode), the
                                       ratio taken per round (median and range reported) with the GPU's SM clock,
                                       power and temperature after each round: bf16's time moved 0.71-0.83 ms at
                                       16384x4096x4096 between runs while ours stayed at 0.517, so one ratio per run
                                       is not enough

Per shape: x (M, K) bf16 with outliers injected into a random 5% of its 128x128 tiles, W (N, K) bf16. Timed (median
of CUDA-event runs, triton.testing.do_bench), all in the same process: bf16 ``x @ Wᵀ``; ``torch._int_mm`` on
pre-quantized operands (no scales: the ceiling cuBLAS gives); our Triton GEMM for every configuration of
``CONFIGS`` (``--extra``: the pointer-load, interleaved and unpipelined-fallback variants) without fallback, then the
``--top`` fastest (and ``fb1``) with ``residual`` and with ``hp`` fallback (operands pre-quantized: the GEMM alone,
launcher included), the fused activation quantizer, and quantizer + GEMM. Every timed GEMM output is also checked
against the pure-PyTorch reference (``rel_err``, bf16 output). The weight is quantized once per optimizer step, so it
is not timed. TFLOP/s count 2·M·N·K (fallback work not counted as useful).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform

import torch

SHAPES = ((16384, 4096, 4096), (8192, 8192, 8192))


def make_inputs(m: int, k: int, n: int, frac: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen)
    tiles = torch.rand(m // 128, k // 128, device="cuda", generator=gen) < frac
    spikes = torch.rand(m, k, device="cuda", generator=gen) < 0.01
    boost = tiles.repeat_interleave(128, 0).repeat_interleave(128, 1) & spikes
    x = torch.where(boost, x * 100.0, x)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    return x.bfloat16(), w.bfloat16()


def main() -> None:
    import triton.testing

    from lowbit_amp.int8.block_quant import quantize_blocks
    from lowbit_amp.int8.reference_gemm import reference_block_mm_nt
    from lowbit_amp.kernels.int8_gemm import CONFIGS, DEFAULT_CONFIG, triton_block_mm_nt, triton_quantize_act
    from lowbit_amp.quant.metrics import rel_err

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--threshold", type=float, default=6.0)
    parser.add_argument("--configs", default="all")
    parser.add_argument("--extra", default="", help="extra variants: ptr,interleave,fb1")
    parser.add_argument("--top", type=int, default=3, help="how many of the fastest configs run with fallback")
    parser.add_argument("--row", default="", help="row-scaled GEMM configs: all or NAME,... (empty: none)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved bf16 / row-GEMM rounds (0: none)")
    args = parser.parse_args()
    parser_extra = args.extra.split(",") if args.extra else []
    variants = dict(CONFIGS)
    if "ptr" in parser_extra:  # pointer loads (cp.async) instead of TMA; run 1: 0.47x bf16
        variants[DEFAULT_CONFIG + "_ptr"] = dataclasses.replace(CONFIGS[DEFAULT_CONFIG], use_tma=False)
    if "fb1" in parser_extra:  # the fallback loop not software-pipelined
        variants[DEFAULT_CONFIG + "_fb1"] = dataclasses.replace(CONFIGS[DEFAULT_CONFIG], fb_stages=1)
    if "interleave" in parser_extra:  # run 1: 0.77x bf16
        variants["n128_w8_s3_r128_il"] = dataclasses.replace(CONFIGS["n128_w8_s3_r128"], interleave=True)
    if args.configs == "default":
        variants = {DEFAULT_CONFIG: CONFIGS[DEFAULT_CONFIG]}
    elif args.configs == "none":
        variants = {}
    elif args.configs != "all":
        variants = {name: variants[name] for name in args.configs.split(",")}
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    rows = []
    for m, k, n in SHAPES:
        x, w = make_inputs(m, k, n, 0.05)
        wq = quantize_blocks(w, "128x128")
        ops = {mode: triton_quantize_act(x, 128, mode != "none", args.threshold, mode if mode != "none" else "residual")
               for mode in ("none", "residual", "hp")}
        refs = {mode: reference_block_mm_nt(op, wq, torch.float32, b_hp=w) for mode, op in ops.items()}
        frac = float(ops["residual"].flags.float().mean())
        flops = 2.0 * m * n * k
        res: dict = {"shape": f"{m}x{k}x{n}", "fallback_fraction": frac, "configs": {}}
        res["bf16_ms"] = bench(lambda: x @ w.t())
        xq, wqt = ops["none"].q, wq.q.t()
        res["int_mm_ms"] = bench(lambda: torch._int_mm(xq, wqt))
        print(f"{res['shape']}: fallback {frac:.3f}  bf16 {res['bf16_ms']:.3f} ms ({flops / res['bf16_ms'] / 1e9:.0f} "
              f"TFLOP/s)  _int_mm {res['int_mm_ms']:.3f} ms ({res['bf16_ms'] / res['int_mm_ms']:.2f}x bf16)",
              flush=True)

        def run(name: str, mode: str) -> None:
            cfg = variants[name]
            kw = {"b_hp": w} if mode == "hp" else {}
            fn = lambda: triton_block_mm_nt(ops[mode], wq, torch.bfloat16, config=cfg, **kw)  # noqa: E731
            try:
                err = rel_err(refs[mode], fn().float())
                t = bench(fn)
            except Exception as exc:  # a config that does not fit (shared memory, registers) is skipped, and said
                print(f"  {name:22s} {mode:8s} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                return
            entry = res["configs"].setdefault(name, {"config": dataclasses.asdict(cfg)})
            entry[f"{mode}_ms"] = t
            entry[f"{mode}_rel_err"] = err
            print(f"  {name:22s} {mode:8s} {t:.3f} ms  {flops / t / 1e9:6.0f} TFLOP/s  {res['bf16_ms'] / t:.2f}x bf16  "
                  f"{res['int_mm_ms'] / t:.2f}x _int_mm  rel_err {err:.2e}", flush=True)

        for name in variants:
            run(name, "none")
        timed = sorted((v["none_ms"], name) for name, v in res["configs"].items() if "none_ms" in v)
        fallback_names = [name for _, name in timed[: args.top]]
        fallback_names += [name for name in variants if name.endswith("_fb1") and name not in fallback_names]
        for name in fallback_names:
            run(name, "residual")
            run(name, "hp")
        for mode in ("none", "residual", "hp"):
            done = [(v[f"{mode}_ms"], name) for name, v in res["configs"].items() if f"{mode}_ms" in v]
            if done:
                best_t, best = min(done)
                res[f"best_{mode}"] = {"config": best, "ms": best_t, "tflops": flops / best_t / 1e9,
                                       "vs_bf16": res["bf16_ms"] / best_t, "vs_int_mm": res["int_mm_ms"] / best_t}
        if args.row:
            run_row(args, res, x, w, bench, flops)
        if args.rounds:
            run_rounds(args.rounds, res, x, w, bench)
        res["quantize_residual_ms"] = bench(lambda: triton_quantize_act(x, 128, True, args.threshold, "residual"))
        res["quantize_none_ms"] = bench(lambda: triton_quantize_act(x, 128, False, args.threshold))
        if "best_residual" in res:
            cfg = variants[res["best_residual"]["config"]]
            t = bench(lambda: triton_block_mm_nt(triton_quantize_act(x, 128, True, args.threshold, "residual"), wq,
                                                 torch.bfloat16, config=cfg))
            res["quant_plus_gemm_residual_ms"] = t
            res["quant_plus_gemm_residual_vs_bf16"] = res["bf16_ms"] / t
        rows.append(res)
        summary = {key: (round(val["vs_bf16"], 3), round(val["vs_int_mm"], 3), val["config"])
                   for key, val in res.items() if key.startswith("best_")}
        print(f"  best (vs bf16, vs _int_mm, config): {summary}  quantize x: residual "
              f"{res['quantize_residual_ms']:.3f} ms, none {res['quantize_none_ms']:.3f} ms  quant+gemm(residual) "
              f"{res.get('quant_plus_gemm_residual_ms', float('nan')):.3f} ms", flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(), "results": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_int8.json"), "w") as handle:
        json.dump(meta, handle, indent=1)


def run_row(args: argparse.Namespace, res: dict, x: torch.Tensor, w: torch.Tensor, bench, flops: float) -> None:
    """The row-scaled GEMM (whole-K INT32 accumulation) per config, without and with residual fallback; the accuracy
    of both layouts against the float64 product (rel. Frobenius error) on these outlier-injected inputs."""
    from lowbit_amp.int8.block_quant import quantize_blocks
    from lowbit_amp.int8.fallback import quantize_with_fallback
    from lowbit_amp.int8.reference_gemm import reference_block_mm_nt
    from lowbit_amp.int8.row_scaled import quantize_rows, reference_row_mm_nt
    from lowbit_amp.kernels.int8_row_gemm import ROW_CONFIGS, triton_row_mm_nt
    from lowbit_amp.quant.metrics import rel_err

    names = list(ROW_CONFIGS) if args.row == "all" else args.row.split(",")
    wq = quantize_rows(w)
    ops = {"none": quantize_rows(x), "residual": quantize_rows(x, "128x128", args.threshold),
           "hp": quantize_rows(x, "128x128", args.threshold, mode="hp")}
    exact = x.double() @ w.double().t()
    wb = quantize_blocks(w, "128x128")
    acc = res["row_accuracy"] = {f"row_{mode}": rel_err(exact, reference_row_mm_nt(op, wq, torch.float32,
                                                                                    b_hp=w).double())
                                 for mode, op in ops.items()}
    acc["row_fallback_fraction"] = float(ops["residual"].flags.float().mean())
    for mode in ("residual", "hp"):
        blk = quantize_with_fallback(x, "1x128", "128x128", args.threshold, mode)
        acc[f"block_{mode}"] = rel_err(exact, reference_block_mm_nt(blk, wb, torch.float32, b_hp=w).double())
    acc["block_none"] = rel_err(exact, reference_block_mm_nt(quantize_blocks(x, "1x128"), wb, torch.float32).double())
    print(f"  accuracy vs float64 (rel. err): {acc}", flush=True)
    refs = {mode: reference_row_mm_nt(op, wq, torch.float32, b_hp=w) for mode, op in ops.items()}
    res["row_configs"] = {}
    for name in names:
        for mode, op in ops.items():
            fn = lambda: triton_row_mm_nt(op, wq, torch.bfloat16, config=name, b_hp=w)  # noqa: E731
            try:
                err = rel_err(refs[mode], triton_row_mm_nt(op, wq, torch.float32, config=name, b_hp=w))
                t = bench(fn)
            except Exception as exc:
                print(f"  row {name:18s} {mode:8s} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            res["row_configs"].setdefault(name, {})[f"{mode}_ms"] = t
            res["row_configs"][name][f"{mode}_rel_err"] = err
            print(f"  row {name:18s} {mode:8s} {t:.3f} ms  {flops / t / 1e9:6.0f} TFLOP/s  {res['bf16_ms'] / t:.2f}x "
                  f"bf16  {res['int_mm_ms'] / t:.2f}x _int_mm  rel_err {err:.2e}", flush=True)
    # the fused row quantizer, and quantizer + GEMM (the default config), as a layer's forward runs them
    from lowbit_amp.config import Int8Config
    from lowbit_amp.int8.activation import quantize_act
    from lowbit_amp.int8.reference_gemm import int8_block_mm_nt

    for mode in ("none", "residual", "hp"):
        cfg = Int8Config(act_block="row", weight_block="row", fallback=mode != "none",
                         fallback_mode=mode if mode != "none" else "hp", fallback_threshold=args.threshold)
        tq = bench(lambda: quantize_act(x, cfg, mode != "none"))
        tqg = bench(lambda: int8_block_mm_nt(quantize_act(x, cfg, mode != "none"), wq, torch.bfloat16, b_hp=w))
        res[f"row_quantize_{mode}_ms"], res[f"row_quant_plus_gemm_{mode}_ms"] = tq, tqg
        print(f"  row quantize x ({mode}) {tq:.3f} ms; quantize + GEMM {tqg:.3f} ms = {res['bf16_ms'] / tqg:.2f}x bf16",
              flush=True)

def _gpu_state() -> str:
    """The SM clock (MHz), power draw (W) and temperature (C) now, from nvidia-smi ("" where it is missing)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def run_rounds(rounds: int, res: dict, x: torch.Tensor, w: torch.Tensor, bench) -> None:
    """bf16 and the default row GEMM (none / residual / hp fallback, operands pre-quantized) timed in ``rounds``
    interleaved rounds, so that both see the same clocks and temperature; the ratio is taken per round."""
    from lowbit_amp.int8.row_scaled import quantize_rows
    from lowbit_amp.kernels.int8_row_gemm import DEFAULT_ROW_CONFIG, triton_row_mm_nt

    wq = quantize_rows(w)
    ops = {"none": quantize_rows(x), "residual": quantize_rows(x, "128x128", 6.0),
           "hp": quantize_rows(x, "128x128", 6.0, mode="hp")}
    fns = {"bf16": lambda: x @ w.t()}
    for mode, op in ops.items():
        fns[mode] = (lambda op=op: triton_row_mm_nt(op, wq, torch.bfloat16, config=DEFAULT_ROW_CONFIG, b_hp=w))
    log: list[dict] = []
    for i in range(rounds):
        times = {name: bench(fn) for name, fn in fns.items()}
        times["gpu_state"] = _gpu_state()
        log.append(times)
        ratios = "  ".join(f"{mode} {times['bf16'] / times[mode]:.3f}x" for mode in ops)
        print(f"  round {i}: bf16 {times['bf16']:.3f} ms  {ratios}  (sm MHz, W, C: {times['gpu_state']})", flush=True)
    from rounds import summarize  # bench/rounds.py (this script's directory is on sys.path when it runs)

    stats = summarize(log, list(fns), lambda name: "bf16")
    summary: dict = {mode: {"median": stats[mode]["ratio_median"], "min": stats[mode]["ratio_min"],
                            "max": stats[mode]["ratio_max"], "ms_median": stats[mode]["ms_median"]} for mode in ops}
    summary["bf16_ms_median"] = stats["bf16"]["ms_median"]
    res["rounds"] = {"config": DEFAULT_ROW_CONFIG, "log": log, "summary": summary}
    print(f"  {rounds} rounds, {DEFAULT_ROW_CONFIG} vs bf16 (median [min, max] of per-round ratios): "
          + "  ".join(f"{mode} {v['median']:.3f}x [{v['min']:.3f}, {v['max']:.3f}]" for mode, v in summary.items()
                      if isinstance(v, dict))
          + f"  bf16 median {summary['bf16_ms_median']:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
