"""The fewer-op INT8 reference helpers give the same bits as the core-library formulas they replaced.

Why: block_quant / fallback / reference_gemm expand per-block values with one copy (expand_blocks) instead of
expand_scale's two repeat_interleave calls, and pass quantize() a pre-expanded scale, to cut ATen ops per INT8
training step (tests/test_host_overhead.py); the INT8 numerics must not move by a bit.
"""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.formats import INT8
from lowbit_amp.int8 import quantize_blocks, quantize_with_fallback
from lowbit_amp.int8.block_quant import expand_blocks
from lowbit_amp.quant.cast import compute_scale, quantize
from lowbit_amp.quant.granularity import Granularity, amax, expand_scale

_BLOCKS = ["1x32", "1x128", "128x128", "16x8", "3x5", "1x1", "7x1"]


@pytest.mark.parametrize("shape", [(200, 96), (17, 33), (1, 5), (256, 128)])
@pytest.mark.parametrize("block", _BLOCKS)
def test_expand_blocks_matches_expand_scale(shape: tuple[int, int], block: str) -> None:
    gran = Granularity.parse(block)
    per_block = torch.randn(*gran.scale_shape(*shape), generator=torch.Generator().manual_seed(0))
    assert torch.equal(expand_blocks(per_block, *shape, gran), expand_scale(per_block, shape, gran))
    flags = per_block > 0.5
    assert torch.equal(expand_blocks(flags, *shape, gran), expand_scale(flags.float(), shape, gran) > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("block", _BLOCKS)
def test_quantize_blocks_matches_the_core_formula(dtype: torch.dtype, rounding: str, block: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(130, 70, generator=g) * torch.rand(130, 1, generator=g) * 50).to(dtype)
    x[3, :] = 0
    x[5, 7] = float("inf")
    x[9, 1] = float("nan")
    x[11, 2] = 1e-40
    got = quantize_blocks(x, block, rounding, torch.Generator().manual_seed(2))
    scale = compute_scale(amax(x, block), INT8)
    want = quantize(x, scale, INT8, block, rounding=rounding, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got.scale, scale) and torch.equal(got.q, want)


@pytest.mark.parametrize("mode", ["residual", "hp"])
def test_fallback_mask_and_hp_codes_match_the_core_formula(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 260, generator=g).bfloat16()
    x[0:128:9, 140:160] *= 100
    a = quantize_with_fallback(x, "1x128", "128x128", 6.0, mode)
    assert int(a.flags.sum()) == 1
    mask = expand_scale(a.flags.float(), x.shape, a.tile) > 0
    assert torch.equal(a.element_mask(), mask)
    if mode == "hp":
        plain = quantize_blocks(x, "1x128")
        assert torch.equal(a.main.q, torch.where(mask, torch.zeros_like(plain.q), plain.q))
