"""Block/row amax and block-scaled casts against a straightforward per-block loop."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit_amp.formats import E4M3
from lowbit_amp.quant.cast import compute_scale, dequantize, quantize
from lowbit_amp.quant.granularity import Granularity, amax
from lowbit_amp.quant.metrics import sqnr_db

SHAPES = [(64, 256), (37, 100), (130, 129), (1, 7)]
GRANS = ["row", "1x128", "128x128", "32x32", "4x16"]


def loop_amax(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    rows, cols = x.shape
    br, bc = g.block_shape(rows, cols)
    out = torch.empty(math.ceil(rows / br), math.ceil(cols / bc))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max()
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", GRANS)
def test_block_amax_matches_loop(shape, spec, gen) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(shape, generator=gen)
    g = Granularity.parse(spec)
    got = amax(x, g)
    assert got.shape == g.scale_shape(*shape)
    assert torch.equal(got, loop_amax(x, g))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", GRANS)
def test_block_quantize_uses_each_blocks_own_scale(shape, spec, gen) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(shape, generator=gen)
    x[0, 0] = 1e4  # one huge value must only coarsen its own block
    g = Granularity.parse(spec)
    scale = compute_scale(amax(x, g), E4M3)
    back = dequantize(quantize(x, scale, E4M3, g), scale, torch.float64, g)
    br, bc = g.block_shape(*shape)
    rest = x.clone()
    rest[:br, :bc] = 0
    rest_back = back.clone()
    rest_back[:br, :bc] = 0
    if rest.abs().sum() > 0:
        assert sqnr_db(rest, rest_back) > 29.0  # the other blocks keep full E4M3 precision (~31 dB)


def test_nan_propagates_into_amax() -> None:
    x = torch.ones(4, 8)
    x[1, 3] = float("nan")
    assert math.isnan(amax(x).item())
    rowwise = amax(x, "row")
    assert math.isnan(rowwise[1, 0].item()) and rowwise[0, 0].item() == 1.0


def test_bad_granularity_message() -> None:
    with pytest.raises(ValueError, match="'1x128'"):
        Granularity.parse("per_block")
    with pytest.raises(ValueError, match="positive"):
        Granularity.parse("0x128")
