"""The row-scaled INT8 GEMM kernel against its reference on the GPU (interpreter: test_row_scaled.py).

Tolerance: max abs error / max |reference| < 1e-6 (FP32 rounding order and FMA contraction only: the INT32 sums are
exact)."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.int8.row_scaled import quantize_rows, reference_row_mm_nt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton INT8 kernels need a CUDA GPU")


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("shape", [(256, 256, 128), (300, 520, 200), (1000, 1024, 384), (2048, 4096, 1024)])
@pytest.mark.parametrize("config", ["r256_w8_s4", "r256_w8_s4_one", "r128_w4_s4"])
def test_row_kernel_matches_reference(fallback: bool, shape: tuple[int, int, int], config: str) -> None:
    from lowbit_amp.kernels.int8_row_gemm import triton_row_mm_nt

    m, k, n = shape
    gen = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", generator=gen)
    x[: min(m, 128): 5, : min(k, 128): 9] *= 300.0
    x = x.bfloat16()
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.05
    bias = torch.randn(n, device="cuda", generator=gen)
    a = quantize_rows(x, "128x128", 6.0) if fallback else quantize_rows(x)
    if fallback:
        assert bool(a.flags.any())
    wq = quantize_rows(w)
    ref = reference_row_mm_nt(a, wq, torch.float32, bias=bias)
    out = triton_row_mm_nt(a, wq, torch.float32, bias=bias, config=config)
    assert float((ref - out).abs().max() / ref.abs().max()) < 1e-6
