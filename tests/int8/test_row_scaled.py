"""Row-scaled INT8 (lowbit_amp/int8/row_scaled.py): quantizer vs float64, the fallback's flags and row scales, the
reference GEMM's exact arithmetic and SQNR floors, the SwiGLU down-projection, the layer, config errors, and the Triton
kernel in the interpreter.

Tolerances: codes within half a step of ``x · scale`` (round to nearest); GEMM vs the float64 product of the
dequantized operands < 1e-6 (FP32 rounding only: the INT32 sums are exact); SQNR floors in dB, measured values noted."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit_amp.config import ConfigError, Int8Config
from lowbit_amp.int8.block_quant import quantize_blocks
from lowbit_amp.int8 import int8_block_mm_nt
from lowbit_amp.int8.row_scaled import (
    CHUNK_K,
    MAX_K,
    ROW,
    _reference_row_mm,
    quantize_rows,
    reference_row_mm_nt,
    row_mm_chunked,
)
from lowbit_amp.quant.metrics import rel_err, sqnr_db

SHAPES = [(128, 256, 128), (200, 520, 72), (33, 100, 17)]  # (M, K, N): multiples and non-multiples of 16 / 128


def _inject(x: torch.Tensor, tiles: list[tuple[int, int]], gen: torch.Generator, factor: float = 200.0) -> torch.Tensor:
    x = x.clone()
    for ti, tj in tiles:
        block = x[ti * 128:(ti + 1) * 128, tj * 128:(tj + 1) * 128]
        block[torch.rand(block.shape, generator=gen) < 0.02] *= factor
    return x


@pytest.mark.parametrize("shape", [(128, 256), (200, 520), (33, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_quantize_round_trip_vs_float64(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> None:
    x = torch.randn(shape, generator=gen).to(dtype)
    blocks = quantize_rows(x)
    x64 = x.double()
    scale = 127.0 / x64.abs().amax(1, keepdim=True)
    assert blocks.block == ROW and blocks.scale.shape == (shape[0], 1)
    assert torch.allclose(blocks.scale.double(), scale, rtol=1e-6)
    assert int(blocks.q.abs().max()) == 127  # each row's amax maps to the format max
    step_err = (blocks.q.double() - x64 * blocks.scale.double()).abs()
    assert float(step_err.max()) <= 0.5 + 1e-5
    assert sqnr_db(x64, blocks.dequantize(torch.float64)) > 35  # measured ~39 dB (Gaussian rows of <= 520)


def test_fallback_flags_injected_tiles_not_gaussian(gen: torch.Generator) -> None:
    for _ in range(3):
        assert not bool(quantize_rows(torch.randn(300, 1000, generator=gen), "128x128", 6.0).flags.any())
    x = _inject(torch.randn(384, 520, generator=gen), [(0, 1), (2, 4), (1, 0)], gen)
    op = quantize_rows(x, "128x128", 6.0)
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[0, 1] = expected[2, 4] = expected[1, 0] = True
    assert torch.equal(op.flags, expected)
    # the row scale ignores the flagged tiles: it is set by the row's unflagged values
    mask = op.element_mask()
    clean = torch.where(mask, 0.0, x.float().abs()).amax(1, keepdim=True)
    assert torch.allclose(op.main.scale, 127.0 / clean, rtol=1e-6)
    # outliers saturate the main codes; the residual carries them: the represented value is far better than plain
    # row scaling (whose scale the outliers set), and outside flagged tiles the residual is zero
    plain = quantize_rows(x).dequantize()
    rep = op.dequantize()
    assert sqnr_db(x, rep) > sqnr_db(x, plain) + 20  # measured ~+30 dB
    assert int(op.residual.q.masked_fill(mask, 0).abs().max()) == 0


def test_row_with_all_blocks_flagged_uses_full_amax() -> None:
    x = torch.ones(128, 256)
    x[:, :128] *= 100.0  # one tile 100x the other: the median is the small tile's -> the large one is flagged
    op = quantize_rows(x, "128x128", 6.0)
    assert op.flags.tolist() == [[True, False]]
    x2 = torch.ones(128, 128) * 3.0
    op2 = quantize_rows(x2, "128x128", 6.0)  # a single tile is its own median: never flagged
    assert not bool(op2.flags.any())
    assert torch.allclose(op2.dequantize(), x2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fallback", [False, True])
def test_reference_gemm_is_the_dequantized_product(shape: tuple[int, int, int], fallback: bool,
                                                   gen: torch.Generator) -> None:
    m, k, n = shape
    x = _inject(torch.randn(m, k, generator=gen), [(0, 0)], gen) if fallback else torch.randn(m, k, generator=gen)
    a = quantize_rows(x, "128x128", 6.0) if fallback else quantize_rows(x)
    b = quantize_rows(torch.randn(n, k, generator=gen))
    bias = torch.randn(n, generator=gen)
    out = reference_row_mm_nt(a, b, torch.float32, bias)
    exact = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t() + bias.double()
    assert rel_err(exact, out) < 1e-6
    assert torch.equal(out, int8_block_mm_nt(a, b, torch.float32, bias))  # the dispatcher takes the row GEMM
    floor = 32 if not fallback else 28  # dB vs the unquantized product; measured ~36-38 / ~31-35
    assert sqnr_db(x.double() @ b.dequantize(torch.float64).t() + bias.double(), out) > floor


@pytest.mark.parametrize("mode", ["none", "residual", "hp"])
def test_long_contraction_runs_in_chunks(mode: str, gen: torch.Generator) -> None:
    """K beyond INT32's reach (the weight gradient contracts over tokens) is summed in FP32 over K chunks; shown with
    small chunks (the real chunk is CHUNK_K = 133,120) against the dequantized product."""
    m, k, n = 200, 1000, 72
    x = _inject(torch.randn(m, k, generator=gen), [(0, 3), (1, 6)], gen)
    a = quantize_rows(x, "128x128", 6.0, mode=mode) if mode != "none" else quantize_rows(x)
    w = torch.randn(n, k, generator=gen)
    b = quantize_rows(w)
    bias = torch.randn(n, generator=gen)
    whole = reference_row_mm_nt(a, b, torch.float32, bias, b_hp=w)
    chunked = row_mm_chunked(_reference_row_mm, a, b, torch.float32, bias, w, chunk_k=256)
    assert rel_err(whole, chunked) < 1e-6  # FP32 summation order only
    if mode != "hp":
        exact = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t() + bias.double()
        assert rel_err(exact, chunked) < 1e-6
    with pytest.raises(ValueError, match="overflow the INT32 accumulator"):
        _reference_row_mm(quantize_rows(torch.ones(2, MAX_K + 1)), quantize_rows(torch.ones(2, MAX_K + 1)),
                          torch.float32)
    assert CHUNK_K <= MAX_K and CHUNK_K % 1024 == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"act_block": "row", "weight_block": "128x128"}, "both operands must be row-scaled"),
    ({"act_block": "1x128", "weight_block": "row"}, "both operands must be row-scaled"),
    ({"act_block": "row", "weight_block": "row", "fallback_threshold": 0.5}, "must be > 1"),
])
def test_row_config_errors_name_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Int8Config(**kwargs)


def test_yaml_config_trains_a_step() -> None:
    import lowbit_amp as amp

    cfg = amp.resolve_config("configs/int8_row.yaml")
    assert cfg.linear.int8.act_block == "row" and cfg.linear.int8.fallback_mode == "residual"
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = amp.initialize(model, opt, opt_level="configs/int8_row.yaml")
    loss = model(torch.randn(40, 64)).square().mean()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_row_kernel_in_interpreter_matches_reference() -> None:
    script = textwrap.dedent("""
        import copy, dataclasses, torch
        from lowbit_amp.int8.row_scaled import quantize_rows, reference_row_mm_nt
        from lowbit_amp.kernels.int8_row_gemm import ROW_CONFIGS, triton_row_mm_nt
        g = torch.Generator().manual_seed(0)
        for (m, k, n) in ((256, 384, 256), (200, 384, 264), (130, 260, 70)):
            x = torch.randn(m, k, generator=g).bfloat16()
            x[0:128:9, 140:160] *= 100
            w = torch.randn(n, k, generator=g)
            a = quantize_rows(x, "128x128", 6.0)
            assert int(a.flags.sum()) == 1
            wq = quantize_rows(w)
            bias = torch.randn(n, generator=g)
            for name in ("r256_w8_s4", "r256_w8_s4_1mma", "r256_w8_s4_1mma_g16", "r128_w4_s4",
                         "r128_w8_s3_split_ptr"):
                for tma in (True, False):
                    cfg = dataclasses.replace(ROW_CONFIGS[name], use_tma=tma)
                    # not hp: the interpreter multiplies bf16 tiles as their raw 16-bit integers (1e11-sized
                    # results); the GPU test covers it
                    strided = copy.copy(a)  # residual codes as a strided view: the fallback loses TMA, not the GEMM
                    strided.residual = copy.copy(a.residual)
                    strided.residual.q = a.residual.q.t().contiguous().t()
                    for op in (a, a.main, strided):
                        yr = reference_row_mm_nt(op, wq, torch.float32, bias=bias)
                        yt = triton_row_mm_nt(op, wq, torch.float32, bias=bias, config=cfg)
                        err = float((yr - yt).abs().max() / yr.abs().max())
                        assert err < 1e-6, (m, name, tma, err)
            # hp fallback: the interpreter's bf16 dot is wrong, so the 16-bit operands are given in fp32 here (the
            # fallback loop's logic is what is checked)
            hp = quantize_rows(x, "128x128", 6.0, mode="hp")
            hp.hp = x.float()
            for tma in (True, False):
                base = dataclasses.replace(ROW_CONFIGS["r256_w8_s4_1mma_g16"], use_tma=tma)
                y_hp = triton_row_mm_nt(hp, wq, torch.float32, bias=bias, config=base, b_hp=w)
                ref = reference_row_mm_nt(hp, wq, torch.float32, bias=bias, b_hp=w)
                assert float((ref - y_hp).abs().max() / ref.abs().max()) < 1e-2, (m, tma)
        print("ok")
    """)
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_row_kernel_serves_only_its_fallback_tile() -> None:
    """Other fallback tiles (e.g. 128x256) take the reference GEMM on CUDA instead of failing in the kernel launch."""
    from lowbit_amp.kernels.int8_row_gemm import row_kernel_supports

    x = torch.randn(256, 512)
    b = quantize_rows(torch.randn(64, 512))
    assert row_kernel_supports(quantize_rows(x, "128x128", 6.0), b)[0]
    ok, reason = row_kernel_supports(quantize_rows(x, "128x256", 6.0), b)
    assert not ok and "128x128" in reason
    assert not row_kernel_supports(quantize_rows(x, "64x128", 6.0), b)[0]


@pytest.mark.parametrize("block", ["row", "128x128", "1x128"])
def test_codes_are_row_major_for_transposed_inputs(block: str) -> None:
    """The INT8 GEMMs read codes with TMA (unit last stride): quantizing a transposed view (the row layout's Wᵀ, the
    weight gradient's xᵀ) must still give row-major codes — elementwise ops alone would keep the view's column-major
    strides and send the kernel to strided pointer loads."""
    w = torch.randn(300, 260, dtype=torch.bfloat16)
    blocks = quantize_blocks(w.t(), block)
    assert blocks.q.is_contiguous() and blocks.q.shape == (260, 300)
    torch.testing.assert_close(blocks.dequantize(), w.t().float(), rtol=0.02, atol=0.02 * float(w.abs().max()))
    fb = quantize_rows(w.t(), "128x128", 6.0)
    assert fb.main.q.is_contiguous()
