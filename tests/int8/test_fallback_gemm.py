"""Outlier-tile detection, the two fallback representations, and the reference INT8 GEMM's SQNR floors."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.config import ConfigError, Int8Config
from lowbit_amp.int8 import int8_block_mm_nt, int_mm_nt, quantize_blocks, quantize_with_fallback
from lowbit_amp.quant.metrics import rel_err, sqnr_db

SHAPES = [(128, 256, 128), (200, 520, 72), (33, 100, 17)]  # (M, K, N): multiples and non-multiples of 16 / 128


def _inject(x: torch.Tensor, tiles: list[tuple[int, int]], gen: torch.Generator, factor: float = 200.0) -> torch.Tensor:
    """Spikes (a few elements x factor) in the given 128x128 tiles: the block outliers of SwiGLU outputs."""
    x = x.clone()
    for ti, tj in tiles:
        block = x[ti * 128:(ti + 1) * 128, tj * 128:(tj + 1) * 128]
        spikes = torch.rand(block.shape, generator=gen) < 0.02
        block[spikes] *= factor
    return x


@pytest.mark.parametrize("shape", [(256, 512), (300, 1000), (1024, 256)])
def test_no_fallback_on_gaussian(shape: tuple[int, int], gen: torch.Generator) -> None:
    for _ in range(3):
        op = quantize_with_fallback(torch.randn(shape, generator=gen), "1x128", "128x128", 6.0)
        assert not bool(op.flags.any())


@pytest.mark.parametrize("mode", ["residual", "hp"])
def test_fallback_flags_exactly_the_injected_tiles(mode: str, gen: torch.Generator) -> None:
    x = _inject(torch.randn(384, 520, generator=gen), [(0, 1), (2, 4), (1, 0)], gen)
    op = quantize_with_fallback(x, "1x128", "128x128", 6.0, mode)
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[0, 1] = expected[2, 4] = expected[1, 0] = True
    assert torch.equal(op.flags, expected)
    assert abs(float(op.fraction) - 3 / 15) < 1e-7
    mask = op.element_mask()
    plain = quantize_blocks(x, "1x128").dequantize()
    rep = op.dequantize()
    # the outlier tiles are represented far better than by one INT8 term; the other tiles are unchanged
    assert sqnr_db(x[mask], rep[mask]) > sqnr_db(x[mask], plain[mask]) + (40 if mode == "residual" else 20)
    assert torch.equal(rep[~mask], plain[~mask])


def test_mostly_zero_tensor_never_falls_back() -> None:
    x = torch.zeros(256, 256)
    x[0, 0] = 5.0
    assert not bool(quantize_with_fallback(x, "1x128", "128x128", 6.0).flags.any())


def test_int_mm_nt_is_exact(gen: torch.Generator) -> None:
    a = torch.randint(-127, 128, (33, 100), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (17, 100), generator=gen, dtype=torch.int8)
    assert torch.equal(int_mm_nt(a, b).long(), a.long() @ b.long().t())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_block", ["128x128", "1x128"])
def test_gemm_equals_product_of_dequantized_operands(shape: tuple[int, int, int], weight_block: str,
                                                     gen: torch.Generator) -> None:
    m, k, n = shape
    a = quantize_with_fallback(_inject(torch.randn(m, k, generator=gen), [(0, 0)], gen), "1x128", "128x128", 6.0)
    b = quantize_blocks(torch.randn(n, k, generator=gen), weight_block)
    bias = torch.randn(n, generator=gen)
    exact = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t() + bias.double()
    assert rel_err(exact, int8_block_mm_nt(a, b, torch.float32, bias)) < 1e-6  # INT32 sums exact; fp32 epilogue


@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_sqnr_floors(shape: tuple[int, int, int], gen: torch.Generator) -> None:
    m, k, n = shape
    w = torch.randn(n, k, generator=gen)
    wq = quantize_blocks(w, "128x128")
    x = torch.randn(m, k, generator=gen)
    ref = x.double() @ w.double().t()
    # Gaussian data: ~39 dB measured with 1x128 / 128x128 blocks; fallback does not trigger
    assert sqnr_db(ref, int8_block_mm_nt(quantize_blocks(x, "1x128"), wq, torch.float32)) > 33
    if m <= 128 and k <= 128:
        return  # one tile: it is its own median, nothing to fall back relative to
    xo = _inject(x, [(0, 0)], gen)
    ref = xo.double() @ w.double().t()
    plain = sqnr_db(ref, int8_block_mm_nt(quantize_blocks(xo, "1x128"), wq, torch.float32))
    res = sqnr_db(ref, int8_block_mm_nt(quantize_with_fallback(xo, "1x128", "128x128", 6.0, "residual"), wq,
                                        torch.float32))
    hp = sqnr_db(ref, int8_block_mm_nt(quantize_with_fallback(xo, "1x128", "128x128", 6.0, "hp"), wq, torch.float32,
                                       b_hp=w))
    assert res > plain + 1 and hp > plain + 6 and hp > 40, (plain, res, hp)


def test_hp_mode_needs_the_16_bit_operand(gen: torch.Generator) -> None:
    a = quantize_with_fallback(_inject(torch.randn(128, 128, generator=gen), [(0, 0)], gen), "1x128", "128x128",
                               6.0, "hp")
    with pytest.raises(ValueError, match="b_hp"):
        int8_block_mm_nt(a, quantize_blocks(torch.randn(16, 128), "128x128"), torch.float32)


def test_config_validation_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="share the K block"):
        Int8Config(act_block="1x64", weight_block="128x128")
    with pytest.raises(ConfigError, match="fallback_block"):
        Int8Config(act_block="1x128", weight_block="128x128", fallback_block="128x64")
    with pytest.raises(ConfigError, match="fallback_threshold"):
        Int8Config(fallback_threshold=0.5)
    with pytest.raises(ConfigError, match="not one of"):
        from lowbit_amp.config import config_from_dict

        config_from_dict({"linear": {"int8": {"fallback_mode": "fp16"}}})
