"""GPU-only: the FP8 weight-gradient encode through the fused cast kernel against the reference ops, bit for bit
(codes and scale), and without full-size temporaries (the reason it exists: lowbit_amp/grads/fp8_grad.encode_fp8).
Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit_amp.grads.fp8_grad as fp8_grad
from lowbit_amp.formats import E4M3, E5M2
from lowbit_amp.quant.cast import compute_scale, quantize
from lowbit_amp.quant.granularity import amax

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fused_encode_on(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(fp8_grad, "FUSED_ENCODE", True)  # measured here whatever the shipped default is


def _reference(hp: torch.Tensor, fmt):  # type: ignore[no-untyped-def]
    current = amax(hp)
    scale = torch.where(current < math.inf, compute_scale(current, fmt), math.nan)
    return quantize(hp, scale, fmt), scale


@cuda
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(256, 512), (37, 100), (1, 17), (3, 5, 48)])
def test_fused_encode_is_bitwise_the_reference(fmt, dtype, shape) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(sum(shape))
    hp = (torch.randn(*shape, generator=gen) * torch.logspace(-5, 3, shape[-1])).to(dtype).cuda()
    assert fp8_grad._fused_encode_serves(hp, fmt)
    codes, scale = fp8_grad.encode_fp8(hp, fmt)
    ref_codes, ref_scale = _reference(hp, fmt)
    assert codes.shape == hp.shape and codes.dtype == fmt.dtype
    assert torch.equal(scale, ref_scale), (scale, ref_scale)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


@cuda
def test_fused_encode_zero_and_nonfinite() -> None:
    zeros = torch.zeros(64, 64, device="cuda")
    codes, scale = fp8_grad.encode_fp8(zeros, E4M3)
    assert float(scale) == 1.0 and not codes.view(torch.uint8).any()
    for bad in (float("nan"), float("inf"), -float("inf")):
        hp = torch.randn(64, 64, device="cuda")
        hp[3, 7] = bad
        _, scale = fp8_grad.encode_fp8(hp, E4M3)
        assert math.isnan(float(scale)), bad  # the mark every consumer checks (see fp8_grad's module docstring)


@cuda
def test_fused_encode_allocates_no_full_size_temporary() -> None:
    hp = torch.randn(4096, 4096, device="cuda")  # 64 MiB of FP32
    fp8_grad.encode_fp8(hp, E4M3)  # compile/warm
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    codes, scale = fp8_grad.encode_fp8(hp, E4M3)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # the FP8 codes (16 MiB) plus a few scalars; the reference path allocates two FP32 copies (128 MiB) on top
    assert extra < codes.numel() + 2**20, extra / 2**20
