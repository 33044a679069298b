"""Recipes benchmark: DeepSeek-V3 block scaling vs per-tensor FP8 — GEMM error table and layer timings — plus a probe
of ``torch._scaled_mm``'s native 1x128/128x128 blockwise scales.

Run (GPU):  PYTHONPATH=. python bench/bench_recipes.py            (writes $OUT/bench_recipes.json, else ./)
Runs on CPU too (error table only; the emulation has the same numerics). Timings are medians of CUDA-event runs.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics

import torch

from lowbit_amp.recipes.blockwise import blockwise_linear_config, gemm_errors, heavy_tailed, tensorwise_e4m3_config


def error_table(device: torch.device) -> list[dict]:
    rows = []
    for spread in (1.0, 100.0):
        for shape in ((256, 512, 384), (200, 320, 144), (4096, 4096, 4096)):
            if device.type == "cpu" and shape[0] > 1024:
                continue
            for seed in range(3):
                m, k, n = shape
                gen = torch.Generator().manual_seed(seed)
                x = heavy_tailed(m, k, 4, 100.0, spread, gen).to(device)
                w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
                dy = (heavy_tailed(m, n, 0, 1.0, spread, gen) * 1e-3).to(device)
                for name, cfg in (("tensor", tensorwise_e4m3_config()), ("block", blockwise_linear_config())):
                    errors = gemm_errors(cfg, x, w, dy)
                    rows.append({"token_spread": spread, "shape": shape, "seed": seed, "scaling": name,
                                 **{key: round(value, 2) for key, value in errors.__dict__.items()}})
    return rows


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer_timings(device: torch.device) -> list[dict]:
    from lowbit_amp.nn.linear import LowBitLinear

    rows = []
    for m, k, n in ((8192, 4096, 4096), (8192, 4096, 14336)):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        variants = {"bf16": base}
        for name, cfg in (("fp8 tensorwise e4m3", tensorwise_e4m3_config()), ("fp8 1x128/128x128", blockwise_linear_config())):
            lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            variants[name] = LowBitLinear.from_linear(lin, cfg)
        for name, layer in variants.items():
            def step(layer=layer) -> None:  # type: ignore[no-untyped-def]
                layer(x).backward(dy)
                x.grad = None
                layer.weight.grad = None
            try:
                rows.append({"shape": (m, k, n), "variant": name, "fwd_bwd_ms": round(time_ms(step), 3)})
            except Exception as err:  # record, do not hide: the table shows which variant failed and why
                rows.append({"shape": (m, k, n), "variant": name, "error": f"{type(err).__name__}: {err}"[:300]})
    return rows


def scaled_mm_blockwise_probe(device: torch.device) -> dict:
    """Does this torch's ``_scaled_mm`` take 1x128 (activation) x 128x128 (weight) float32 scales, and does it agree
    with the emulation? (cuBLASLt VEC128/BLK128x128 modes, CUDA >= 12.9, sm_90; no fast accumulation; 1x128 scales
    outer-dim-major, i.e. ``scale.t().contiguous().t()``.)"""
    from lowbit_amp.gemm.fp8 import fp8_mm_nt
    from lowbit_amp.quant.cast import compute_scale, quantize
    from lowbit_amp.quant.granularity import amax
    from lowbit_amp.quant.metrics import sqnr_db

    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda}
    m, k, n = 4096, 4096, 4096
    gen = torch.Generator().manual_seed(0)
    x = heavy_tailed(m, k, 4, 100.0, 1.0, gen).to(device)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
    xs = compute_scale(amax(x, "1x128"), "e4m3")
    ws = compute_scale(amax(w, "128x128"), "e4m3")
    x8, w8 = quantize(x, xs, "e4m3", "1x128"), quantize(w, ws, "e4m3", "128x128")
    emulated = fp8_mm_nt(x8, xs, w8, ws, torch.bfloat16, "1x128", "128x128")
    reference = x.double() @ w.double().t()
    out["emulated_sqnr_db"] = round(sqnr_db(reference, emulated), 2)
    scale_a = xs.reciprocal().t().contiguous().t()  # (M, K/128), outer-dim-major
    scale_b = ws.reciprocal().t().contiguous()  # (K/128, N/128) for b = Wᵀ (K, N)

    def native() -> torch.Tensor:
        return torch._scaled_mm(x8, w8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                use_fast_accum=False)

    try:
        y = native()
        out["supported"] = True
        out["native_sqnr_db"] = round(sqnr_db(reference, y), 2)
        out["native_vs_emulated_sqnr_db"] = round(sqnr_db(emulated.float(), y), 2)
        out["native_ms"] = round(time_ms(native), 3)
        out["emulated_ms"] = round(time_ms(lambda: fp8_mm_nt(x8, xs, w8, ws, torch.bfloat16, "1x128", "128x128")), 3)
        xt8, xts = quantize(x, compute_scale(amax(x), "e4m3"), "e4m3"), compute_scale(amax(x), "e4m3")
        wt8, wts = quantize(w, compute_scale(amax(w), "e4m3"), "e4m3"), compute_scale(amax(w), "e4m3")
        out["tensorwise_ms"] = round(time_ms(lambda: fp8_mm_nt(xt8, xts, wt8, wts, torch.bfloat16)), 3)
        out["bf16_ms"] = round(time_ms(lambda: x.bfloat16() @ w.bfloat16().t()), 3)
    except Exception as err:
        out["supported"] = False
        out["error"] = f"{type(err).__name__}: {err}"[:500]
    return out


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "errors": error_table(device),
    }
    if device.type == "cuda":
        result["scaled_mm_blockwise"] = scaled_mm_blockwise_probe(device)
        result["timings"] = layer_timings(device)
    summary: dict = {}
    for row in result["errors"]:
        key = (row["token_spread"], tuple(row["shape"]), row["scaling"])
        summary.setdefault(key, []).append(row)
    print(f"{'spread':>6} {'shape':>18} {'scaling':>7}  {'y':>5} {'dx':>5} {'dw':>5} {'y worst tok':>11} {'dx worst tok':>12}")
    for (spread, shape, name), rows in summary.items():
        lo = {k: min(r[k] for r in rows) for k in ("y", "dx", "dw", "y_worst_token", "dx_worst_token")}
        hi = {k: max(r[k] for r in rows) for k in lo}
        print(f"{spread:>6g} {str(shape):>18} {name:>7}  " + " ".join(f"{lo[k]:.1f}-{hi[k]:.1f}" for k in lo))
    for row in result.get("timings", []):
        print(row)
    if "scaled_mm_blockwise" in result:
        print(result["scaled_mm_blockwise"])
    out = pathlib.Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_recipes.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
