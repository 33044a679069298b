"""Triton ``@jit`` kernels of the fused row-scaled INT8 quantizer; imported only by
:mod:`lowbit_amp.kernels.int8_row_quant`, lazily (importing ``lowbit_amp`` never imports Triton).

Numerics: those of :func:`lowbit_amp.int8.row_scaled.quantize_rows` bit for bit; the launcher's docstring says how
each step reproduces the reference's float operations.
"""

import triton
import triton.language as tl

from lowbit_amp.kernels._int8_triton import round_codes, scale_of


@triton.jit
def _nan_max(a, b):
    # PropagateNan.ALL: torch's amax propagates NaN, but Triton's default maximum (maxnum) drops it on the GPU
    # (PTX max.f32 returns the other operand) while the interpreter (np.maximum) keeps it. With ALL both keep it, so a
    # NaN gives the reference's scale (1) on either.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(v, axis: tl.constexpr):
    """max |v| along ``axis``, NaN if any is NaN: as an integer max of the bit patterns of |v| (sign bit clear, so
    they order as the values do, and every NaN pattern is above +inf's). An integer max is one instruction on the GPU
    and one NumPy reduction in the interpreter, where ``tl.reduce`` with a NaN-propagating combine runs per element
    in Python (a 200x300 case, with and without fallback, 4-row programs: 15.1 s with it, 4.7 s with this)."""
    bits = tl.max(tl.abs(v).to(tl.int32, bitcast=True), axis)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _codes(y):
    # NaN -> 0 before the clamp, as the reference's nan_to_num: round_codes' clamp (maxnum on the GPU) would turn a
    # NaN into -127 there before its own NaN test.
    return round_codes(tl.where(y == y, y, 0.0))  # noqa: PLR0124 - False for NaN only


@triton.jit
def _row_amax_from_blocks(amax_ptr, flag_ptr, offs_m, m_ok, mt, s_am, s_ak, s_fm, s_fk, RB: tl.constexpr,
                          CH: tl.constexpr, N_KB: tl.constexpr, FALLBACK: tl.constexpr):
    """Rows' amaxes from pass 1's ``1 x BK`` block amaxes: with ``FALLBACK`` over the unflagged blocks only (the
    flags of the rows' ``TILE_M``-row tile ``mt``), or the whole row's where that is 0; without, the whole row's."""
    clean = tl.zeros((RB,), tl.float32)
    full = tl.zeros((RB,), tl.float32)
    for c0 in range(0, N_KB, CH):
        kbs = c0 + tl.arange(0, CH)
        kb_ok = kbs < N_KB
        a = tl.load(amax_ptr + offs_m[:, None] * s_am + kbs[None, :] * s_ak, mask=m_ok[:, None] & kb_ok[None, :],
                    other=0.0)
        if FALLBACK:
            flagged = tl.load(flag_ptr + mt * s_fm + kbs * s_fk, mask=kb_ok, other=0) != 0
            clean = _nan_max(clean, _amax(tl.where(flagged[None, :], 0.0, a), 1))
        full = _nan_max(full, _amax(a, 1))
    if FALLBACK:
        return tl.where(clean > 0, clean, full)  # NaN > 0 is False: the whole row's amax, NaN too, as torch
    return full


