"""Triton backward of ``act(a) * b`` (SiLU, GELU, tanh-GELU) from the FP8 group codes of ``a`` and ``b``
(:mod:`lowbit_amp.recipes.fp8_glu`).

Why: decoding both saved inputs to the model dtype before the elementwise gradients costs two full-size tensors of
transient memory at the step's peak (448 MiB on the issue-7 anchor) and ~3 passes over memory; here each program
decodes its groups in registers (``code * (S * 2^k)^-1``, the inverse formed in float64 and rounded once, as
:func:`lowbit_amp.recipes.fp8_activations.dequantize_groups`), computes both gradients in FP32 and rounds each once to
the gradient's dtype. Traffic per element: 2 bytes of gradient in, 2 code bytes in, 4 bytes of gradients out (bf16).

Numerics: the same FP32 formulas as :func:`lowbit_amp.recipes.fp8_glu.glu_backward_reference` (its ``_act_parts``:
written without cancellation); exp and erf are the hardware's, so the two agree to a few FP32 ulps before the final
rounding, not bit for bit (tests: interpreter tests/recipes/test_fp8_glu.py, GPU tests/gpu/test_fp8_glu_gpu.py).
Imports Triton at module level: imported only when the fused path serves.
"""

import torch
import triton
import triton.language as tl

from lowbit_amp.kernels.group_cast import GROUPS_PER_PROGRAM, OUT_KINDS, decode_groups, store_rounded


@triton.jit
def _act_parts(a, ACT: tl.constexpr):
    """``act(a), act'(a)`` in FP32; ACT 0 SiLU, 1 GELU (erf), 2 tanh-GELU — the reference's formulas."""
    if ACT == 0:
        e = tl.exp(-a)
        sig = 1.0 / (1.0 + e)
        one_minus = tl.where(a >= 0.0, e * sig, 1.0 - sig)
        return a * sig, sig * (1.0 + a * one_minus)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        return a * cdf, cdf + a * (tl.exp(-0.5 * a * a) * 0.3989422804014327)
    else:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        e = tl.exp(-2.0 * tl.abs(u))
        inv = 1.0 / (1.0 + e)
        one_plus_t = tl.where(u >= 0.0, 2.0 * inv, 2.0 * e * inv)
        sech2 = 4.0 * e * inv * inv
        return 0.5 * a * one_plus_t, 0.5 * one_plus_t + 0.5 * a * sech2 * (0.7978845608028654 * (1.0 + 0.134145 * a * a))


@triton.jit
def glu_backward_kernel(grad_ptr, a_codes, a_shifts, a_scale, b_codes, b_shifts, b_scale, ga_ptr, gb_ptr, numel,
                        n_groups, GS: tl.constexpr, GB: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
                        ACT: tl.constexpr, OUT_KIND: tl.constexpr, HW_FP8: tl.constexpr):
    pid = tl.program_id(0)
    g = pid * GB + tl.arange(0, GB)
    g_ok = g < n_groups
    offs = g[:, None] * GS + tl.arange(0, GS)[None, :]
    in_t = offs < numel
    grad = tl.load(grad_ptr + offs, mask=in_t, other=0.0).to(tl.float32)
    a = decode_groups(a_codes, a_shifts, a_scale, g, g_ok, offs, HW_FP8)
    act, dact = _act_parts(a, ACT)
    if NEED_A:
        b = decode_groups(b_codes, b_shifts, b_scale, g, g_ok, offs, HW_FP8)
        store_rounded(ga_ptr, offs, grad * b * dact, in_t, OUT_KIND)
    if NEED_B:
        store_rounded(gb_ptr, offs, grad * act, in_t, OUT_KIND)


_ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def glu_backward_packed(grad: torch.Tensor, pa, pb, need_a: bool = True, need_b: bool = True, act: str = "silu"):  # type: ignore[no-untyped-def]
    """``(grad_a, grad_b)`` (None where not needed) of ``act(a) * b`` for a contiguous ``grad`` and the
    :class:`~lowbit_amp.recipes.fp8_activations.PackedActivation` of ``a`` and ``b`` (contiguous, same group size)."""
    n_groups, group_size = pa.codes.shape
    numel = grad.numel()
    hw = grad.device.type == "cuda"
    ga = torch.empty_like(grad) if need_a else None
    gb = torch.empty_like(grad) if need_b else None
    a_codes = pa.codes if hw else pa.codes.view(torch.uint8)
    b_codes = pb.codes if hw else pb.codes.view(torch.uint8)
    grid = (triton.cdiv(n_groups, GROUPS_PER_PROGRAM),)
    glu_backward_kernel[grid](grad, a_codes, pa.shifts, pa.tensor_scale, b_codes, pb.shifts, pb.tensor_scale,
                              ga if ga is not None else grad, gb if gb is not None else grad, numel, n_groups,
                              GS=group_size, GB=GROUPS_PER_PROGRAM, NEED_A=need_a, NEED_B=need_b, ACT=_ACT[act],
                              OUT_KIND=OUT_KINDS[grad.dtype], HW_FP8=hw)
    return ga, gb
