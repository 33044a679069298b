"""Triton kernels of COAT's group cast (:func:`lowbit_amp.recipes.fp8_activations.quantize_groups` and its inverse).

Why: the reference is ~12 PyTorch ops per saved tensor (aminmax per group, the per-tensor scale, frexp shifts, a
chunked multiply/clamp/cast) and ~21 bytes of memory traffic per bf16 element; on the issue-7 anchor the recipe's
casts cost +26-28 ms per step (H200, docs/recipes.md). Here: pass 1 reads the tensor once for the per-group amaxes
and folds the tensor amax with an atomic max; pass 2 reads it again and writes codes and shifts (~5 bytes per bf16
element in all). The inverse is one pass.

Same numbers as the reference, by construction: the group amax is the max of ``|x|`` (NaN-propagating, via the bit
pattern); ``S = reciprocal(amax) * 448`` capped at 2^126 (what ``448 / amax`` does in PyTorch), 1 for an all-zero
tensor, NaN for a non-finite one; the shift is ``frexp(amax_t / amax_g).exponent - 1`` computed on the bits of the
IEEE quotient, capped so ``S * 2^k <= 2^126`` (the cap from the float64 quotient ``2^126 / S``, as the reference); the
group scale ``S * 2^k`` and its inverse are formed in float64 and rounded once, as the reference's ``_group_scale``.
On the GPU the E4M3 cast is the hardware's (round-to-nearest-even, like torch's); in Triton's interpreter the bit
encoder of :mod:`lowbit_amp.kernels.fp8_bits` stands in. Bit-identity with the reference: the interpreter in CPU tests
(tests/recipes/test_group_cast_kernel.py), the GPU in tests/gpu/test_group_cast_gpu.py.

Imports Triton at module level: only :mod:`lowbit_amp.recipes.fp8_activations` imports it, when the fused path serves.
"""

import torch
import triton
import triton.language as tl

from lowbit_amp.kernels.fp8_bits import _bits_to_f32, _decode_e4m3, _encode_e4m3, _f32_to_bf16_rn

_FP8_MAX = tl.constexpr(448.0)
_MAX_SCALE = tl.constexpr(2.0**126)
_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny
_MAX_SHIFT = tl.constexpr(255)
GROUPS_PER_PROGRAM = 64


@triton.jit
def _abs_bits(x):
    return x.to(tl.float32).to(tl.uint32, bitcast=True) & 0x7FFFFFFF  # NaN bit patterns sort above +inf


@triton.jit
def group_amax_kernel(x_ptr, gamax_ptr, tamax_ptr, numel, n_groups, GS: tl.constexpr, GB: tl.constexpr):
    """Pass 1: per-group amax (float32) and the tensor amax as an atomic max of bit patterns (int32, zeroed)."""
    pid = tl.program_id(0)
    g = pid * GB + tl.arange(0, GB)
    offs = g[:, None] * GS + tl.arange(0, GS)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0)
    bits = tl.max(_abs_bits(x), axis=1)
    tl.store(gamax_ptr + g, _bits_to_f32(bits), mask=g < n_groups)
    tl.atomic_max(tamax_ptr, tl.max(tl.where(g < n_groups, bits, 0), axis=0).to(tl.int32))


