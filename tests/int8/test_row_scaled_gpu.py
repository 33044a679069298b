"""The row-scaled INT8 GEMM kernel against its reference on the GPU (interpreter: test_row_scaled.py).

Tolerance: max abs error / max |reference| < 1e-6 (FP32 rounding order and FMA contraction only: the INT32 sums are
exact); hp fallback < 1e-4 (bf16 tensor-core products summed in another order)."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.int8.row_scaled import quantize_rows, reference_row_mm_nt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton INT8 kernels need a CUDA GPU")


@pytest.mark.parametrize("fallback", ["none", "residual", "hp"])
@pytest.mark.parametrize("shape", [(256, 256, 128), (300, 520, 200), (1000, 1024, 384), (2048, 4096, 1024)])
@pytest.mark.parametrize("config", ["r256_w8_s4", "r256_w8_s4_one", "r256_w8_s4_1mma", "r256_w8_s4_1mma_g16",
                                    "r128_w4_s4", "r128_w8_s3_split_ptr"])
def test_row_kernel_matches_reference(fallback: str, shape: tuple[int, int, int], config: str) -> None:
    from lowbit_amp.kernels.int8_row_gemm import triton_row_mm_nt

    m, k, n = shape
    gen = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", generator=gen)
    x[: min(m, 128): 5, : min(k, 128): 9] *= 300.0
    x = x.bfloat16()
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.05
    bias = torch.randn(n, device="cuda", generator=gen)
    a = quantize_rows(x, "128x128", 6.0, mode=fallback) if fallback != "none" else quantize_rows(x)
    if fallback != "none":
        assert bool(a.flags.any())
    wq = quantize_rows(w)
    ref = reference_row_mm_nt(a, wq, torch.float32, bias=bias, b_hp=w)
    out = triton_row_mm_nt(a, wq, torch.float32, bias=bias, config=config, b_hp=w)
    tol = 1e-6 if fallback != "hp" else 1e-4  # hp: bf16 tensor-core sums in another order (as the block kernel's)
    assert float((ref - out).abs().max() / ref.abs().max()) < tol
    if x.shape[0] >= 1000:  # the fused quantizer: the same codes as the reference (see test_row_quant_gpu.py)
        from lowbit_amp.config import Int8Config
        from lowbit_amp.int8.activation import quantize_act

        cfg = Int8Config(act_block="row", weight_block="row", fallback=fallback != "none",
                         fallback_mode=fallback if fallback != "none" else "hp")
        fused = quantize_act(x, cfg, fallback != "none")
        main_f = fused.main if fallback != "none" else fused
        main_r = a.main if fallback != "none" else a
        assert torch.equal(main_f.scale, main_r.scale) and torch.equal(main_f.q, main_r.q)


@pytest.mark.parametrize("fallback", ["none", "residual", "hp"])
def test_row_kernel_in_k_chunks_matches_reference(fallback: str) -> None:
    """Contractions beyond INT32's reach run in K chunks (column views of the codes: offset TMA descriptors); shown
    with 1024-wide chunks against the reference's chunked sum."""
    from lowbit_amp.int8.row_scaled import row_mm_chunked
    from lowbit_amp.kernels.int8_row_gemm import triton_row_mm_nt

    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(512, 4096, device="cuda", generator=gen)
    x[:128:5, 1024:1152:9] *= 300.0
    x = x.bfloat16()
    w = torch.randn(384, 4096, device="cuda", generator=gen) * 0.05
    a = quantize_rows(x, "128x128", 6.0, mode=fallback) if fallback != "none" else quantize_rows(x)
    wq = quantize_rows(w)
    ref = reference_row_mm_nt(a, wq, torch.float32, b_hp=w)
    out = row_mm_chunked(lambda a_, b_, dt, bias_, hp_: triton_row_mm_nt(a_, b_, dt, bias_, b_hp=hp_), a, wq,
                         torch.float32, None, w, chunk_k=1024)
    tol = 1e-6 if fallback != "hp" else 1e-4
    assert float((ref - out).abs().max() / ref.abs().max()) < tol


def test_row_kernel_with_strided_hp_operands() -> None:
    """The weight gradient's hp operands are transposed views: the fallback takes pointer loads (FB_TMA off) while the
    main loop keeps TMA (ptxas sm_90: 160 B of stack in that variant)."""
    from lowbit_amp.kernels.int8_row_gemm import triton_row_mm_nt

    gen = torch.Generator(device="cuda").manual_seed(9)
    x_t = torch.randn(1024, 768, device="cuda", generator=gen)
    x_t[:128:5, 256:384:9] *= 300.0
    x = x_t.bfloat16().t().contiguous().t()  # (1024, 768) values, column-major storage: a strided view
    w = (torch.randn(512, 768, device="cuda", generator=gen) * 0.05).bfloat16().t().contiguous().t()
    a = quantize_rows(x, "128x128", 6.0, mode="hp")
    assert bool(a.flags.any()) and not a.hp.is_contiguous()
    wq = quantize_rows(w)
    ref = reference_row_mm_nt(a, wq, torch.float32, b_hp=w)
    out = triton_row_mm_nt(a, wq, torch.float32, b_hp=w)
    assert float((ref - out).abs().max() / ref.abs().max()) < 1e-4
