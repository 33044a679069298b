"""Triton ``@jit`` kernel of :mod:`lowbit_amp.kernels.outlier_flags` (imported only when it launches)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def outlier_flags_kernel(amax_ptr, flags_ptr, n, k, THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the k-th smallest of ``n`` non-negative tile amaxes by bisection on their bit patterns (for
    non-negative floats the int32 order of the bits is the float order), then every tile's flag."""
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    v = tl.load(amax_ptr + offs, mask=inside, other=0.0)
    has_nan = tl.max((v != v).to(tl.int32), axis=0)  # noqa: PLR0124 - True for NaN only
    bits = tl.where(v == 0.0, 0, v.to(tl.int32, bitcast=True))  # -0.0 counts as 0.0
    bits = tl.where(inside, bits, 0x7FFFFFFF)  # padding ranks above everything, NaN included
    lo = tl.zeros((), tl.int32)
    hi = tl.full((), 0x7FFFFFFF, tl.int32)
    for _ in range(31):  # smallest t with count(bits <= t) >= k; the interval halves each time, 2^31 values
        mid = lo + (hi - lo) // 2
        count = tl.sum((bits <= mid).to(tl.int32), axis=0)
        hi = tl.where(count >= k, mid, hi)
        lo = tl.where(count >= k, lo, mid + 1)
    median = hi.to(tl.float32, bitcast=True)
    limit = tl.where(median > 0.0, THRESHOLD * median, float("inf"))  # v > inf never holds: no flags
    limit = tl.where(has_nan == 0, limit, float("inf"))
    flags = v > limit
    tl.store(flags_ptr + offs, flags.to(tl.uint8), mask=inside)