@triton.jit
def _frexp_exponent(r):
    """``torch.frexp(r).exponent`` for r >= 1 (normal or inf/NaN: exponent 0, as the reference's frexp gives)."""
    e = ((r.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    return tl.where(e == 255, 0, e - 126)


@triton.jit
def _tensor_scale(tamax_bits):
    amax = _bits_to_f32(tamax_bits.to(tl.uint32))
    safe = tl.maximum(amax, _TINY)  # clamp_min(tiny); NaN stays NaN below
    safe = tl.where(amax != amax, amax, safe)
    scale = tl.minimum(tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe) * _FP8_MAX, _MAX_SCALE)
    scale = tl.where(amax > 0.0, scale, 1.0)
    finite = tamax_bits.to(tl.uint32) < 0x7F800000
    return amax, tl.where(finite, scale, float("nan"))


@triton.jit
def _pow2_f64(k):
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def group_cast_kernel(x_ptr, codes_ptr, shifts_ptr, gamax_ptr, tamax_ptr, tscale_ptr, numel, n_groups,
                      GS: tl.constexpr, GB: tl.constexpr, HW_FP8: tl.constexpr):
    """Pass 2: shifts, then ``codes = E4M3(clamp(x * S * 2^k, +-448))`` for every group."""
    pid = tl.program_id(0)
    g = pid * GB + tl.arange(0, GB)
    g_ok = g < n_groups
    amax_t, scale_t = _tensor_scale(tl.load(tamax_ptr))
    amax_g = tl.load(gamax_ptr + g, mask=g_ok, other=0.0)
    ratio = tl.math.div_rn(tl.full(amax_g.shape, 1.0, tl.float32) * amax_t, tl.maximum(amax_g, _TINY))
    ratio = tl.where(amax_g != amax_g, amax_g, ratio)  # clamp_min keeps NaN
    shift = tl.where(amax_g > 0.0, _frexp_exponent(ratio) - 1, _MAX_SHIFT)
    # cap: frexp(2^126 / S) in float64; S NaN -> exponent 0
    q = 85070591730234615865843651857942052864.0 / scale_t.to(tl.float64)
    qe = ((q.to(tl.uint64, bitcast=True) >> 52) & 0x7FF).to(tl.int32)
    cap = tl.where(qe == 2047, 0, qe - 1022)
    shift = tl.minimum(tl.minimum(tl.maximum(shift, 0), _MAX_SHIFT), tl.minimum(tl.maximum(cap - 1, 0), _MAX_SHIFT))
    group_scale = (scale_t.to(tl.float64) * _pow2_f64(shift)).to(tl.float32)
    offs = g[:, None] * GS + tl.arange(0, GS)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    y = tl.clamp(x * group_scale[:, None], -_FP8_MAX, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if HW_FP8:
        tl.store(codes_ptr + offs, y.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=g_ok[:, None])
    else:
        tl.store(codes_ptr + offs, _encode_e4m3(y), mask=g_ok[:, None])
    tl.store(shifts_ptr + g, shift.to(tl.uint8), mask=g_ok)
    if pid == 0:
        tl.store(tscale_ptr, scale_t)


@triton.jit
def decode_groups(codes_ptr, shifts_ptr, tscale_ptr, g, g_ok, offs, HW_FP8: tl.constexpr):
    """FP32 values of the groups ``g`` (``offs``: their elements, 2-D): ``codes * (S * 2^k)^-1``, the inverse formed in
    float64 and rounded once (as the reference's ``_group_scale``). Shared with the fused GLU backward."""
    scale_t = tl.load(tscale_ptr).to(tl.float64)
    shift = tl.load(shifts_ptr + g, mask=g_ok, other=0).to(tl.int32)
    inv = (1.0 / (scale_t * _pow2_f64(shift))).to(tl.float32)
    if HW_FP8:
        c = tl.load(codes_ptr + offs, mask=g_ok[:, None], other=0.0).to(tl.float32)
    else:
        c = _decode_e4m3(tl.load(codes_ptr + offs, mask=g_ok[:, None], other=0))
    return c * inv[:, None]


@triton.jit
def store_rounded(ptr, offs, y, mask, OUT_KIND: tl.constexpr):
    """Store FP32 ``y`` rounded once to the output dtype (``OUT_KIND``: 0 bf16, 1 fp16, 2 fp32, as :data:`OUT_KINDS`)."""
    if OUT_KIND == 0:  # bfloat16, round-to-nearest-even on the bits (the interpreter's own cast truncates); the
        # bitcast matters: a uint16 stored through a bf16 pointer is converted by value on the GPU (run 2026-12-01 i)
        tl.store(ptr + offs, _f32_to_bf16_rn(y).to(tl.bfloat16, bitcast=True), mask=mask)
    elif OUT_KIND == 1:
        tl.store(ptr + offs, y.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, y, mask=mask)


@triton.jit
def group_dequant_kernel(codes_ptr, shifts_ptr, tscale_ptr, out_ptr, n_groups, GS: tl.constexpr, GB: tl.constexpr,
                         OUT_KIND: tl.constexpr, HW_FP8: tl.constexpr):
    """``out = codes * (S * 2^k)^-1`` (the inverse formed in float64 and rounded once), rounded to the output dtype."""
    pid = tl.program_id(0)
    g = pid * GB + tl.arange(0, GB)
    g_ok = g < n_groups
    offs = g[:, None] * GS + tl.arange(0, GS)[None, :]
    y = decode_groups(codes_ptr, shifts_ptr, tscale_ptr, g, g_ok, offs, HW_FP8)
    store_rounded(out_ptr, offs, y, g_ok[:, None], OUT_KIND)


OUT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def quantize_flat(flat: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes (groups, group_size) E4M3, shifts uint8, tensor_scale float32 0-d)`` of a contiguous 1-D tensor."""
    numel = flat.numel()
    n_groups = -(-numel // group_size)
    device = flat.device
    hw = not _interpreting(flat)
    codes = torch.empty((n_groups, group_size), dtype=torch.float8_e4m3fn, device=device)
    shifts = torch.empty(n_groups, dtype=torch.uint8, device=device)
    tensor_scale = torch.empty((), dtype=torch.float32, device=device)
    gamax = torch.empty(n_groups, dtype=torch.float32, device=device)
    tamax = torch.zeros(1, dtype=torch.int32, device=device)
    grid = (triton.cdiv(n_groups, GROUPS_PER_PROGRAM),)
    group_amax_kernel[grid](flat, gamax, tamax, numel, n_groups, GS=group_size, GB=GROUPS_PER_PROGRAM)
    group_cast_kernel[grid](flat, codes if hw else codes.view(torch.uint8), shifts, gamax, tamax, tensor_scale, numel,
                            n_groups, GS=group_size, GB=GROUPS_PER_PROGRAM, HW_FP8=hw)
    return codes, shifts, tensor_scale


def dequantize_into(codes: torch.Tensor, shifts: torch.Tensor, tensor_scale: torch.Tensor, out: torch.Tensor) -> None:
    """Write the decoded ``(groups, group_size)`` values into ``out`` (contiguous, the same number of elements)."""
    n_groups, group_size = codes.shape
    hw = not _interpreting(codes)
    grid = (triton.cdiv(n_groups, GROUPS_PER_PROGRAM),)
    group_dequant_kernel[grid](codes if hw else codes.view(torch.uint8), shifts, tensor_scale, out, n_groups,
                               GS=group_size, GB=GROUPS_PER_PROGRAM, OUT_KIND=OUT_KINDS[out.dtype], HW_FP8=hw)
