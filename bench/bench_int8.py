"""INT8 block-scaled GEMM with dynamic fallback vs bf16 and vs ``torch._int_mm`` (GPU).

Run: PYTHONPATH=. python bench/bench_int8.py [--out DIR]      (writes bench_int8.json to DIR, default $OUT or .)

Per shape: x (M, K) bf16 with outliers injected into a random 5% of its 128x128 tiles, W (N, K) bf16. Timed (median
of CUDA-event runs, triton.testing.do_bench): bf16 ``x @ Wᵀ``; ``torch._int_mm`` on pre-quantized operands (no scales:
the ceiling cuBLAS gives); our Triton GEMM without fallback, with residual fallback and with hp fallback (operands
pre-quantized: the GEMM alone), the fused activation quantizer, and quantizer + GEMM. The weight is quantized once per
optimizer step, so it is not timed. TFLOP/s count 2·M·N·K (fallback work not counted as useful).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

SHAPES = ((16384, 4096, 4096), (8192, 8192, 8192))
CONFIGS = ((128, 8, 4), (128, 4, 4), (128, 8, 3), (256, 8, 3))  # (block_n, num_warps, num_stages)


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
    from lowbit_amp.kernels.int8_gemm import triton_block_mm_nt, triton_quantize_act

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--threshold", type=float, default=6.0)
    args = parser.parse_args()
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    rows = []
    for m, k, n in SHAPES:
        x, w = make_inputs(m, k, n, 0.05)
        wq = quantize_blocks(w, "128x128")
        ops = {mode: triton_quantize_act(x, 128, mode != "none", args.threshold, mode if mode != "none" else "residual")
               for mode in ("none", "residual", "hp")}
        frac = float(ops["residual"].flags.float().mean())
        flops = 2.0 * m * n * k
        res = {"shape": f"{m}x{k}x{n}", "fallback_fraction": frac}
        res["bf16_ms"] = bench(lambda: x @ w.t())
        xq, wqt = ops["none"].q, wq.q.t()
        res["int_mm_ms"] = bench(lambda: torch._int_mm(xq, wqt))
        best = None
        for cfg in CONFIGS:
            bn, nw, ns = cfg
            try:
                t = bench(lambda: triton_block_mm_nt(ops["none"], wq, torch.bfloat16, block_n=bn, num_warps=nw,
                                                     num_stages=ns))
            except Exception as err:  # a config that does not fit (shared memory) is skipped, and said
                print(f"config {cfg} failed: {type(err).__name__}: {str(err)[:120]}")
                continue
            res[f"triton_nofb_ms_{bn}_{nw}_{ns}"] = t
            if best is None or t < best[0]:
                best = (t, cfg)
        assert best is not None
        bn, nw, ns = best[1]
        kw = dict(block_n=bn, num_warps=nw, num_stages=ns)
        res["config"] = {"block_n": bn, "num_warps": nw, "num_stages": ns}
        res["triton_nofb_ms"] = best[0]
        res["triton_residual_ms"] = bench(lambda: triton_block_mm_nt(ops["residual"], wq, torch.bfloat16, **kw))
        res["triton_hp_ms"] = bench(lambda: triton_block_mm_nt(ops["hp"], wq, torch.bfloat16, b_hp=w, **kw))
        res["quantize_residual_ms"] = bench(lambda: triton_quantize_act(x, 128, True, args.threshold, "residual"))
        res["quant_plus_gemm_residual_ms"] = bench(lambda: triton_block_mm_nt(
            triton_quantize_act(x, 128, True, args.threshold, "residual"), wq, torch.bfloat16, **kw))
        for key in [key for key in res if key.endswith("_ms")]:
            res[key.replace("_ms", "_tflops")] = flops / res[key] / 1e9
        for key in ("int_mm", "triton_nofb", "triton_residual", "triton_hp", "quant_plus_gemm_residual"):
            res[f"{key}_vs_bf16"] = res["bf16_ms"] / res[f"{key}_ms"]
        res["triton_residual_vs_int_mm"] = res["int_mm_ms"] / res["triton_residual_ms"]
        rows.append(res)
        print(f"{res['shape']}: fallback {frac:.3f}  bf16 {res['bf16_ms']:.3f} ms  _int_mm {res['int_mm_ms']:.3f} "
              f"({res['int_mm_vs_bf16']:.2f}x)  triton nofb {res['triton_nofb_ms']:.3f} ({res['triton_nofb_vs_bf16']:.2f}x)"
              f"  residual {res['triton_residual_ms']:.3f} ({res['triton_residual_vs_bf16']:.2f}x)  hp "
              f"{res['triton_hp_ms']:.3f} ({res['triton_hp_vs_bf16']:.2f}x)  quant {res['quantize_residual_ms']:.3f}"
              f"  quant+gemm {res['quant_plus_gemm_residual_ms']:.3f} ({res['quant_plus_gemm_residual_vs_bf16']:.2f}x)"
              f"  config {res['config']}")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(), "results": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_int8.json"), "w") as handle:
        json.dump(meta, handle, indent=1)


if __name__ == "__main__":
    main()
