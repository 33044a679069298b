"""Bit-exact FP8 / bf16 conversions as Triton ``@jit`` helpers, shared by the kernels that must also run under
Triton's CPU interpreter, whose own FP8 casts round wrongly (and whose bf16 cast is not round-to-nearest-even): there
the kernels decode and encode by integer bit manipulation, on the GPU they use the hardware conversions. Imports
Triton at module level: imported only by kernel modules.
"""

import triton
import triton.language as tl


@triton.jit
def _bits_to_f32(bits):
    return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _decode_e4m3(code):
    """uint8 E4M3 (fn) code -> float32, exactly (0x7F/0xFF are NaN, as in float8_e4m3fn)."""
    c = code.to(tl.uint32)
    sign = (c >> 7) << 31
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = _bits_to_f32(((e + 120) << 23) | (m << 20))
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9, exact
    mag = tl.where(e == 0, sub, normal)
    mag = tl.where((e == 15) & (m == 7), float("nan"), mag)
    return _bits_to_f32(mag.to(tl.uint32, bitcast=True) | sign)


@triton.jit
def _decode_e5m2(code):
    """uint8 E5M2 code -> float32, exactly: an E5M2 byte is the high byte of the float16 with the same value."""
    return (code.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _encode_e4m3(x):
    """float32 (already clamped to ±448, or NaN) -> uint8 E4M3 (fn) code, round-to-nearest-even like torch's cast."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    exp32 = a >> 23
    # normal range (|x| >= 2^-6): rebias the exponent, keep 3 mantissa bits, round half to even; a carry out of the
    # mantissa correctly bumps the exponent (448 is the largest input, so no overflow into the NaN code)
    rebased = a - (120 << 23)
    q = rebased >> 20
    rem = rebased & 0xFFFFF
    round_up = (rem > 0x80000) | ((rem == 0x80000) & ((q & 1) == 1))
    normal = q + round_up.to(tl.uint32)
    # subnormal range: round |x| * 2^9 to an integer (0..8) with the 2^23 trick (fp32 add rounds half to even)
    y = _bits_to_f32(a) * 512.0
    sub = ((y + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(exp32 >= 121, normal, sub)
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return (code | sign).to(tl.uint8)


@triton.jit
def _f32_to_bf16_rn(x):
    """float32 -> bfloat16 bits (uint16), round-to-nearest-even (what ``tensor.to(torch.bfloat16)`` does)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (bits >> 16) | 0x40, rounded).to(tl.uint16)


@triton.jit
def _bf16_bits_to_f32(b):
    return _bits_to_f32(b.to(tl.uint32) << 16)
