"""The Triton INT8 kernels against the reference (GPU only; the CPU interpreter test is in test_train_int8.py).

Tolerances: codes/scales/flags bit-equal; GEMM rel. error (Frobenius) < 1e-6 without fallback and with residual fallback
(FP32 summation order only: the kernel sums the fallback terms first and multiplies by the combined scale once);
< 1e-4 with hp fallback (bf16 tensor-core products summed in another order)."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.int8.block_quant import quantize_blocks
from lowbit_amp.int8.fallback import quantize_with_fallback
from lowbit_amp.int8.reference_gemm import reference_block_mm_nt
from lowbit_amp.quant.metrics import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton INT8 kernels need a CUDA GPU")


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen)
    x[: min(m, 128): 5, : min(k, 128): 9] *= 300.0  # spikes in the first tile: it falls back
    return x.bfloat16()


@pytest.mark.parametrize("mode", ["none", "residual", "hp"])
@pytest.mark.parametrize("shape", [(256, 256, 128), (300, 520, 200), (1000, 1024, 384)])
@pytest.mark.parametrize("weight_block", ["128x128", "1x128"])
def test_triton_matches_reference(mode: str, shape: tuple[int, int, int], weight_block: str) -> None:
    from lowbit_amp.kernels.int8_gemm import triton_block_mm_nt, triton_quantize_act

    m, k, n = shape
    x = _x(m, k, seed=m + k)
    w = torch.randn(n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(n)) * 0.05
    bias = torch.randn(n, device="cuda")
    fallback = mode != "none"
    tri = triton_quantize_act(x, 128, fallback, 6.0, mode if fallback else "residual")
    if fallback:
        ref = quantize_with_fallback(x, "1x128", "128x128", 6.0, mode)
        assert torch.equal(tri.flags, ref.flags) and bool(ref.flags.any())
        assert torch.equal(tri.main.q, ref.main.q) and torch.equal(tri.main.scale, ref.main.scale)
        if mode == "residual":
            mask = ref.element_mask()
            mismatch = (tri.residual.q[mask].int() - ref.residual.q[mask].int()).abs()
            assert int(mismatch.max()) <= 1 and float((mismatch > 0).float().mean()) < 1e-3  # FMA contraction only
    else:
        ref = quantize_blocks(x, "1x128")
        assert torch.equal(tri.q, ref.q) and torch.equal(tri.scale, ref.scale)
    wq = quantize_blocks(w, weight_block)
    y_ref = reference_block_mm_nt(ref, wq, torch.float32, bias=bias, b_hp=w)
    y_tri = triton_block_mm_nt(ref, wq, torch.float32, bias=bias, b_hp=w)  # same operand: isolates the GEMM
    tol = 1e-6 if mode != "hp" else 1e-4  # fp32 rounding order only; hp: bf16 tensor-core sums in another order
    assert rel_err(y_ref, y_tri) < tol
    y_bf16 = triton_block_mm_nt(tri, wq, torch.bfloat16, bias=bias, b_hp=w)
    assert rel_err(y_ref, y_bf16) < 1e-2


@pytest.mark.parametrize("name", ["n256_w8_s3", "n256_w8_s4", "n128_w4_s3", "n128_w8_s3_r128", "n128_w4_s3_magic",
                                  "interleave", "ptr"])
def test_every_config_matches_reference(name: str) -> None:
    """Every entry of the config table (and the pointer-load variant) on one TMA-eligible shape, with fallback."""
    import dataclasses

    from lowbit_amp.kernels.int8_gemm import CONFIGS, DEFAULT_CONFIG, triton_block_mm_nt

    extra = {"ptr": {"use_tma": False}, "interleave": {"interleave": True, "maxnreg": 128, "block_n": 128}}
    cfg = dataclasses.replace(CONFIGS[DEFAULT_CONFIG], **extra[name]) if name in extra else CONFIGS[name]
    m, k, n = 384, 512, 512
    x = _x(m, k, seed=1)
    w = torch.randn(n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)) * 0.05
    wq = quantize_blocks(w, "128x128")
    for mode in ("residual", "hp"):
        ref = quantize_with_fallback(x, "1x128", "128x128", 6.0, mode)
        assert bool(ref.flags.any())
        y_ref = reference_block_mm_nt(ref, wq, torch.float32, b_hp=w)
        y_tri = triton_block_mm_nt(ref, wq, torch.float32, b_hp=w, config=cfg)
        assert rel_err(y_ref, y_tri) < (1e-6 if mode == "residual" else 1e-4), (name, mode)
    y_ref = reference_block_mm_nt(ref.main, wq, torch.float32)
    assert rel_err(y_ref, triton_block_mm_nt(ref.main, wq, torch.float32, config=cfg)) < 1e-6


def test_block_kernel_with_strided_hp_operands() -> None:
    """The weight gradient's hp operands are transposed views; the launcher copies them contiguous so that TMA stays
    on (written 2026-12-02 without device time)."""
    from lowbit_amp.kernels.int8_gemm import triton_block_mm_nt

    x = _x(768, 1024, seed=3).t().contiguous().t()  # (768, 1024) values in column-major storage
    w = (torch.randn(512, 1024, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4)) * 0.05)
    w = w.bfloat16().t().contiguous().t()
    a = quantize_with_fallback(x, "1x128", "128x128", 6.0, "hp")
    assert bool(a.flags.any()) and not a.hp.is_contiguous()
    wq = quantize_blocks(w, "128x128")
    ref = reference_block_mm_nt(a, wq, torch.float32, b_hp=w)
    assert rel_err(ref, triton_block_mm_nt(a, wq, torch.float32, b_hp=w)) < 1e-4