@triton.jit
def row_block_amax_kernel(
    x_ptr, amax_ptr, tile_ptr,
    M, K, s_xm, s_xk, s_am, s_ak, s_tm, s_tk,
    TILE_M: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr,
):
    """Pass 1 (fallback only): per ``1 x BK`` block its amax, and per ``TILE_M x BK`` tile (one program) its amax.

    The tile amax is reduced here rather than by torch from the block amaxes (one op fewer per call); the outlier
    decision itself needs the median over all tiles, so it cannot be fused into this pass."""
    mt = tl.program_id(0)
    kb = tl.program_id(1)
    ks = kb * BK + tl.arange(0, BK)
    k_ok = ks < K
    tile_amax = tl.zeros((RB,), tl.float32)
    for i in tl.static_range(TILE_M // RB):
        offs_m = mt * TILE_M + i * RB + tl.arange(0, RB)
        m_ok = offs_m < M
        ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + ks[None, :] * s_xk
        x = tl.load(ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        block_amax = _amax(tl.abs(x), 1)
        tl.store(amax_ptr + offs_m * s_am + kb * s_ak, block_amax, mask=m_ok)
        tile_amax = _nan_max(tile_amax, block_amax)
    tl.store(tile_ptr + mt * s_tm + kb * s_tk, _amax(tile_amax, 0))


@triton.jit
def row_quantize_kernel(
    x_ptr, amax_ptr, flag_ptr, q_ptr, scale_ptr, q2_ptr, scale2_ptr,
    M, K, s_xm, s_xk, s_am, s_ak, s_fm, s_fk, s_qm, s_qk, s_q2m, s_q2k,
    FALLBACK: tl.constexpr, TILE_M: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr,
    N_KB: tl.constexpr, STAGES: tl.constexpr, HP: tl.constexpr,
):
    """One program per ``RB`` rows (RB divides TILE_M, so all of them share one row of fallback flags), over all of K.

    Owning whole rows lets one launch finish the rows: row scale -> codes (and the residual's row amax over the
    flagged tiles, from the tile already in registers) -> residual scale -> residual codes, which re-reads x in the
    flagged tiles only. ``q2`` is written inside flagged tiles only; elsewhere it keeps whatever the buffer held.
    ``HP`` (the ``hp`` fallback): the flagged tiles' codes are written as zeros instead, and there is no residual.

    Row scale: with FALLBACK, the amax of the row's unflagged ``1 x BK`` blocks (from pass 1's block amaxes), or of
    the whole row where that is 0; without, the amax of the whole row, from a first loop over x.

    ``N_KB`` (the number of K blocks) is a constexpr, as the GEMMs': Triton's interpreter rejects loop bounds computed
    from integer arguments; one compile per K, which the GEMM of the same layer needs anyway. ``STAGES``: the loops
    over all of x are software-pipelined (``cp.async`` on sm_90, checked in the PTX) so that a program has more than
    one ``RB x BK`` load in flight: without it the whole grid has only ``M x BK`` elements in flight, whatever RB is.
    Not timed."""
    pid = tl.program_id(0)
    offs_m = pid * RB + tl.arange(0, RB)
    m_ok = offs_m < M
    mt = (pid * RB) // TILE_M
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * s_qm
    if FALLBACK:
        row_amax = _row_amax_from_blocks(amax_ptr, flag_ptr, offs_m, m_ok, mt, s_am, s_ak, s_fm, s_fk, RB, CH, N_KB,
                                         True)
    else:
        row_amax = tl.zeros((RB,), tl.float32)
        for kb in tl.range(0, N_KB, num_stages=STAGES):
            ks = kb * BK + offs_k
            x = tl.load(x_rows + ks[None, :] * s_xk, mask=m_ok[:, None] & (ks < K)[None, :], other=0.0)
            row_amax = _nan_max(row_amax, _amax(tl.abs(x.to(tl.float32)), 1))
    scale = scale_of(row_amax)
    tl.store(scale_ptr + offs_m, scale, mask=m_ok)
    # The reference's dequantization: q * (1 / scale), IEEE reciprocal then a product rounded on its own (the launch
    # turns FMA contraction off, so ``x - q * inv`` is two roundings on the GPU too).
    inv = tl.math.div_rn(tl.full((RB,), 1.0, tl.float32), scale)
    res_amax = tl.zeros((RB,), tl.float32)
    for kb in tl.range(0, N_KB, num_stages=STAGES):
        ks = kb * BK + offs_k
        mask = m_ok[:, None] & (ks < K)[None, :]
        x = tl.load(x_rows + ks[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        q = _codes(x * scale[:, None])
        if FALLBACK and HP:
            q = tl.where(tl.load(flag_ptr + mt * s_fm + kb * s_fk) != 0, tl.zeros_like(q), q)
        tl.store(q_rows + ks[None, :] * s_qk, q, mask=mask)
        if FALLBACK and not HP:  # noqa: SIM102 - constexprs: the branch is compiled out otherwise
            if tl.load(flag_ptr + mt * s_fm + kb * s_fk) != 0:
                missed = x - q.to(tl.float32) * inv[:, None]  # 0 where masked (x and q are 0 there)
                res_amax = _nan_max(res_amax, _amax(tl.abs(missed), 1))
    if FALLBACK and not HP:
        # Rows without a flagged tile: residual amax 0 -> scale 1, as the reference (its residual is all zeros there).
        scale2 = scale_of(res_amax)
        tl.store(scale2_ptr + offs_m, scale2, mask=m_ok)
        q2_rows = q2_ptr + offs_m.to(tl.int64)[:, None] * s_q2m
        for kb in range(N_KB):
            if tl.load(flag_ptr + mt * s_fm + kb * s_fk) != 0:
                ks = kb * BK + offs_k
                mask = m_ok[:, None] & (ks < K)[None, :]
                x = tl.load(x_rows + ks[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
                q = _codes(x * scale[:, None])  # recomputed (the same operations): no load of the codes just stored
                missed = x - q.to(tl.float32) * inv[:, None]
                tl.store(q2_rows + ks[None, :] * s_q2k, _codes(missed * scale2[:, None]), mask=mask)


@triton.jit
def row_quantize_split_kernel(
    x_ptr, amax_ptr, flag_ptr, q_ptr, scale_ptr,
    M, K, s_xm, s_xk, s_am, s_ak, s_fm, s_fk, s_qm, s_qk,
    FALLBACK: tl.constexpr, TILE_M: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr,
    N_KB: tl.constexpr, KB_PER: tl.constexpr, STAGES: tl.constexpr, HP: tl.constexpr,
):
    """Pass 2 with K split over programs: program ``(i, g)`` writes rows ``i·RB ..`` over K blocks ``g·KB_PER ..``.

    For inputs whose rows are the contiguous dim (the weight gradient's ``xᵀ``/``dyᵀ``, transposed views of
    row-major activations): a load is ``RB`` contiguous elements per column, so ``RB`` must be large (64: 128 bytes of
    bf16) for coalesced loads, and :func:`row_quantize_kernel`, one program per ``RB`` whole rows, would then have
    too few programs (4096 rows / 64 = 64). Here every program re-derives its rows' scale from pass 1's block amaxes
    (``RB x N_KB`` floats, L2-resident: every K group of a row block reads the same ones), so pass 1 runs with or
    without fallback. No residual (its row amax needs the whole row's codes first): ``residual`` fallback keeps
    :func:`row_quantize_kernel`. Same scale formula and codes as that kernel, bit for bit."""
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    offs_m = pid * RB + tl.arange(0, RB)
    m_ok = offs_m < M
    mt = (pid * RB) // TILE_M
    row_amax = _row_amax_from_blocks(amax_ptr, flag_ptr, offs_m, m_ok, mt, s_am, s_ak, s_fm, s_fk, RB, CH, N_KB,
                                     FALLBACK)
    scale = scale_of(row_amax)
    tl.store(scale_ptr + offs_m, scale, mask=m_ok & (grp == 0))
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm  # s_xm == 1 arrives as a constexpr: vector loads
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * s_qm
    for j in tl.range(0, KB_PER, num_stages=STAGES):  # a constexpr bound: the interpreter rejects computed ones
        kb = grp * KB_PER + j
        ks = kb * BK + offs_k
        mask = m_ok[:, None] & (ks < K)[None, :]
        x = tl.load(x_rows + ks.to(tl.int64)[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        q = _codes(x * scale[:, None])
        if FALLBACK and HP:
            q = tl.where(tl.load(flag_ptr + mt * s_fm + kb * s_fk, mask=kb < N_KB, other=0) != 0, tl.zeros_like(q), q)
        tl.store(q_rows + ks[None, :] * s_qk, q, mask=mask)
