"""Triton ``@jit`` kernels of the fused low-bit Adam/AdamW step; launched only by :mod:`lowbit_amp.optim.update`.

Imports Triton at module level, so nothing imports this module unless the fused step is about to run (importing
``lowbit_amp`` never needs Triton).

Two launches per group of like parameters, each reading a pointer table with one row per parameter (element arrays
as offsets from a base-pointer argument, so the compiler knows their alignment and vectorizes; step counter,
hyper-parameter vector, gradient scale and salt as addresses; numel; block count):

* ``fused_adam_prologue`` — one program per parameter: the per-step scalars (bias corrections, ``lr / bc1``,
  ``1 - lr*wd``, ``1/grad_scale``, the stochastic-rounding seed) into a small scratch row, then ``step += ok``. Done
  once per parameter instead of in every thread of the main kernel, where two ``powf`` per thread were a large share
  of the instructions.
* ``fused_adam_kernel`` — one program per ``BPP`` blocks of ``BLOCK_SIZE`` elements of one parameter, as one
  ``[BPP, BLOCK]`` tile (one row per block): decode gradient (E4M3/E5M2 codes × 1/scale, or a plain
  tensor), m, v and master to FP32; Adam/AdamW in FP32; the new per-block amax (and, for COAT's expansion, the
  non-zero minimum) as row reductions of the tile, so re-encoding needs no second pass; encode and store m, v,
  master and parameter — only if the step's finite flag (device scalar) is set: a skipped step writes nothing.

Numerics follow :func:`lowbit_amp.optim.update.adam_update` run eagerly on CUDA op for op: every op that is a separate
ATen kernel there is a separately rounded op here (launched with ``enable_fp_fusion=False``, so no mul+add is
contracted), except ``torch.lerp``, whose kernel is one fused multiply-add on either side of 0.5 (``tl.fma``);
divisions and square roots are the IEEE ones (``div_rn``/``sqrt_rn``; Triton's ``/`` and ``tl.sqrt`` are approximate)
except, by default, the per-element ones of the update (``FAST_MATH``: see ``lowbit_amp.optim.update.FUSED_FAST_MATH``);
``python_scalar / tensor`` in the reference is ATen's ``reciprocal(t) * scalar`` and is computed so; the power-of-2
floor of FP16 scales is taken on the bits. Three places differ by default, all measured (docs/optimizer.md): the bias
corrections use libdevice's ``powf``, which Triton links in its flush-to-zero build and which can differ from ATen's by
an ulp (the launcher can pass the reference's own torch-op values instead: then bit-identical), and COAT's per-element
``|x|^k`` uses the hardware ``ex2``/``lg2`` approximations unless ``EXACT_POW`` (libdevice ``powf`` costs ~100
instructions per call and made the kernel instruction-bound), folded in the log domain with the per-block max so an
element's encode or decode is one ``lg2``, one FMA and one ``ex2``, and the approximate per-element division/square root
(``FAST_MATH``).

FP8: on GPU the hardware conversions (decode is exact; encode is round-to-nearest-even with saturation, like torch's
cast of the clamped value). Under Triton's CPU interpreter, whose FP8 casts round wrongly, the same kernel decodes and
encodes by integer bit manipulation (exact RNE) — that is what the CPU tests run.

Stochastic rounding of the bf16 master uses the same counter-based hash as :func:`lowbit_amp.optim.master.hash_uniform`
(MurmurHash3 finalizer on 32-bit lanes, identical constants) and the same ``floor(|w|/ulp + u)`` arithmetic, done on the
bits: the rounded weight is the truncated weight plus one bf16 ulp when ``floor(t + u) > floor(t)`` with ``t`` the
exactly-scaled magnitude — so the kernel's random stream *is* the reference's, not merely the same distribution
(measured: bit-identical weights on H200 when the bias corrections agree).
"""

import math

import triton
import triton.language as tl
from triton.language.extra import libdevice

from lowbit_amp.kernels.fp8_bits import (  # noqa: F401  (jit helpers resolved from this module's globals)
    _bf16_bits_to_f32,
    _bits_to_f32,
    _decode_e4m3,
    _decode_e5m2,
    _encode_e4m3,
    _f32_to_bf16_rn,
)
from lowbit_amp.optim import state_codec

