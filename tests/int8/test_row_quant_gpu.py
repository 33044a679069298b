"""The fused row-scaled INT8 quantizer on the GPU against :func:`lowbit_amp.int8.row_scaled.quantize_rows` (the
interpreter test, test_row_quant_interp.py, requires equality everywhere).

Flags, codes and scales must be equal. The residual (inside flagged tiles) is expected equal too — the launch turns FMA
contraction off, so ``x - q · (1/s)`` rounds twice as torch does — but, as for the block quantizer's GPU test, up to
one code off in fewer than 1e-3 of the residual codes and a relative 1e-6 on the residual scales are accepted: this
checks what the interpreter cannot (the GPU's lowering of division, rounding and NaN handling)."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.int8.row_scaled import quantize_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton INT8 kernels need a CUDA GPU")


def _data(m: int, k: int, outliers: bool, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + k)
    x = torch.randn(m, k, device="cuda", generator=gen)
    if outliers:
        x[: min(m, 128): 5, : min(k, 128): 9] *= 300.0
        x[m // 2: m // 2 + 100: 3, k // 2: k // 2 + 40] *= 80.0
    return x.to(dtype)


def _compare(x: torch.Tensor, block_k: int, fallback: bool) -> int:
    from lowbit_amp.kernels.int8_row_quant import triton_quantize_rows

    tri = triton_quantize_rows(x, block_k, fallback, 6.0)
    if not fallback:
        ref = quantize_rows(x)
        assert torch.equal(ref.q, tri.q) and torch.equal(ref.scale, tri.scale)
        return 0
    ref = quantize_rows(x, f"128x{block_k}", 6.0)
    assert torch.equal(ref.flags, tri.flags)
    assert torch.equal(ref.main.q, tri.main.q) and torch.equal(ref.main.scale, tri.main.scale)
    torch.testing.assert_close(tri.residual.scale, ref.residual.scale, rtol=1e-6, atol=0.0)
    mask = ref.element_mask()
    diff = (ref.residual.q[mask].int() - tri.residual.q[mask].int()).abs()
    if diff.numel():
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    hp_ref = quantize_rows(x, f"128x{block_k}", 6.0, mode="hp")
    hp_tri = triton_quantize_rows(x, block_k, True, 6.0, mode="hp")
    assert torch.equal(hp_ref.flags, hp_tri.flags) and torch.equal(hp_ref.main.scale, hp_tri.main.scale)
    assert torch.equal(hp_ref.main.q, hp_tri.main.q)  # the fused hp zeroing (not yet GPU-verified when written)
    return int(ref.flags.sum())


@pytest.mark.parametrize("block_k", [64, 128, 256])
@pytest.mark.parametrize("shape", [(2048, 4096), (1000, 1000), (200, 300), (16384, 1024)])
def test_row_quantizer_matches_reference_on_gpu(shape: tuple[int, int], block_k: int) -> None:
    m, k = shape
    x = _data(m, k, True, torch.bfloat16)
    assert _compare(x, block_k, True) > 0
    _compare(x, block_k, False)
    gauss = _data(m, k, False, torch.float32)
    _compare(gauss, block_k, True)
    _compare(gauss, block_k, False)


def test_row_quantizer_special_values_on_gpu() -> None:
    """inf, NaN, all-zero rows: Triton's default max drops NaN on the GPU (the interpreter keeps it), so this is the
    check that the kernels' NaN-propagating amax and NaN -> 0 codes hold there."""
    x = _data(1000, 1000, True, torch.float32)
    x[5, :] = 0.0
    x[5, 0:9] = 700.0
    x[7, :] = 0.0
    x[11, 100] = float("inf")
    x[12, 50] = -float("inf")
    assert _compare(x, 128, True) > 0
    _compare(x, 128, False)
    x[300, 3] = float("nan")
    x[600, 700] = float("nan")
    _compare(x, 128, True)
    _compare(x, 128, False)
    _compare(x.t(), 64, True)  # non-contiguous


def test_row_weight_quantization_matches_reference_on_gpu() -> None:
    """The INT8 layer quantizes its row-scaled weight and the weight's transposed view with the fused quantizer: the
    same codes and scales as the reference, and row-major codes for the GEMM's TMA loads."""
    from lowbit_amp.config import Int8Config
    from lowbit_amp.int8.activation import quantize_weight
    from lowbit_amp.int8.block_quant import quantize_blocks

    w = _data(1000, 1496, True, torch.bfloat16)
    cfg = Int8Config(act_block="row", weight_block="row")
    for operand in (w, w.t()):
        fused, ref = quantize_weight(operand, cfg), quantize_blocks(operand, "row")
        assert fused.q.is_contiguous() and torch.equal(fused.q, ref.q) and torch.equal(fused.scale, ref.scale)


@pytest.mark.parametrize("shape", [(8192, 4096), (8192, 14336), (1000, 1000), (300, 2100)])
def test_row_quantizer_k_split_on_transposed_views_on_gpu(shape: tuple[int, int]) -> None:
    """The weight gradient's operands (xᵀ, dyᵀ: transposed views of row-major activations) take the K-split pass 2
    (``_use_split``) with no fallback and hp: codes, scales and flags equal the reference's."""
    from lowbit_amp.kernels.int8_row_quant import _use_split, triton_quantize_rows

    xt = _data(*shape, True, torch.bfloat16).t()
    assert _use_split(xt, True, "hp", None) and _use_split(xt, False, "hp", None)
    tri = triton_quantize_rows(xt, 128, False, 6.0)
    ref = quantize_rows(xt)
    assert torch.equal(ref.q, tri.q) and torch.equal(ref.scale, tri.scale)
    hp_tri = triton_quantize_rows(xt, 128, True, 6.0, mode="hp")
    hp_ref = quantize_rows(xt, "128x128", 6.0, mode="hp")
    assert torch.equal(hp_ref.flags, hp_tri.flags) and bool(hp_ref.flags.any())
    assert torch.equal(hp_ref.main.scale, hp_tri.main.scale) and torch.equal(hp_ref.main.q, hp_tri.main.q)


@pytest.mark.parametrize("mode", ["residual", "hp"])
def test_row_quantizer_with_given_flags_on_gpu(mode: str) -> None:
    """The weight gradient's xᵀ with the forward's flags of x, transposed (a transposed bool view read by the kernels
    through its strides): the reference's codes, scales and flags, with no detection."""
    from lowbit_amp.kernels.int8_row_quant import triton_quantize_rows

    x = _data(8192, 4096, True, torch.bfloat16)
    fwd = triton_quantize_rows(x, 128, True, 6.0, mode=mode)
    tri = triton_quantize_rows(x.t(), 128, True, 6.0, mode=mode, flags=fwd.flags.t())
    ref = quantize_rows(x.t(), "128x128", 6.0, mode=mode)
    assert bool(ref.flags.any()) and torch.equal(ref.flags, tri.flags)
    assert torch.equal(ref.main.q, tri.main.q) and torch.equal(ref.main.scale, tri.main.scale)
