"""GPU-only: the Triton group cast of COAT's FP8 activation storage (lowbit_amp/kernels/group_cast.py) against the
reference ops on CUDA, bit for bit (codes, shifts, tensor scale, decoded values). Written 2026-12-01 without device
time; ``FUSED_GROUP_CAST`` in lowbit_amp/recipes/fp8_activations.py was turned on once this passed (H200, 2026-12-01, after a bf16 store fix). Skipped without
CUDA."""

from __future__ import annotations

import pytest
import torch

import lowbit_amp.recipes.fp8_activations as fa

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("numel", [37, 1000, 4096, 1 << 20])
@pytest.mark.parametrize("group_size", [16, 32])
def test_group_cast_on_cuda_is_bitwise_the_reference(dtype, numel, group_size, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lowbit_amp.kernels.group_cast import dequantize_into, quantize_flat

    gen = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=gen) * torch.logspace(-4, 3, numel)).to(dtype).cuda()
    monkeypatch.setattr(fa, "FUSED_GROUP_CAST", False)
    ref = fa.quantize_groups(x, group_size)
    back = fa.dequantize_groups(ref)
    codes, shifts, ts = quantize_flat(x, group_size)
    assert torch.equal(ts, ref.tensor_scale)
    assert torch.equal(shifts, ref.shifts)
    assert torch.equal(codes.view(torch.uint8), ref.codes.view(torch.uint8))
    out = torch.empty(codes.numel(), dtype=dtype, device="cuda")
    dequantize_into(codes, shifts, ts, out)
    assert torch.equal(out[:numel], back.reshape(-1))


@cuda
def test_recipe_entry_points_use_the_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    x = (torch.randn(4, 300, 64, device="cuda") * 3).bfloat16().transpose(1, 2)
    monkeypatch.setattr(fa, "FUSED_GROUP_CAST", False)
    ref = fa.quantize_groups(x, 16)
    monkeypatch.setattr(fa, "FUSED_GROUP_CAST", True)
    assert fa._fused_group_cast_serves(x, 16)
    packed = fa.quantize_groups(x, 16)
    assert torch.equal(packed.codes.view(torch.uint8), ref.codes.view(torch.uint8))
    assert torch.equal(fa.dequantize_groups(packed), fa.dequantize_groups(ref))