# Pointer-table columns (int64 each); keep in sync with lowbit_amp.optim.update._TABLE_COLUMNS.
COL_PARAM = tl.constexpr(0)
COL_GRAD = tl.constexpr(1)
COL_GSCALE = tl.constexpr(2)
COL_M = tl.constexpr(3)
COL_M_SCALE = tl.constexpr(4)
COL_V = tl.constexpr(5)
COL_V_SCALE = tl.constexpr(6)
COL_V_K = tl.constexpr(7)
COL_MASTER = tl.constexpr(8)
COL_STEP = tl.constexpr(9)
COL_HYPER = tl.constexpr(10)
COL_SALT = tl.constexpr(11)
COL_NUMEL = tl.constexpr(12)
COL_BLOCKS = tl.constexpr(13)
NCOL = tl.constexpr(14)

# Static kinds (tl.constexpr arguments): one compiled variant per combination actually used.
GRAD_E4M3, GRAD_E5M2, GRAD_BF16, GRAD_FP16, GRAD_FP32 = 0, 1, 2, 3, 4
PARAM_BF16, PARAM_FP16, PARAM_FP32 = 0, 1, 2
M_FP32, M_BF16, M_E4M3 = 0, 1, 2
V_FP32, V_FP16, V_E4M3_EXPAND = 0, 1, 2
MASTER_PARAM_RN, MASTER_FP32, MASTER_PARAM_SR, MASTER_BF16_SR = 0, 1, 2, 3

_E4M3_MAX = tl.constexpr(448.0)
_FP16_MAX = tl.constexpr(65504.0)
_MAX_SCALE = tl.constexpr(2.0**126)
_K_MAX = tl.constexpr(state_codec._K_MAX)
_E4M3_LOG_RANGE = tl.constexpr(state_codec._E4M3_LOG_RANGE)  # log(448 / 2^-6); fp32-rounded where used, as ATen does
_LOG2_E4M3_RANGE = tl.constexpr(state_codec._E4M3_LOG_RANGE / math.log(2.0))  # the same in octaves (approx. path)
_LOG2_E4M3_MAX = tl.constexpr(math.log2(448.0))


@triton.jit
def _ptr(row, col: tl.constexpr, ty: tl.constexpr):
    return tl.load(row + col).to(tl.pointer_type(ty))


@triton.jit
def _u32(value: tl.constexpr):
    return tl.full((), value, tl.uint32)


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * _u32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * _u32(0xC2B2AE35)
    return h ^ (h >> 16)


