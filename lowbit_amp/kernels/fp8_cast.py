"""Fused FP8 operand casts in Triton: amax + scale + saturating cast (+ the transposed copy) in one or two passes.

Why: the reference (:func:`lowbit_amp.quant.operand.quantize_operand`) runs amax, float32 upcast, multiply, clamp,
cast and — for the backward GEMMs — a transpose as separate eager kernels, ~8 passes over memory. On an H100 that costs
more than the FP8 GEMM saves (shared/ANCHORS.md: 0.88 ms eager vs 0.13 ms fused for one 16384x4096 cast). Here:

* **delayed scaling, warm** (activations and output gradients after the first step): ONE pass. The scale is read from
  the state's device buffer, the tile amaxes go to a per-state scratch word by ``atomic_max``, and the last program to
  finish folds the global amax into ``pending_amax`` / ``nonfinite_count`` exactly as
  :meth:`ScalingState.record` does, then resets the scratch. No host sync, no extra launch.
* **current scaling** (weights by default; delayed before its first update): two passes — per-program partial amaxes,
  then the cast kernel reduces the partials and computes the scale in-kernel with the reference formula.

Both write ``lp`` (M, K) and optionally ``lpᵀ`` (K, M) (what ``torch._scaled_mm`` needs for the backward GEMMs, whose
FP8 operands must be row-major x column-major) and ``(scale, 1/scale)`` so the GEMMs need no eager reciprocal.
Bit-identity with the reference: the scale is computed as ``reciprocal(amax) * target`` because that is what
``target / amax`` with a Python-float numerator does in PyTorch (``Tensor.__rtruediv__``); both use correctly rounded
fp32 division (``div_rn``), one fp32 multiply ``x * scale``, NaN-propagating clamp, and round-to-nearest-even casts.
tests/kernels/test_fp8_cast_gpu.py checks every byte against the reference.

Measured (H100 80GB HBM3, torch 2.11, triton 3.6, 2026-11-24; ``bench/bench_all.py cast``; docs/performance.md), one
16384x4096 bf16 operand -> E4M3 + its transpose: delayed/warm 1.363 ms eager reference -> 0.115 ms fused (11.9x; 77% of
the 3.0 TB/s floor of 0.089 ms; Inductor's fusion of the reference: 0.174 ms); current 1.365 -> 0.153 ms (8.9x; floor
0.133 ms; Inductor 0.173 ms). 8192x1024: 0.281 -> 0.022 ms (delayed), 0.304 -> 0.032 ms (current).

This module imports Triton at import time; import it only through :mod:`lowbit_amp.kernels.dispatch` decisions.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - only on CPU-only installs, which never import this module
    raise ImportError(
        "lowbit_amp.kernels.fp8_cast needs Triton (shipped with CUDA builds of PyTorch). On CPU the reference casts in "
        "lowbit_amp.quant.cast run instead; lowbit_amp.kernels.dispatch decides which."
    ) from err

from lowbit_amp.kernels.fp8_cast_op import cast_modes, cast_results
from lowbit_amp.quant.cast import MAX_SCALE
from lowbit_amp.scaling.state import ScalingState

_FINITE_LIMIT_BITS = 0x7F800000  # bit pattern of +inf: |x| bits below it are finite, above it are NaN
_BLOCK_M = 64
_BLOCK_K = 128
_NUM_WARPS = 8
# Cast programs per SM (grid-stride over the tiles); None: one program per tile, as before 2026-12-02. Measured by
# bench/bench_cast_sweep.py (H200, run zo): the 4096-wide anchor step's 30 casts 2.435 ms one per tile -> 2.366 ms at
# 8 per SM (16: 2.378; 4 warps: 2.372), repeats within 0.3%. Run zr (same protocol, 3 rounds): 128-row tiles (the
# transposed copy's rows 128 contiguous bytes) 15-25% slower with 8 or 16 warps, 128x64 9% slower, an L2 evict-first
# hint on the read 3-4% slower: none kept.
PROGRAMS_PER_SM: int | None = 8


@triton.jit
def _scale_from_amax_bits(amax_bits, TARGET: tl.constexpr, MAX_SCALE_C: tl.constexpr):
    """compute_scale(amax, fmt, margin) with no previous scale: fallback 1 for amax 0 / inf / NaN."""
    usable = (amax_bits > 0) & (amax_bits < 0x7F800000)
    amax = amax_bits.to(tl.float32, bitcast=True)
    safe = tl.where(usable, amax, 1.0)
    scale = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe) * TARGET
    scale = tl.minimum(scale, MAX_SCALE_C)
    return tl.where(usable, scale, 1.0)


@triton.jit
def _fold_amax(amax_bits, pending_ptr, nonfinite_ptr, FRESH: tl.constexpr):
    """ScalingState.record: pending = max(pending, amax if finite else 0); nonfinite_count += not finite. ``FRESH``:
    the targets are new uninitialised outputs (lowbit_amp/grads/fp8_grad.py's), written as if they had been zero — no
    zero-fill launch per call."""
    finite = amax_bits < 0x7F800000
    amax = amax_bits.to(tl.float32, bitcast=True)
    contribution = tl.where(finite, amax, 0.0)
    flag = tl.where(finite, 0, 1).to(tl.int64)
    if FRESH:
        tl.store(pending_ptr, tl.maximum(contribution, 0.0))
        tl.store(nonfinite_ptr, flag)
    else:
        tl.store(pending_ptr, tl.maximum(tl.load(pending_ptr), contribution))
        tl.store(nonfinite_ptr, tl.load(nonfinite_ptr) + flag)


@triton.jit
def _load_tile(x_ptr, tile, tiles_k, M, K, stride_m, stride_k, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile ``tile`` (row-major over ``BLOCK_M x BLOCK_K`` tiles) of x as fp32, with its offsets and mask; a tile
    index past the end lands beyond row M and is fully masked (the grid-stride loops' last round)."""
    offs_m = (tile // tiles_k) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_m + offs_k[None, :] * stride_k, mask=mask, other=0.0)
    return x.to(tl.float32), offs_m, offs_k, mask


@triton.jit
def _amax_partials_kernel(x_ptr, partials_ptr, M, K, stride_m, stride_k, iters,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1 of current scaling: each program writes the max |x| bit pattern over its tiles (NaN > inf > finite).

    Grid-stride over tiles; a tile index past the end lands beyond row M and is fully masked."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    for i in range(0, iters):
        x, _, _, _ = _load_tile(x_ptr, pid + i * programs, tiles_k, M, K, stride_m, stride_k, BLOCK_M, BLOCK_K)
        acc = tl.maximum(acc, tl.abs(x).to(tl.int32, bitcast=True))
    tl.store(partials_ptr + pid, tl.max(tl.max(acc, 1), 0))


@triton.jit
def _cast_kernel(x_ptr, lp_ptr, lpt_ptr, M, K, stride_m, stride_k,
                 scale_ptr, partials_ptr, n_partials, scale_out_ptr, pending_ptr, nonfinite_ptr, scratch_ptr, iters,
                 TARGET: tl.constexpr, FMT_MAX: tl.constexpr, MAX_SCALE_C: tl.constexpr,
                 CURRENT: tl.constexpr, RECORD: tl.constexpr, WRITE_T: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FRESH: tl.constexpr):
    """Grid-stride over ``BLOCK_M x BLOCK_K`` tiles (``iters`` per program; a tile index past the end lands beyond
    row M and is fully masked), so the delayed path's two same-address atomics (and their acq_rel fences) run once
    per *program*, not once per tile: one program per tile made 8192 of them per 16384x4096 cast."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    if CURRENT:
        p = tl.arange(0, PARTIALS_BLOCK)
        amax_bits = tl.max(tl.load(partials_ptr + p, mask=p < n_partials, other=0), 0)
        scale = _scale_from_amax_bits(amax_bits, TARGET, MAX_SCALE_C)
    else:
        scale = tl.load(scale_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)  # |x| bit patterns (delayed + record only)
    for i in range(0, iters):
        x, offs_m, offs_k, mask = _load_tile(x_ptr, pid + i * programs, tiles_k, M, K, stride_m, stride_k, BLOCK_M,
                                             BLOCK_K)
        scaled = tl.clamp(x * scale, -FMT_MAX, FMT_MAX, propagate_nan=tl.PropagateNan.ALL)
        lp = scaled.to(lp_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(lp_ptr + offs_m[:, None] * K + offs_k[None, :], lp, mask=mask)
        if WRITE_T:
            mask_t = (offs_k[:, None] < K) & (offs_m[None, :] < M)
            tl.store(lpt_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(lp), mask=mask_t)
        if RECORD and not CURRENT:
            acc = tl.maximum(acc, tl.abs(x).to(tl.int32, bitcast=True))
    if pid == 0:
        tl.store(scale_out_ptr, scale)
        # 1/scale 16 bytes further on: cuBLAS rejects (CUBLAS_STATUS_NOT_SUPPORTED) a scale pointer that is not
        # 16-byte aligned.
        tl.store(scale_out_ptr + 4, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale))
        if FRESH and not RECORD:  # the custom op's outputs are always defined: nothing recorded
            tl.store(pending_ptr, 0.0)
            tl.store(nonfinite_ptr, tl.full((), 0, tl.int64))
    if RECORD:
        # The tensor's own amax (NaN/inf as found) also goes to scale_out[1]: a sibling layer that reuses this cast
        # (lowbit_amp/nn/shared_input_cast.py) records it into its own state.
        if CURRENT:
            if pid == 0:
                _fold_amax(amax_bits, pending_ptr, nonfinite_ptr, FRESH)
                tl.store(scale_out_ptr + 1, amax_bits.to(tl.float32, bitcast=True))
        else:
            tl.atomic_max(scratch_ptr, tl.max(tl.max(acc, 1), 0))
            # acq_rel atomics: the program that sees the count reach the grid size also sees every atomic_max.
            done = tl.atomic_add(scratch_ptr + 1, 1)
            if done == programs - 1:
                total_bits = tl.atomic_xchg(scratch_ptr, 0)
                tl.atomic_xchg(scratch_ptr + 1, 0)
                _fold_amax(total_bits, pending_ptr, nonfinite_ptr, FRESH)
                tl.store(scale_out_ptr + 1, total_bits.to(tl.float32, bitcast=True))


class _Launcher:
    """Launch a Triton kernel with less host time than ``kernel[grid](...)`` (measured host time per fused cast call:
    80.6 us through ``kernel[grid]`` -> 55.5 us with this launcher and the trimmed Python around it, H100 host).

    Why: eager training pays Triton's Python dispatch on every cast (3 per linear layer per step); on a 1024-wide model
    that host time, not the GPU, bounds the step. After the first call of a specialization (which compiles through the
    normal JIT path), this calls the compiled kernel's launcher directly. The cache key reproduces Triton's own
    specialization (per tensor: dtype and 16-byte alignment; per int: ==1, divisible by 16, fits int32; constexprs),
    so a cached binary is never reused for a call Triton would have compiled differently.
    """

    def __init__(self, kernel: "triton.runtime.JITFunction") -> None:
        self.kernel = kernel
        self.cache: dict = {}

    def __call__(self, grid: int, args: tuple, num_warps: int, kernel: object = None, **constexprs: object) -> None:
        del kernel  # (the wrap_triton launch's argument; this launcher knows its kernel)
        key = (*map(_spec, args), *constexprs.values(), num_warps)
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.kernel[(grid,)](*args, **constexprs, num_warps=num_warps)
            if hasattr(compiled, "result"):
                compiled = compiled.result()
            self.cache[key] = compiled
            return
        run = compiled.run
        stream = torch._C._cuda_getCurrentRawStream(args[0].device.index)
        run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
            *args, *constexprs.values())


def _spec(arg: object) -> object:
    """What Triton specializes a kernel argument on (tensors: dtype, 16-byte alignment; ints: 1, %16, int32)."""
    if type(arg) is int:
        return (arg == 1, arg % 16 == 0, arg < 2**31)
    return (arg.dtype, arg.data_ptr() % 16 == 0)  # type: ignore[attr-defined]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


_launch_amax = _Launcher(_amax_partials_kernel)
_launch_cast = _Launcher(_cast_kernel)


def _wrapped_launch(grid: int, args: tuple, num_warps: int, kernel: "triton.runtime.JITFunction",
                    **constexprs: object) -> None:
    """The launch as ``torch.library.wrap_triton`` records it: traced into the graph, launched by Inductor."""
    torch.library.wrap_triton(kernel)[(grid,)](*args, **constexprs, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_cast(
    x2d: torch.Tensor, scale_in: torch.Tensor, out_dtype: torch.dtype, fmt_max: float, target: float,
    current: bool, record: bool, want_transpose: bool,
    pending: torch.Tensor | None, nonfinite: torch.Tensor | None, scratch: torch.Tensor | None,
    fresh: bool = False, wrapped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The kernels behind both entry points: ``(lp, lpᵀ or None, scale_out)``, ``scale_out[0]`` = the scale used
    when ``current``, ``scale_out[4]`` = its inverse, ``scale_out[1]`` = the tensor's amax (only with ``record``;
    NaN/inf when it holds one). With ``record`` the tensor's amax is also folded into ``pending`` /
    ``nonfinite`` (and ``scratch``, all-zero int32[2], is used and left all-zero) exactly as ScalingState.record;
    ``fresh``: ``pending``/``nonfinite`` are uninitialised and receive this tensor's contribution alone (the FP8
    weight-gradient encoder's use).

    ``wrapped``: launched through ``torch.library.wrap_triton`` (inside the ``triton_op`` of
    :mod:`lowbit_amp.kernels.fp8_cast_op`, where Inductor generates the launch itself); the caller then passes real
    ``pending``/``nonfinite``/``scratch`` and no kernel argument aliases another (unused slots get ``scale_in`` or an
    empty tensor, never a buffer the kernel writes), so Inductor's mutation analysis sees each buffer once."""
    rows, cols = x2d.shape
    device = x2d.device
    # fp32 inputs: the in-kernel FP8 transpose gave wrong bytes for 16-aligned fp32 tiles (Triton 3.6, sm_90; caught
    # by tests/kernels, also when transposing the fp32 tile first), so they get torch's transpose afterwards.
    write_t = want_transpose and x2d.dtype != torch.float32
    lp = torch.empty((rows, cols), dtype=out_dtype, device=device)
    if write_t:
        lp_t = torch.empty((cols, rows), dtype=out_dtype, device=device)
    else:
        lp_t = lp.new_empty((0,)) if wrapped else lp
    scale_out = torch.empty(8, dtype=torch.float32, device=device)  # [0] scale, [4] 1/scale (16-byte aligned)
    tiles = _cdiv(rows, _BLOCK_M) * _cdiv(cols, _BLOCK_K)
    if current:
        n_partials = min(tiles, 4 * _num_sms(device))
        partials = torch.empty(n_partials, dtype=torch.int32, device=device)
        (_wrapped_launch if wrapped else _launch_amax)(
            n_partials, (x2d, partials, rows, cols, x2d.stride(0), x2d.stride(1), _cdiv(tiles, n_partials)),
            _NUM_WARPS, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, kernel=_amax_partials_kernel,
        )
    else:
        n_partials, partials = 1, (scale_in if wrapped else scale_out)
    programs = tiles if PROGRAMS_PER_SM is None else min(tiles, PROGRAMS_PER_SM * _num_sms(device))
    unused = scale_in if wrapped else scale_out  # a slot the kernel does not touch under these constexprs
    (_wrapped_launch if wrapped else _launch_cast)(
        programs,
        (x2d, lp, lp_t, rows, cols, x2d.stride(0), x2d.stride(1),
         scale_in, partials, n_partials, scale_out,
         pending if (record or fresh or wrapped) else unused, nonfinite if (record or fresh or wrapped) else unused,
         scratch if ((record and not current) or wrapped) else unused, _cdiv(tiles, programs)),
        _NUM_WARPS, kernel=_cast_kernel,
        TARGET=target, FMT_MAX=fmt_max, MAX_SCALE_C=MAX_SCALE,
        CURRENT=current, RECORD=record, WRITE_T=write_t,
        PARTIALS_BLOCK=_next_pow2(n_partials), BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, FRESH=fresh,
    )
    if want_transpose and not write_t:
        lp_t = lp.t().contiguous()
    return lp, (lp_t if want_transpose else None), scale_out


def fused_quantize(
    x2d: torch.Tensor, state: ScalingState, want_transpose: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(lp, lpᵀ or None, scale, 1/scale, amax or None)`` — same values and state updates as the reference
    quantize_operand; ``amax`` is the tensor's amax when the state records one (delayed scaling), else None.

    Preconditions (checked by :func:`lowbit_amp.kernels.dispatch.fused_cast_unavailable`): CUDA 2-D non-empty
    float tensor, tensorwise FP8 state, round-to-nearest, no power-of-2 scales. Eager only: it updates the state's
    buffers in place from inside the kernel; under ``torch.compile`` :mod:`lowbit_amp.kernels.fp8_cast_op` serves
    (the same launch, with the mutation declared in its schema).
    """
    fmt = state.fmt
    current, record = cast_modes(state)
    lp, lp_t, scale_out = launch_cast(
        x2d, state.scale, fmt.dtype, fmt.max, fmt.max / (2.0 ** state.config.margin), current, record,
        want_transpose, state.pending_amax, state.nonfinite_count,
        state.cast_scratch if (record and not current) else None)
    return cast_results(state, lp, lp_t, scale_out, current, record)
