"""Block-wise INT8 quantization against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit_amp.int8.block_quant import quantize_blocks
from lowbit_amp.quant.granularity import Granularity


def _blocks64(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """Per-block amax in float64, by explicit loops over blocks (independent of the library's reshapes)."""
    rows, cols = x.shape
    out = torch.empty(math.ceil(rows / br), math.ceil(cols / bc), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].double().abs().max()
    return out


@pytest.mark.parametrize("shape", [(64, 256), (37, 200), (130, 129)])
@pytest.mark.parametrize("block", ["1x128", "128x128", "32x32"])
def test_scales_codes_and_round_trip_vs_float64(shape: tuple[int, int], block: str, gen: torch.Generator) -> None:
    x = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 10
    g = Granularity.parse(block)
    out = quantize_blocks(x, g)
    amax64 = _blocks64(x, g.rows, g.cols)  # type: ignore[arg-type]
    scale64 = 127.0 / amax64
    assert out.scale.shape == amax64.shape
    assert torch.allclose(out.scale.double(), scale64, rtol=2e-7, atol=0)  # fp32 rounding of 127/amax
    full_scale = out.scale.double().repeat_interleave(g.rows, 0).repeat_interleave(g.cols, 1)[: shape[0], : shape[1]]
    codes64 = torch.round(x.double() * full_scale).clamp(-127, 127)
    diff = (out.q.double() - codes64).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # only exact ties may round differently in fp32
    assert out.q.abs().max() <= 127
    # round trip: every element within half a step of its block's grid, i.e. |x - q/scale| <= 0.5/scale (+ fp32 slack)
    err = (out.dequantize().double() - x.double()).abs()
    assert bool((err <= 0.5 / full_scale * (1 + 1e-5) + 1e-12).all())
    # each block's amax maps to exactly ±127
    assert bool((out.q.abs().double().amax() == 127))


def test_zero_block_and_bad_input() -> None:
    x = torch.zeros(4, 256)
    x[:, 128:] = 1.0
    out = quantize_blocks(x, "1x128")
    assert torch.equal(out.scale[:, 0], torch.ones(4)) and bool((out.q[:, :128] == 0).all())
    with pytest.raises(ValueError, match="2-D"):
        quantize_blocks(torch.zeros(8), "1x128")
    with pytest.raises(ValueError, match="Unknown scaling granularity"):
        quantize_blocks(x, "blocky")


def test_stochastic_rounding_is_unbiased(gen: torch.Generator) -> None:
    base = torch.randn(4, 128, generator=gen)
    reps = 500
    x = base.repeat(reps, 1)  # every replica has the same block scales
    out = quantize_blocks(x, "1x128", rounding="stochastic", generator=gen)
    mean = out.dequantize().reshape(reps, 4, 128).mean(0)
    step = 1.0 / out.scale[:4]  # one grid step per row block
    # per-element SR error is within one step with std <= step/2: the mean of 500 is within 5 sigma of x
    assert bool(((mean - base).abs() <= 5 * 0.5 * step / math.sqrt(reps)).all())
    nearest = quantize_blocks(x, "1x128")
    assert not torch.equal(out.q, nearest.q)  # it did round stochastically