@triton.jit
def _sr_bf16(w, index, seed):
    """Stochastic rounding of float32 ``w`` onto the bf16 grid -> bf16 bits (uint16); same stream as the reference.

    Reference (``round_stochastic(w, BF16, noise=hash_uniform(...))``): ``t = |w| / ulp`` (exact: ``t`` is |w|'s
    mantissa placed in [128, 256), or ``bits * 2^-16`` for fp32 subnormals), ``floor(t + u) * ulp``. ``floor(t + u)``
    is ``floor(t)`` or ``floor(t) + 1``; the latter adds one bf16 ulp to the truncated magnitude (carrying into the
    exponent exactly as the float product would). Inf/NaN pass through truncated (only reachable on a skipped step).
    """
    h = _mix32(index.to(tl.uint32) * _u32(0x27D4EB2F) + seed)
    u = (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    bits = w.to(tl.uint32, bitcast=True)
    a = bits & 0x7FFFFFFF
    exp32 = a >> 23
    t_normal = _bits_to_f32((134 << 23) | (a & 0x7FFFFF))
    t_sub = a.to(tl.float32) * 1.52587890625e-05  # a * 2^-16, exact for a < 2^23
    t = tl.where(exp32 == 0, t_sub, t_normal)
    carry = (tl.floor(t + u) > tl.floor(t)) & (exp32 < 255)
    out = (a & 0xFFFF0000) + (carry.to(tl.uint32) << 16)
    out = tl.where(a > 0x7F800000, a | 0x400000, out)  # NaN stays NaN (quiet) after truncation
    return ((out | (bits & 0x80000000)) >> 16).to(tl.uint16)


@triton.jit
def _pow(x, y, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.pow(x, y)
    else:  # Triton's CPU interpreter has no libdevice; float32 exp2/log2 (tests compare with a tolerance there)
        return tl.where(x == 0.0, 0.0, tl.exp2(y * tl.log2(x)))


@triton.jit
def _pow_elem(x, y, USE_LIBDEVICE: tl.constexpr, EXACT_POW: tl.constexpr):
    """Per-element ``|x|^y`` of COAT's expansion: libdevice's powf (the reference's function, bit-identical) unless
    ``EXACT_POW`` is off, then the hardware ``ex2.approx(y * lg2.approx(x))`` (a few ulps off; a speed option that
    bench/bench_optim.py measures)."""
    if EXACT_POW:
        return _pow(x, y, USE_LIBDEVICE)
    else:
        return tl.where(x == 0.0, 0.0, tl.exp2(y * tl.log2(x)))


@triton.jit
def _fma(x, y, z, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return tl.fma(x, y, z)
    else:  # the interpreter's fma rounds twice; an FP64 product of two floats is exact, so this rounds (almost) once
        return (x.to(tl.float64) * y.to(tl.float64) + z.to(tl.float64)).to(tl.float32)


@triton.jit
def _div(x, y, FAST_MATH: tl.constexpr):
    """IEEE division (the reference's), or with ``FAST_MATH`` the approximate one (``div.full``, ≤ 2 ulp)."""
    if FAST_MATH:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _sqrt(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _log(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _scale_from_amax(amax, FMT_MAX: tl.constexpr, POW2: tl.constexpr):
    """``compute_scale(amax, fmt, power_of_2=POW2)``: ``reciprocal(amax) * max`` (ATen's scalar/tensor), clamped to
    2^126; a zero/non-finite amax gives 1. The power-of-2 floor is taken on the bits (exact floor(log2))."""
    usable = (amax > 0.0) & (amax < float("inf"))
    safe = tl.where(usable, amax, 1.0)
    scale = tl.minimum(tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe) * FMT_MAX, _MAX_SCALE)
    if POW2:
        scale = _bits_to_f32(scale.to(tl.uint32, bitcast=True) & 0xFF800000)
    return tl.where(usable, scale, 1.0)


# Per-parameter scalars the prologue writes for the main kernel (float32 row of SCRATCH_COLS per parameter).
S_STEP_SIZE = tl.constexpr(0)
S_BC2_SQRT = tl.constexpr(1)
S_WD_FACTOR = tl.constexpr(2)
S_WD = tl.constexpr(3)
S_LERP_W = tl.constexpr(4)
S_LERP_1MW = tl.constexpr(5)
S_BETA2 = tl.constexpr(6)
S_1MB2 = tl.constexpr(7)
S_EPS = tl.constexpr(8)
S_G_INV = tl.constexpr(9)
S_SEED = tl.constexpr(10)
SCRATCH_COLS = tl.constexpr(16)


@triton.jit
def fused_adam_prologue(table_ptr, scratch_ptr, ok_ptr, bc_ptr, USE_LIBDEVICE: tl.constexpr,
                        GIVEN_BC: tl.constexpr):
    """One program per parameter: its step's scalars (each a separately rounded op, as the reference's 0-d tensor ops
    are) into ``scratch``, then its step counter += 1 where the step is taken. Keeping the scalar work here — two
    ``powf`` for the bias corrections, IEEE divisions, the hash seed — instead of in every thread of the main kernel
    cut that kernel's instruction count severalfold."""
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + pid * NCOL
    out = scratch_ptr + pid * SCRATCH_COLS
    ok = tl.load(ok_ptr) != 0
    hyper = _ptr(row, COL_HYPER, tl.float32)
    lr = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    weight_decay = tl.load(hyper + 4)
    step_ptr = _ptr(row, COL_STEP, tl.float32)
    step = tl.load(step_ptr)
    new_step = step + 1.0
    one = tl.full((), 1.0, tl.float32)
    if GIVEN_BC:  # (lr / (1 - beta1^t), sqrt(1 - beta2^t)) computed by the launcher with the reference's torch ops
        tl.store(out + S_STEP_SIZE, tl.load(bc_ptr + 2 * pid))
        tl.store(out + S_BC2_SQRT, tl.load(bc_ptr + 2 * pid + 1))
    else:
        bias_correction1 = one - _pow(beta1, new_step, USE_LIBDEVICE)
        tl.store(out + S_STEP_SIZE, tl.math.div_rn(lr, bias_correction1))
        tl.store(out + S_BC2_SQRT, tl.sqrt_rn(one - _pow(beta2, new_step, USE_LIBDEVICE)))
    tl.store(out + S_WD_FACTOR, one - lr * weight_decay)
    tl.store(out + S_WD, weight_decay)
    weight = one - beta1  # torch.lerp(m, g, 1 - beta1)
    tl.store(out + S_LERP_W, weight)
    tl.store(out + S_LERP_1MW, one - weight)
    tl.store(out + S_BETA2, beta2)
    tl.store(out + S_1MB2, one - beta2)
    tl.store(out + S_EPS, eps)
    tl.store(out + S_G_INV, tl.math.div_rn(one, tl.load(_ptr(row, COL_GSCALE, tl.float32))))
    # hash_uniform's seed: mix32((step * 0x9E3779B1 + salt * 0x7FEB352D + 0x165667B1) mod 2^32), in uint32 lanes
    salt_u = tl.load(_ptr(row, COL_SALT, tl.int64)).to(tl.uint32)
    step_u = new_step.to(tl.int64).to(tl.uint32)
    seed = _mix32(step_u * _u32(0x9E3779B1) + salt_u * _u32(0x7FEB352D) + _u32(0x165667B1))
    tl.store(out + S_SEED, seed.to(tl.float32, bitcast=True))
    tl.store(step_ptr, tl.where(ok, new_step, step))


@triton.jit
def _eptr(base, row, col: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to an element array: ``base`` (a kernel argument of the array's dtype) plus the table's offset in
    elements. Going through an argument pointer, not an int->pointer cast, is what lets the compiler know the
    alignment (``ALIGNED``: the launcher checked every element array is 16-byte aligned) and vectorize."""
    delta = tl.load(row + col)
    if ALIGNED:
        delta = tl.multiple_of(delta, 4)
    return base + delta


@triton.jit
def _load_fp8(bases, row, col: tl.constexpr, offs, mask, E5M2: tl.constexpr, HW_FP8: tl.constexpr,
              ALIGNED: tl.constexpr):
    """FP8 codes -> float32 (exact either way): the hardware conversion on GPU, the bit decoder in the interpreter."""
    base_u8, base_u16, base_f16, base_f32, base_e4m3, base_e5m2 = bases
    if HW_FP8:
        if E5M2:
            return tl.load(_eptr(base_e5m2, row, col, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            return tl.load(_eptr(base_e4m3, row, col, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        codes = tl.load(_eptr(base_u8, row, col, ALIGNED) + offs, mask=mask, other=0)
        if E5M2:
            return _decode_e5m2(codes)
        else:
            return _decode_e4m3(codes)


@triton.jit
def _store_e4m3(bases, row, col: tl.constexpr, offs, x, mask, HW_FP8: tl.constexpr, ALIGNED: tl.constexpr):
    """float32 (clamped to ±448) -> E4M3 codes, round-to-nearest-even either way (hardware cvt / bit encoder)."""
    base_u8, base_u16, base_f16, base_f32, base_e4m3, base_e5m2 = bases
    if HW_FP8:
        tl.store(_eptr(base_e4m3, row, col, ALIGNED) + offs, x.to(tl.float8e4nv, fp_downcast_rounding="rtne"),
                 mask=mask)
    else:
        tl.store(_eptr(base_u8, row, col, ALIGNED) + offs, _encode_e4m3(x), mask=mask)


@triton.jit
def _lg2(x, USE_LIBDEVICE: tl.constexpr):
    """``log2(x)`` by the hardware's ``lg2.approx.f32`` (one MUFU op, ~2^-22 absolute error; subnormal inputs handled,
    ``lg2(0) = -inf``). ``tl.log2`` lowers to libdevice's ``__nv_log2f``, a ~35-instruction polynomial: four of them
    per element were most of the 1.7x instruction count of the E4M3-expand kernel over the FP16-v one (SASS counted
    by tools/kernel_sass_stats.py: 3552 vs 2112 per program). The interpreter has no inline PTX: ``tl.log2`` there."""
    if USE_LIBDEVICE:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _log_row(x, USE_LIBDEVICE: tl.constexpr, EXACT_POW: tl.constexpr):
    if EXACT_POW:
        return _log(x, USE_LIBDEVICE)
    else:
        return _lg2(x, USE_LIBDEVICE) * 0.6931471805599453


@triton.jit
def fused_adam_kernel(
    table_ptr, scratch_ptr, chunk_ptr, ok_ptr, base_u8, base_u16, base_f16, base_f32, base_e4m3, base_e5m2,
    BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr, BPP: tl.constexpr,
    GRAD_KIND: tl.constexpr, PARAM_KIND: tl.constexpr, M_KIND: tl.constexpr, V_KIND: tl.constexpr,
    MASTER_KIND: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    EXACT_POW: tl.constexpr, ALIGNED: tl.constexpr, NUMEL16: tl.constexpr, FAST_MATH: tl.constexpr = False,
):
    """``BPP`` consecutive blocks of one parameter as one 2-D tile ``[BPP, BLOCK]`` (see the module docstring).

    The tile form is what makes the kernel memory-bound instead of latency-bound: every thread issues the loads of
    several blocks at once, and the per-block reductions run along the tile's rows, which the compiler keeps inside a
    warp (shuffles, no shared memory). The earlier form — one warp per program, its blocks in a sequential loop —
    left at most 32 one-warp programs per SM (Hopper's block limit) each waiting on a chain of dependent table loads:
    3.2 ms per 256M-parameter step vs 1.46 ms for torch's fused AdamW (H200, bench/bench_optim.py, 2026-12-01).

    Indices are int32 (the launcher refuses parameters of 2^31 elements or more): 64-bit element offsets doubled the
    address arithmetic. ``ALIGNED`` (every element array 16-byte aligned) and ``NUMEL16`` (every numel a multiple of
    16) let the compiler vectorize the loads and stores; without them the same code runs element by element."""
    pid = tl.program_id(0)
    p_index = tl.load(chunk_ptr + 2 * pid)
    first_block = tl.load(chunk_ptr + 2 * pid + 1)
    row = table_ptr + p_index * NCOL
    sc = scratch_ptr + p_index * SCRATCH_COLS
    numel = tl.load(row + COL_NUMEL).to(tl.int32)
    if NUMEL16:
        numel = tl.multiple_of(numel, 16)
    nblocks = tl.load(row + COL_BLOCKS).to(tl.int32)
    ok = tl.load(ok_ptr) != 0  # the step's all-gradients-finite flag (uint8 view of a 0-d bool)
    bases = (base_u8, base_u16, base_f16, base_f32, base_e4m3, base_e5m2)
    blk = first_block + tl.arange(0, BPP)
    # A tile whose blocks all exist and hold no padding (every program but a parameter's last, in practice) runs a
    # copy of the code without per-element masks: constant-true masks fold away, which removed ~1/6 of the
    # instructions (compare predicates, predicate moves, selects; tools/kernel_sass_stats.py).
    if (first_block + BPP <= nblocks) & ((first_block + BPP) * BLOCK_SIZE <= numel) & (BLOCK == BLOCK_SIZE):
        _adam_tile(bases, row, sc, blk, nblocks, numel, ok, BLOCK_SIZE, BLOCK, GRAD_KIND, PARAM_KIND, M_KIND,
                   V_KIND, MASTER_KIND, DECOUPLED, MAXIMIZE, USE_LIBDEVICE, EXACT_POW, ALIGNED, FAST_MATH, True)
    else:
        _adam_tile(bases, row, sc, blk, nblocks, numel, ok, BLOCK_SIZE, BLOCK, GRAD_KIND, PARAM_KIND, M_KIND,
                   V_KIND, MASTER_KIND, DECOUPLED, MAXIMIZE, USE_LIBDEVICE, EXACT_POW, ALIGNED, FAST_MATH, False)


@triton.jit
def _adam_tile(
    bases, row, sc, blk, nblocks, numel, ok,
    BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    GRAD_KIND: tl.constexpr, PARAM_KIND: tl.constexpr, M_KIND: tl.constexpr, V_KIND: tl.constexpr,
    MASTER_KIND: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    EXACT_POW: tl.constexpr, ALIGNED: tl.constexpr, FAST_MATH: tl.constexpr, FULL: tl.constexpr,
):
    """Decode → Adam (FP32) → encode the blocks ``blk`` (a vector: one tile row per block of ``BLOCK_SIZE``
    elements); per-block amax etc. are row reductions, so a block's whole update is one pass. Writes nothing unless
    ``ok`` (the step's finite flag)."""
    col = tl.arange(0, BLOCK)[None, :]
    elem = blk[:, None] * BLOCK_SIZE + col  # index into the padded (blocks, block_size) state
    if FULL:  # ``FULL``: the caller checked every block exists and holds no padding
        row_ok = tl.full(blk.shape, 1, tl.int1)
        in_state = tl.full(elem.shape, 1, tl.int1)
        in_param = in_state
    else:
        row_ok = blk < nblocks  # [BPP]: per-block scalars are loaded/stored with this mask
        row_ok2 = row_ok[:, None]
        if BLOCK == BLOCK_SIZE:
            in_state = row_ok2 & (col < BLOCK)
        else:
            in_state = row_ok2 & (col < BLOCK_SIZE)
        in_param = in_state & (elem < numel)
    st_mask = in_state & ok
    row_st = row_ok & ok
    one = tl.full((), 1.0, tl.float32)
    base_u8, base_u16, base_f16, base_f32, base_e4m3, base_e5m2 = bases

    # ---- gradient
    if GRAD_KIND == 0:
        g = _load_fp8(bases, row, COL_GRAD, elem, in_param, False, USE_LIBDEVICE, ALIGNED)
    elif GRAD_KIND == 1:
        g = _load_fp8(bases, row, COL_GRAD, elem, in_param, True, USE_LIBDEVICE, ALIGNED)
    elif GRAD_KIND == 2:
        g = _bf16_bits_to_f32(tl.load(_eptr(base_u16, row, COL_GRAD, ALIGNED) + elem, mask=in_param, other=0))
    elif GRAD_KIND == 3:
        g = tl.load(_eptr(base_f16, row, COL_GRAD, ALIGNED) + elem, mask=in_param, other=0.0).to(tl.float32)
    else:
        g = tl.load(_eptr(base_f32, row, COL_GRAD, ALIGNED) + elem, mask=in_param, other=0.0)
    g = g * tl.load(sc + S_G_INV)  # dequantize: codes * reciprocal(scale)
    g = tl.where(in_param, g, 0.0)  # padding is zero in the reference (padded after dequantizing)
    if MAXIMIZE:
        g = -g

    # ---- master weights (FP32)
    if MASTER_KIND == 1:
        w = tl.load(_eptr(base_f32, row, COL_MASTER, ALIGNED) + elem, mask=in_state, other=0.0)
    elif MASTER_KIND == 3:
        w = _bf16_bits_to_f32(tl.load(_eptr(base_u16, row, COL_MASTER, ALIGNED) + elem, mask=in_state, other=0))
    elif PARAM_KIND == 0:
        w = _bf16_bits_to_f32(tl.load(_eptr(base_u16, row, COL_PARAM, ALIGNED) + elem, mask=in_param, other=0))
    elif PARAM_KIND == 1:
        w = tl.load(_eptr(base_f16, row, COL_PARAM, ALIGNED) + elem, mask=in_param, other=0.0).to(tl.float32)
    else:
        w = tl.load(_eptr(base_f32, row, COL_PARAM, ALIGNED) + elem, mask=in_param, other=0.0)

    # ---- first moment (decode)
    if M_KIND == 0:
        m = tl.load(_eptr(base_f32, row, COL_M, ALIGNED) + elem, mask=in_state, other=0.0)
    elif M_KIND == 1:
        m = _bf16_bits_to_f32(tl.load(_eptr(base_u16, row, COL_M, ALIGNED) + elem, mask=in_state, other=0))
    else:
        m_scale_old = tl.load(_ptr(row, COL_M_SCALE, tl.float32) + blk, mask=row_ok, other=1.0)
        m = _load_fp8(bases, row, COL_M, elem, in_state, False, USE_LIBDEVICE, ALIGNED)
        m = m * tl.math.div_rn(tl.full(m_scale_old.shape, 1.0, tl.float32), m_scale_old)[:, None]

    # ---- second moment (decode)
    if V_KIND == 0:
        v = tl.load(_eptr(base_f32, row, COL_V, ALIGNED) + elem, mask=in_state, other=0.0)
    elif V_KIND == 1:
        v_scale_old = tl.load(_ptr(row, COL_V_SCALE, tl.float32) + blk, mask=row_ok, other=1.0)
        v = tl.load(_eptr(base_f16, row, COL_V, ALIGNED) + elem, mask=in_state, other=0.0).to(tl.float32)
        v = v * tl.math.div_rn(tl.full(v_scale_old.shape, 1.0, tl.float32), v_scale_old)[:, None]
    else:
        v_max_old = tl.load(_ptr(row, COL_V_SCALE, tl.float32) + blk, mask=row_ok, other=1.0)  # the block's max
        k_old = tl.load(_ptr(row, COL_V_K, tl.float32) + blk, mask=row_ok, other=1.0)
        code = _load_fp8(bases, row, COL_V, elem, in_state, False, USE_LIBDEVICE, ALIGNED)
        inv_k = tl.math.div_rn(tl.full(k_old.shape, 1.0, tl.float32), k_old)
        if EXACT_POW:
            hp = code * tl.math.div_rn(one, _E4M3_MAX)  # codes = 448·sign·(|v|/max)^k
            mag = _pow_elem(tl.abs(hp), inv_k[:, None], USE_LIBDEVICE, EXACT_POW) * v_max_old[:, None]
            v = tl.where(hp < 0.0, -mag, mag)  # torch.sign(hp) * |hp|^(1/k) * max (|0|^(1/k) = 0)
        else:
            # v = max·(code/448)^(1/k) = 2^(lg2(code)/k + lg2(max) − lg2(448)/k): one lg2, one FMA, one ex2 per
            # element; the codes of v ≥ 0 are never negative, and lg2(0) = −inf gives exactly 0.
            c_row = _lg2(v_max_old, USE_LIBDEVICE) - inv_k * _LOG2_E4M3_MAX
            v = tl.exp2(inv_k[:, None] * _lg2(code, USE_LIBDEVICE) + c_row[:, None])

    # ---- Adam / AdamW (FP32)
    if DECOUPLED:
        w = w * tl.load(sc + S_WD_FACTOR)
    else:
        g = g + tl.load(sc + S_WD) * w
    weight = tl.load(sc + S_LERP_W)  # CUDA's lerp is one FMA on either side of 0.5
    diff = g - m
    if weight < 0.5:
        m = _fma(weight, diff, m, USE_LIBDEVICE)
    else:
        m = _fma(-diff, tl.load(sc + S_LERP_1MW), g, USE_LIBDEVICE)
    v = v * tl.load(sc + S_BETA2) + (tl.load(sc + S_1MB2) * g) * g
    denom = _div(_sqrt(v, FAST_MATH), tl.load(sc + S_BC2_SQRT), FAST_MATH) + tl.load(sc + S_EPS)
    w = w - tl.load(sc + S_STEP_SIZE) * _div(m, denom, FAST_MATH)

    # ---- encode + store the first moment
    if M_KIND == 0:
        tl.store(_eptr(base_f32, row, COL_M, ALIGNED) + elem, m, mask=st_mask)
    elif M_KIND == 1:
        tl.store(_eptr(base_u16, row, COL_M, ALIGNED) + elem, _f32_to_bf16_rn(m), mask=st_mask)
    else:
        m_amax = tl.max(tl.where(in_state, tl.abs(m), 0.0), axis=1)
        m_scale = _scale_from_amax(m_amax, _E4M3_MAX, False)
        scaled = tl.minimum(tl.maximum(m * m_scale[:, None], -_E4M3_MAX), _E4M3_MAX)
        _store_e4m3(bases, row, COL_M, elem, scaled, st_mask, USE_LIBDEVICE, ALIGNED)
        tl.store(_ptr(row, COL_M_SCALE, tl.float32) + blk, m_scale, mask=row_st)

    # ---- encode + store the second moment
    if V_KIND == 0:
        tl.store(_eptr(base_f32, row, COL_V, ALIGNED) + elem, v, mask=st_mask)
    elif V_KIND == 1:
        v_amax = tl.max(tl.where(in_state, tl.abs(v), 0.0), axis=1)
        v_scale = _scale_from_amax(v_amax, _FP16_MAX, True)
        scaled = tl.minimum(tl.maximum(v * v_scale[:, None], -_FP16_MAX), _FP16_MAX)
        tl.store(_eptr(base_f16, row, COL_V, ALIGNED) + elem, scaled.to(tl.float16), mask=st_mask)
        tl.store(_ptr(row, COL_V_SCALE, tl.float32) + blk, v_scale, mask=row_st)
    else:
        magnitude = tl.where(in_state, tl.abs(v), 0.0)
        block_max = tl.max(magnitude, axis=1)
        nonzero_min = tl.min(tl.where(magnitude > 0.0, magnitude, float("inf")), axis=1)
        denom = tl.where(block_max > 0.0, block_max, 1.0)
        if EXACT_POW:
            log_range = _log_row(tl.math.div_rn(block_max, nonzero_min), USE_LIBDEVICE, EXACT_POW)
            k = tl.math.div_rn(tl.full(log_range.shape, 1.0, tl.float32), log_range) * _E4M3_LOG_RANGE
            k = tl.minimum(k, _K_MAX)
            k = tl.where((k > 0.0) & (k < float("inf")), k, 1.0)
            # Normalised by the block max before the power, so tiny v never underflow (see optim/state_codec.py).
            expanded = _pow_elem(_div(magnitude, denom[:, None], FAST_MATH), k[:, None], USE_LIBDEVICE, EXACT_POW)
            expanded = tl.where(v < 0.0, -expanded, expanded)  # torch.sign(v) * (|v|/max)^k
            scaled = tl.minimum(tl.maximum(expanded * _E4M3_MAX, -_E4M3_MAX), _E4M3_MAX)
        else:
            # The same codes in the log domain: 448·(v/max)^k = 2^(k·lg2(v) + lg2(448) − k·lg2(max)) — one lg2, one
            # FMA, one ex2 per element (no division, no sign: v ≥ 0); k and the offset are per-block scalars. lg2(0)
            # = −inf gives code 0; an all-zero block gets k = 1 and a finite offset (lg2 of its denom 1 is 0).
            lg_max = _lg2(denom, USE_LIBDEVICE)
            k = tl.math.div_rn(tl.full(lg_max.shape, _LOG2_E4M3_RANGE, tl.float32),
                               lg_max - _lg2(nonzero_min, USE_LIBDEVICE))
            k = tl.minimum(k, _K_MAX)
            k = tl.where((k > 0.0) & (k < float("inf")), k, 1.0)
            offset = _LOG2_E4M3_MAX - k * lg_max
            scaled = tl.minimum(tl.exp2(k[:, None] * _lg2(magnitude, USE_LIBDEVICE) + offset[:, None]), _E4M3_MAX)
        _store_e4m3(bases, row, COL_V, elem, scaled, st_mask, USE_LIBDEVICE, ALIGNED)
        tl.store(_ptr(row, COL_V_SCALE, tl.float32) + blk, denom, mask=row_st)
        tl.store(_ptr(row, COL_V_K, tl.float32) + blk, k, mask=row_st)

    # ---- master + parameter
    if MASTER_KIND == 2 or MASTER_KIND == 3:
        seed = tl.load(sc + S_SEED).to(tl.uint32, bitcast=True)
        w_bits = _sr_bf16(w, elem, seed)
        if MASTER_KIND == 3:
            tl.store(_eptr(base_u16, row, COL_MASTER, ALIGNED) + elem, w_bits, mask=st_mask)
        w = _bf16_bits_to_f32(w_bits)  # the parameter is the rounded master cast to its dtype
        if PARAM_KIND == 0:
            tl.store(_eptr(base_u16, row, COL_PARAM, ALIGNED) + elem, w_bits, mask=in_param & ok)
    elif MASTER_KIND == 1:
        tl.store(_eptr(base_f32, row, COL_MASTER, ALIGNED) + elem, w, mask=st_mask)
    if not (PARAM_KIND == 0 and (MASTER_KIND == 2 or MASTER_KIND == 3)):
        if PARAM_KIND == 0:
            tl.store(_eptr(base_u16, row, COL_PARAM, ALIGNED) + elem, _f32_to_bf16_rn(w), mask=in_param & ok)
        elif PARAM_KIND == 1:
            tl.store(_eptr(base_f16, row, COL_PARAM, ALIGNED) + elem, w.to(tl.float16), mask=in_param & ok)
        else:
            tl.store(_eptr(base_f32, row, COL_PARAM, ALIGNED) + elem, w, mask=in_param & ok)
