"""``torch._scaled_mm`` (tensor cores) as an opaque ``torch.library`` op for compiled graphs.

Why: under ``torch.compile`` Inductor lowers ``aten._scaled_mm`` itself and may pick its Triton scaled-mm template;
that lowering rejects FP8 operands produced by an opaque kernel (our ``lowbit_amp::fp8_cast``) with an assertion in
its size checks (torch 2.11, H200, 2026-12-01: ``LoweringException ... sizevars.check_equals``). Without
max-autotune it would call cuBLAS anyway, so hiding the call behind an op of our own costs nothing and runs exactly
the GEMM eager runs (same cuBLAS kernel, same bits). Eager calls ``torch._scaled_mm`` directly.
"""

from __future__ import annotations

import torch

__all__ = ["scaled_mm_nt"]


# Registered like lowbit_amp::fp8_cast (a plain Library definition, no custom_op autograd wrapper: ~20 us less host
# time per call; see lowbit_amp/kernels/fp8_cast_op.py).
_LIB = torch.library.Library("lowbit_amp", "FRAGMENT")
_LIB.define("scaled_mm_nt(Tensor a, Tensor b, Tensor scale_a_inv, Tensor scale_b_inv, Tensor? bias, "
            "ScalarType out_dtype, bool fast_accum) -> Tensor")


def scaled_mm_nt(
    a: torch.Tensor, b: torch.Tensor, scale_a_inv: torch.Tensor, scale_b_inv: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool,
) -> torch.Tensor:
    """``(a · scale_a_inv) @ (b · scale_b_inv)ᵀ + bias``: ``a (M, K)``, ``b (N, K)``, both row-major FP8."""
    return torch._scaled_mm(a, b.t(), scale_a=scale_a_inv, scale_b=scale_b_inv, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


_LIB.impl("scaled_mm_nt", scaled_mm_nt, "CUDA")


@torch.library.register_fake("lowbit_amp::scaled_mm_nt", lib=_LIB)
def _scaled_mm_nt_fake(a, b, scale_a_inv, scale_b_inv, bias, out_dtype, fast_accum):  # type: ignore[no-untyped-def]
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
