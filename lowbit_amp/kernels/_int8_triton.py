"""Triton ``@jit`` kernels of the INT8 path; imported only by :mod:`lowbit_amp.kernels.int8_gemm`'s launchers, lazily.

Kept apart so that importing the launchers (and ``lowbit_amp``) never imports Triton. See that module for the design
and for the measurements behind each choice.
"""

import triton
import triton.language as tl

# INT32 -> FP32 without a conversion instruction: the MMA starts from the integer 0x4B400000, the bit pattern of the
# float 1.5·2²³, so the INT32 result ``0x4B400000 + part`` *is* the float ``1.5·2²³ + part`` (exact while
# |part| < 2²², i.e. K block ≤ 256 with codes in [-127, 127]); one exact FADD removes the offset. See int8_gemm.py.
MAGIC_I = tl.constexpr(0x4B400000)
MAGIC_F = tl.constexpr(12582912.0)


@triton.jit
def _block_product(a, b, MAGIC: tl.constexpr):
    """FP32 value of the INT32 product of one K block (exact: |a·b| ≤ 127²·BK < 2²²)."""
    if MAGIC:
        part = tl.dot(a, b, acc=tl.full((a.shape[0], b.shape[1]), MAGIC_I, tl.int32), out_dtype=tl.int32)
        return part.to(tl.float32, bitcast=True) - MAGIC_F
    else:
        return tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)


@triton.jit
def _block_product_int(a, b, MAGIC: tl.constexpr):
    """The INT32 product of one K block, offset by MAGIC_I when MAGIC (see _int_to_f32)."""
    if MAGIC:
        return tl.dot(a, b, acc=tl.full((a.shape[0], b.shape[1]), MAGIC_I, tl.int32), out_dtype=tl.int32)
    else:
        return tl.dot(a, b, out_dtype=tl.int32)


@triton.jit
def _int_to_f32(part, MAGIC: tl.constexpr):
    if MAGIC:
        return part.to(tl.float32, bitcast=True) - MAGIC_F
    else:
        return part.to(tl.float32)


@triton.jit
def _scale(sa_inv, sb_tile, sb_rows, kb, s_sbk, n_ok, SB_SCALAR: tl.constexpr):
    """The combined dequantization multiplier of K block kb: ``sinv_a[m] · sinv_b[n]``."""
    if SB_SCALAR:
        return (sa_inv * tl.load(sb_tile + kb * s_sbk))[:, None]
    else:
        return sa_inv[:, None] * tl.load(sb_rows + kb * s_sbk, mask=n_ok, other=0.0)[None, :]


@triton.jit
def _load_b(b_src, off_n, k0, offs_k, offs_n, n_ok, K, s_bk, s_bn,
            BNS: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr, EVEN: tl.constexpr):
    """One ``BK x BNS`` tile of the transposed weight; K is the contiguous dim (wgmma's INT8 operands are K-major)."""
    if USE_TMA:
        return b_src.load([off_n, k0]).T
    else:
        ptrs = b_src + (k0 + offs_k)[:, None] * s_bk + offs_n[None, :] * s_bn
        if EVEN:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=((k0 + offs_k) < K)[:, None] & n_ok[None, :], other=0)


@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """The (M tile, N tile) of program ``pid`` in grouped order: GROUP_M consecutive M tiles share each N tile, so the
    weight tile they read stays in L2 between them."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def int8_block_mm_kernel(
    a_src, b_src, c_ptr, sa_ptr, sb_ptr, bias_ptr,
    a2_src, sa2_ptr, b2_src, fb_idx_ptr, fb_cnt_ptr,
    M, N, K,
    s_am, s_ak, s_bn, s_bk, s_cm, s_cn, s_sam, s_sak, s_sbn, s_sbk,
    s_a2m, s_a2k, s_sa2m, s_sa2k, s_b2n, s_b2k, s_fb,
    A_ROWS: tl.constexpr, B_ROWS: tl.constexpr, SB_SCALAR: tl.constexpr, FALLBACK: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, N_KB: tl.constexpr, DYNAMIC_FB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_N: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr, MAGIC: tl.constexpr, INTERLEAVE: tl.constexpr,
    FB_STAGES: tl.constexpr,
):
    """``c = a · bᵀ`` block-scaled; ``sa``: a's raw scales (inverted here), ``sb``: b's *inverse* scales."""
    BNS: tl.constexpr = BN // SPLIT_N
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    off_m = pid_m * BM
    off_n0 = pid_n * BN
    off_n1 = off_n0 + BNS
    offs_m = off_m + tl.arange(0, BM)
    offs_n0 = off_n0 + tl.arange(0, BNS)
    offs_n1 = off_n1 + tl.arange(0, BNS)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n0_ok = offs_n0 < N
    n1_ok = offs_n1 < N
    sa_rows = sa_ptr + (offs_m // A_ROWS) * s_sam
    sb0_rows = sb_ptr + (offs_n0 // B_ROWS) * s_sbn
    sb1_rows = sb_ptr + (offs_n1 // B_ROWS) * s_sbn
    sb0_tile = sb_ptr + (off_n0 // B_ROWS) * s_sbn
    sb1_tile = sb_ptr + (tl.minimum(off_n1, N - 1) // B_ROWS) * s_sbn
    if not USE_TMA:
        a_tile = a_src + offs_m[:, None] * s_am + offs_k[None, :] * s_ak
    acc0 = tl.zeros((BM, BNS), dtype=tl.float32)
    acc1 = tl.zeros((BM, BNS), dtype=tl.float32)  # the second N half (SPLIT_N == 2) only; dead code otherwise
    if FALLBACK != 0:
        # The fallback K blocks first: after the main loop, their pointers and indices stayed live through it and
        # made it spill (ptxas, 128x128 tiles: 96-136 B of stack inside the main loop). Only the FP32 summation
        # order differs from the reference (fallback terms first).
        count = tl.load(fb_cnt_ptr + pid_m)
        kb_next = tl.load(fb_idx_ptr + pid_m * s_fb)
        if DYNAMIC_FB:
            for i in tl.range(0, count, num_stages=FB_STAGES):
                kb = kb_next
                kb_next = tl.load(fb_idx_ptr + pid_m * s_fb + tl.minimum(i + 1, N_KB - 1))
                acc0, acc1 = fallback_step(acc0, acc1, kb, off_m, off_n0, off_n1, offs_m, offs_n0, offs_n1, offs_k,
                                           m_ok, n0_ok, n1_ok, K, b_src, s_bk, s_bn, sb0_rows, sb1_rows, sb0_tile,
                                           sb1_tile, s_sbk, a2_src, sa2_ptr, b2_src, s_a2m, s_a2k, s_sa2m, s_sa2k,
                                           s_b2n, s_b2k, A_ROWS, SB_SCALAR, FALLBACK, BK, SPLIT_N, MAGIC, USE_TMA,
                                           EVEN)
        else:  # Triton's interpreter rejects loop bounds loaded from memory: a static bound with a guard
            for i in range(0, N_KB):
                if i < count:
                    kb = tl.load(fb_idx_ptr + pid_m * s_fb + i)
                    acc0, acc1 = fallback_step(acc0, acc1, kb, off_m, off_n0, off_n1, offs_m, offs_n0, offs_n1, offs_k,
                                               m_ok, n0_ok, n1_ok, K, b_src, s_bk, s_bn, sb0_rows, sb1_rows, sb0_tile,
                                               sb1_tile, s_sbk, a2_src, sa2_ptr, b2_src, s_a2m, s_a2k, s_sa2m, s_sa2k,
                                               s_b2n, s_b2k, A_ROWS, SB_SCALAR, FALLBACK, BK, SPLIT_N, MAGIC, USE_TMA,
                                               EVEN)
    # The scales of K block kb+1 are loaded during block kb (their L2 latency then overlaps an MMA).
    sa_inv_n = tl.math.div_rn(tl.full((BM,), 1.0, tl.float32), tl.load(sa_rows, mask=m_ok, other=1.0))
    for kb in range(0, N_KB):  # N_KB constexpr: one compile per K, and Triton's interpreter needs it
        k0 = kb * BK
        kn = tl.minimum(kb + 1, N_KB - 1)
        sa_inv = sa_inv_n
        sa_inv_n = tl.math.div_rn(tl.full((BM,), 1.0, tl.float32), tl.load(sa_rows + kn * s_sak, mask=m_ok, other=1.0))
        if USE_TMA:
            a = a_src.load([off_m, k0])
        elif EVEN:
            a = tl.load(a_tile + k0 * s_ak)
        else:
            a = tl.load(a_tile + k0 * s_ak, mask=m_ok[:, None] & ((k0 + offs_k) < K)[None, :], other=0)
        b0 = _load_b(b_src, off_n0, k0, offs_k, offs_n0, n0_ok, K, s_bk, s_bn, BNS, BK, USE_TMA, EVEN)
        scale0 = _scale(sa_inv, sb0_tile, sb0_rows, kb, s_sbk, n0_ok, SB_SCALAR)
        if INTERLEAVE and SPLIT_N == 2:  # both halves' MMAs issued before either promotion
            b1 = _load_b(b_src, off_n1, k0, offs_k, offs_n1, n1_ok, K, s_bk, s_bn, BNS, BK, USE_TMA, EVEN)
            scale1 = _scale(sa_inv, sb1_tile, sb1_rows, kb, s_sbk, n1_ok, SB_SCALAR)
            q0 = _block_product_int(a, b0, MAGIC)
            q1 = _block_product_int(a, b1, MAGIC)
            acc0 += _int_to_f32(q0, MAGIC) * scale0
            acc1 += _int_to_f32(q1, MAGIC) * scale1
        else:
            acc0 += _block_product(a, b0, MAGIC) * scale0
            if SPLIT_N == 2:
                b1 = _load_b(b_src, off_n1, k0, offs_k, offs_n1, n1_ok, K, s_bk, s_bn, BNS, BK, USE_TMA, EVEN)
                acc1 += _block_product(a, b1, MAGIC) * _scale(sa_inv, sb1_tile, sb1_rows, kb, s_sbk, n1_ok,
                                                              SB_SCALAR)
    _store_half(acc0, c_ptr, bias_ptr, offs_m, offs_n0, m_ok, n0_ok, s_cm, s_cn, HAS_BIAS, EVEN)
    if SPLIT_N == 2:
        _store_half(acc1, c_ptr, bias_ptr, offs_m, offs_n1, m_ok, n1_ok, s_cm, s_cn, HAS_BIAS, EVEN)


@triton.jit
def _store_half(acc, c_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, s_cm, s_cn, HAS_BIAS: tl.constexpr,
                EVEN: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn
    if EVEN:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fallback_half(acc, a2, kb, off_n, ks, k_ok, offs_n, n_ok, sa2_inv, b_src, s_bk, s_bn, sb_rows, sb_tile,
                   s_sbk, b2_src, s_b2n, s_b2k, K, offs_k, SB_SCALAR: tl.constexpr, FALLBACK: tl.constexpr,
                   MAGIC: tl.constexpr, USE_TMA: tl.constexpr, EVEN: tl.constexpr, BNS: tl.constexpr,
                   BK: tl.constexpr):
    if FALLBACK == 1:
        b = _load_b(b_src, off_n, kb * BK, offs_k, offs_n, n_ok, K, s_bk, s_bn, BNS, BK, USE_TMA, EVEN)
        acc += _block_product(a2, b, MAGIC) * _scale(sa2_inv, sb_tile, sb_rows, kb, s_sbk, n_ok, SB_SCALAR)
    else:
        b2 = _load_b(b2_src, off_n, kb * BK, offs_k, offs_n, n_ok, K, s_b2k, s_b2n, BNS, BK, USE_TMA, EVEN)
        acc += tl.dot(a2, b2, out_dtype=tl.float32)
    return acc


@triton.jit
def fallback_step(acc0, acc1, kb, off_m, off_n0, off_n1, offs_m, offs_n0, offs_n1, offs_k, m_ok, n0_ok, n1_ok, K,
                  b_src, s_bk, s_bn, sb0_rows, sb1_rows, sb0_tile, sb1_tile, s_sbk, a2_src, sa2_ptr, b2_src,
                  s_a2m, s_a2k, s_sa2m, s_sa2k, s_b2n, s_b2k,
                  A_ROWS: tl.constexpr, SB_SCALAR: tl.constexpr, FALLBACK: tl.constexpr, BK: tl.constexpr,
                  SPLIT_N: tl.constexpr, MAGIC: tl.constexpr, USE_TMA: tl.constexpr, EVEN: tl.constexpr):
    """One fallback K block ``kb`` of this M tile: the residual INT8 product (mode 1) or the bf16 product (mode 2).

    Same loads as the main loop (TMA descriptors where the operands allow): pointer loads staged the tiles through
    registers and made the whole kernel spill (ptxas: 688 B of stack for the 128x128/4-warp config)."""
    BNS: tl.constexpr = offs_n0.shape[0]
    ks = kb * BK + offs_k
    k_ok = ks < K
    if USE_TMA:
        a2 = a2_src.load([off_m, kb * BK])
    elif EVEN:
        a2 = tl.load(a2_src + offs_m[:, None] * s_a2m + ks[None, :] * s_a2k)
    else:
        a2 = tl.load(a2_src + offs_m[:, None] * s_a2m + ks[None, :] * s_a2k, mask=m_ok[:, None] & k_ok[None, :],
                     other=0)
    if FALLBACK == 1:
        sa2 = tl.load(sa2_ptr + (offs_m // A_ROWS) * s_sa2m + kb * s_sa2k, mask=m_ok, other=1.0)
        sa2_inv = tl.math.div_rn(tl.full(sa2.shape, 1.0, tl.float32), sa2)
    else:
        sa2_inv = tl.zeros((offs_m.shape[0],), tl.float32)
    acc0 = _fallback_half(acc0, a2, kb, off_n0, ks, k_ok, offs_n0, n0_ok, sa2_inv, b_src, s_bk, s_bn, sb0_rows,
                          sb0_tile, s_sbk, b2_src, s_b2n, s_b2k, K, offs_k, SB_SCALAR, FALLBACK, MAGIC, USE_TMA, EVEN,
                          BNS, BK)
    if SPLIT_N == 2:
        acc1 = _fallback_half(acc1, a2, kb, off_n1, ks, k_ok, offs_n1, n1_ok, sa2_inv, b_src, s_bk, s_bn, sb1_rows,
                              sb1_tile, s_sbk, b2_src, s_b2n, s_b2k, K, offs_k, SB_SCALAR, FALLBACK, MAGIC, USE_TMA,
                              EVEN, BNS, BK)
    return acc0, acc1


@triton.jit
def fallback_index_kernel(flag_ptr, idx_ptr, cnt_ptr, n_kb, s_fm, s_fk, s_im, NKB_P2: tl.constexpr):
    """Per M tile (program): the count of flagged K blocks and their indices first, ascending (one launch).

    The unflagged K blocks follow, ascending, so every entry of a row is a valid K-block index: the index buffer needs
    no zero-fill launch, and a look-ahead load past the count (the GEMM's fallback loop prefetches the next index)
    still reads a valid index."""
    row = tl.program_id(0)
    kbs = tl.arange(0, NKB_P2)
    valid = kbs < n_kb
    flag = tl.load(flag_ptr + row * s_fm + kbs * s_fk, mask=valid, other=0) != 0
    flagged = flag.to(tl.int32)
    count = tl.sum(flagged, axis=0)
    pos = tl.where(flag, tl.cumsum(flagged, axis=0) - 1, count + tl.cumsum(1 - flagged, axis=0) - 1)
    tl.store(idx_ptr + row * s_im + pos, kbs, mask=valid)
    tl.store(cnt_ptr + row, count)


@triton.jit
def scale_of(amax):
    usable = (amax > 0) & (amax <= 3.4028234663852886e38)  # finite and positive (NaN compares false)
    # 127 * (1 / amax), not 127 / amax: torch evaluates ``127.0 / amax`` (the core formula) as reciprocal-then-multiply
    recip = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.where(usable, amax, 1.0))
    scale = tl.minimum(recip * 127.0, 8.507059173023462e37)  # 2**126, the core formula's cap
    return tl.where(usable, scale, 1.0)


@triton.jit
def round_codes(y):
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds |y| < 2**22 half-to-even, as torch.round
    return tl.where(y == y, y, 0.0).to(tl.int8)


@triton.jit
def quantize_main_kernel(
    x_ptr, amax_ptr, q_ptr, scale_ptr,
    M, K, s_xm, s_xk, s_am, s_ak, s_qm, s_qk,
    RB: tl.constexpr, BK: tl.constexpr,
):
    """The one full pass over x: per ``1 x BK`` block its amax (kept for the fallback decision), scale and codes."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    offs_m = pid_m * RB + tl.arange(0, RB)
    ks = kb * BK + tl.arange(0, BK)
    m_ok = offs_m < M
    mask = m_ok[:, None] & (ks[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * s_xm + ks[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
    row_amax = tl.max(tl.abs(x), axis=1)
    tl.store(amax_ptr + offs_m * s_am + kb * s_ak, row_amax, mask=m_ok)
    scale = scale_of(row_amax)
    tl.store(scale_ptr + offs_m * s_am + kb * s_ak, scale, mask=m_ok)
    tl.store(q_ptr + offs_m[:, None] * s_qm + ks[None, :] * s_qk, round_codes(x * scale[:, None]), mask=mask)


@triton.jit
def quantize_fallback_kernel(
    x_ptr, scale_ptr, flag_ptr, q_ptr, q2_ptr, scale2_ptr,
    M, K, s_xm, s_xk, s_am, s_ak, s_fm, s_fk, s_qm, s_qk,
    MODE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """Flagged ``BM x BK`` tiles only (others return at once): residual codes (MODE 1) or zeroed codes (MODE 2)."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    flag = tl.load(flag_ptr + pid_m * s_fm + kb * s_fk)
    if flag != 0:
        offs_m = pid_m * BM + tl.arange(0, BM)
        ks = kb * BK + tl.arange(0, BK)
        m_ok = offs_m < M
        mask = m_ok[:, None] & (ks[None, :] < K)
        q_offs = offs_m[:, None] * s_qm + ks[None, :] * s_qk
        if MODE == 2:
            tl.store(q_ptr + q_offs, tl.zeros((BM, BK), tl.int8), mask=mask)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * s_xm + ks[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + offs_m * s_am + kb * s_ak, mask=m_ok, other=1.0)
            q = tl.load(q_ptr + q_offs, mask=mask, other=0)
            scale_inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
            missed = x - q.to(tl.float32) * scale_inv[:, None]
            missed = tl.where(mask, missed, 0.0)
            scale2 = scale_of(tl.max(tl.abs(missed), axis=1))
            tl.store(scale2_ptr + offs_m * s_am + kb * s_ak, scale2, mask=m_ok)
            tl.store(q2_ptr + q_offs, round_codes(missed * scale2[:, None]), mask=mask)


@triton.jit
def _load_tile(src, off_r, k0, offs_r, r_ok, K, s_r, s_k, BK: tl.constexpr, USE_TMA: tl.constexpr,
               EVEN: tl.constexpr):
    """One ``BR x BK`` K-major tile of a row-major int8 operand."""
    if USE_TMA:
        tile = src.load([off_r, k0])
    else:
        ks = k0 + tl.arange(0, BK)
        ptrs = src + offs_r[:, None] * s_r + ks[None, :] * s_k
        if EVEN:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=r_ok[:, None] & (ks < K)[None, :], other=0)
    return tile


@triton.jit
def _row_fallback_half(out, a2_src, b_src, sa2_ptr, fb_idx_ptr, count, pid_m, off_m, off_n, offs_m, offs_n, m_ok,
                       n_ok, K, s_a2m, s_a2k, s_bn, s_bk, s_fb, N_KB: tl.constexpr, BK: tl.constexpr,
                       USE_TMA: tl.constexpr, EVEN: tl.constexpr, DYNAMIC_FB: tl.constexpr, FB_STAGES: tl.constexpr,
                       FB_TMA: tl.constexpr):
    """``out += float(Σ_flagged kb q2 · q_bᵀ) · sinv_a2[m]``: the residual codes share one scale per row, so this M
    tile's flagged K blocks accumulate in INT32 like the main loop (software-pipelined; the next block's index is
    loaded one iteration ahead so that no load waits on the index load) and are promoted once."""
    acc = tl.zeros(out.shape, dtype=tl.int32)
    if DYNAMIC_FB:
        kb_next = tl.load(fb_idx_ptr + pid_m * s_fb)
        for i in tl.range(0, count, num_stages=FB_STAGES):
            kb = kb_next
            kb_next = tl.load(fb_idx_ptr + pid_m * s_fb + tl.minimum(i + 1, N_KB - 1))
            a2 = _load_tile(a2_src, off_m, kb * BK, offs_m, m_ok, K, s_a2m, s_a2k, BK, FB_TMA, EVEN)
            b = _load_tile(b_src, off_n, kb * BK, offs_n, n_ok, K, s_bn, s_bk, BK, USE_TMA, EVEN)
            acc = tl.dot(a2, b.T, acc, out_dtype=tl.int32)
    else:  # Triton's interpreter rejects loop bounds loaded from memory: a static bound with a guard
        for i in range(0, N_KB):
            if i < count:
                kb = tl.load(fb_idx_ptr + pid_m * s_fb + i)
                a2 = _load_tile(a2_src, off_m, kb * BK, offs_m, m_ok, K, s_a2m, s_a2k, BK, FB_TMA, EVEN)
                b = _load_tile(b_src, off_n, kb * BK, offs_n, n_ok, K, s_bn, s_bk, BK, USE_TMA, EVEN)
                acc = tl.dot(a2, b.T, acc, out_dtype=tl.int32)
    sa2_inv = tl.math.div_rn(tl.full((out.shape[0],), 1.0, tl.float32), tl.load(sa2_ptr + offs_m, mask=m_ok,
                                                                                    other=1.0))
    return out + acc.to(tl.float32) * sa2_inv[:, None]


@triton.jit
def _row_hp_half(out, a2_src, b2_src, fb_idx_ptr, count, pid_m, off_m, off_n, offs_m, offs_n, m_ok, n_ok, K, s_a2m,
                 s_a2k, s_b2n, s_b2k, s_fb, N_KB: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr,
                 EVEN: tl.constexpr, DYNAMIC_FB: tl.constexpr, FB_STAGES: tl.constexpr):
    """``hp`` fallback: the flagged K blocks' bf16 products accumulate straight into the FP32 output tile (their INT8
    codes were zeroed), so this loop needs no accumulator of its own."""
    if DYNAMIC_FB:
        kb_next = tl.load(fb_idx_ptr + pid_m * s_fb)
        for i in tl.range(0, count, num_stages=FB_STAGES):
            kb = kb_next
            kb_next = tl.load(fb_idx_ptr + pid_m * s_fb + tl.minimum(i + 1, N_KB - 1))
            a2 = _load_tile(a2_src, off_m, kb * BK, offs_m, m_ok, K, s_a2m, s_a2k, BK, USE_TMA, EVEN)
            b2 = _load_tile(b2_src, off_n, kb * BK, offs_n, n_ok, K, s_b2n, s_b2k, BK, USE_TMA, EVEN)
            out = tl.dot(a2, b2.T, out)
    else:
        for i in range(0, N_KB):
            if i < count:
                kb = tl.load(fb_idx_ptr + pid_m * s_fb + i)
                a2 = _load_tile(a2_src, off_m, kb * BK, offs_m, m_ok, K, s_a2m, s_a2k, BK, USE_TMA, EVEN)
                b2 = _load_tile(b2_src, off_n, kb * BK, offs_n, n_ok, K, s_b2n, s_b2k, BK, USE_TMA, EVEN)
                out = tl.dot(a2, b2.T, out)
    return out


@triton.jit
def _row_epilogue(acc, sa_inv, c_src, bias_ptr, a2_src, b2_src, sa2_ptr, sb_ptr, fb_idx_ptr, fb_cnt_ptr,
                  pid_m, off_m, off_n, offs_m, offs_n, m_ok, n_ok, K, s_a2m, s_a2k, s_b2n, s_b2k, s_cm, s_cn, s_fb,
                  FALLBACK: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                  N_KB: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr, DYNAMIC_FB: tl.constexpr,
                  FB_STAGES: tl.constexpr, C_TMA: tl.constexpr, FB_TMA: tl.constexpr):
    """One N half: promote, add the fallback, scale, store (see int8_row_mm_kernel). ``FB_TMA``: the fallback's own
    operands (residual codes, or the 16-bit ``a``/``b``) through TMA; False when they are strided views (the weight
    gradient's transposed activations), which then take pointer loads while the main loop keeps TMA."""
    if FALLBACK == 2:
        out = acc.to(tl.float32) * sa_inv[:, None] * tl.load(sb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        out = _row_hp_half(out, a2_src, b2_src, fb_idx_ptr, tl.load(fb_cnt_ptr + pid_m), pid_m, off_m, off_n,
                           offs_m, offs_n, m_ok, n_ok, K, s_a2m, s_a2k, s_b2n, s_b2k, s_fb, N_KB, BK, FB_TMA, EVEN,
                           DYNAMIC_FB, FB_STAGES)
    else:
        out = acc.to(tl.float32) * sa_inv[:, None]
        if FALLBACK == 1:
            # b2_src: b's codes again, as a BNS-row descriptor (the main loop's may load BN rows at once)
            out = _row_fallback_half(out, a2_src, b2_src, sa2_ptr, fb_idx_ptr, tl.load(fb_cnt_ptr + pid_m), pid_m,
                                     off_m, off_n, offs_m, offs_n, m_ok, n_ok, K, s_a2m, s_a2k, s_b2n, s_b2k, s_fb,
                                     N_KB, BK, USE_TMA, EVEN, DYNAMIC_FB, FB_STAGES, FB_TMA)
        # b's scales loaded only now: loaded before the fallback loop they stayed live through it and made the
        # residual variant spill (ptxas sm_90: 144 B of stack)
        out = out * tl.load(sb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    _store_tile(out, c_src, bias_ptr, off_m, off_n, offs_m, offs_n, m_ok, n_ok, s_cm, s_cn, HAS_BIAS, EVEN, C_TMA)


@triton.jit
def _store_tile(acc, c_src, bias_ptr, off_m, off_n, offs_m, offs_n, m_ok, n_ok, s_cm, s_cn, HAS_BIAS: tl.constexpr,
                EVEN: tl.constexpr, C_TMA: tl.constexpr):
    """The epilogue's store: through a TMA descriptor when the output allows (no per-element 64-bit pointers: with
    them the 128x128 epilogue needed 255 registers and spilled, ptxas sm_90), else pointer stores."""
    if C_TMA:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        c_src.store([off_m, off_n], acc.to(c_src.dtype))
    else:
        _store_half(acc, c_src, bias_ptr, offs_m, offs_n, m_ok, n_ok, s_cm, s_cn, HAS_BIAS, EVEN)


@triton.jit
def int8_row_mm_kernel(
    a_src, b_src, c_ptr, sa_ptr, sb_ptr, bias_ptr, a2_src, sa2_ptr, b2_src, fb_idx_ptr, fb_cnt_ptr,
    M, N, K,
    s_am, s_ak, s_bn, s_bk, s_cm, s_cn, s_a2m, s_a2k, s_b2n, s_b2k, s_fb,
    FALLBACK: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, N_KB: tl.constexpr,
    DYNAMIC_FB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_N: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, FB_STAGES: tl.constexpr, C_TMA: tl.constexpr,
    FB_TMA: tl.constexpr, ONE_MMA: tl.constexpr,
):
    """``c = a · bᵀ`` with one scale per row of each operand: the whole K accumulates in INT32 (no per-block
    promotion in the main loop); ``sa``: a's raw row scales (inverted here), ``sb``: b's *inverse* row scales.

    Fallback, after the main loop, per N half (so that at most one extra accumulator is live): ``FALLBACK == 1``
    the flagged ``BM x BK`` tiles of ``a`` add their residual codes' product (row-scaled too, INT32 over the flagged
    blocks): ``out = (float(acc) · sinv_a[m] + float(acc2) · sinv_a2[m]) · sinv_b[n]``; ``FALLBACK == 2`` (hp) their
    bf16 product with ``b``'s 16-bit values: ``out = float(acc) · sinv_a[m] · sinv_b[n] + Σ a_hp · b_hpᵀ``.

    ``ONE_MMA``: the main loop as one ``BM x BN`` dot whose accumulator is split into the two halves afterwards
    (register-only), instead of two ``BM x BN/2`` dots.

    (A merged hp loop over both N halves was tried and dropped: run zj, 2026-12-02 — hp needed 320 KB of shared
    memory at 4 stages and the residual path was 2% slower.)"""
    BNS: tl.constexpr = BN // SPLIT_N
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    off_m = pid_m * BM
    off_n0 = pid_n * BN
    off_n1 = off_n0 + BNS
    offs_m = off_m + tl.arange(0, BM)
    offs_n0 = off_n0 + tl.arange(0, BNS)
    offs_n1 = off_n1 + tl.arange(0, BNS)
    m_ok = offs_m < M
    n0_ok = offs_n0 < N
    n1_ok = offs_n1 < N
    if ONE_MMA:  # one BM x BN MMA per K step, the accumulator split in two only for the epilogue (SPLIT_N == 2)
        offs_n = off_n0 + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for kt in range(0, N_KB):
            k0 = kt * BK
            a = _load_tile(a_src, off_m, k0, offs_m, m_ok, K, s_am, s_ak, BK, USE_TMA, EVEN)
            b = _load_tile(b_src, off_n0, k0, offs_n, offs_n < N, K, s_bn, s_bk, BK, USE_TMA, EVEN)
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BNS)), (0, 2, 1)))
    else:
        acc0 = tl.zeros((BM, BNS), dtype=tl.int32)
        acc1 = tl.zeros((BM, BNS), dtype=tl.int32)  # SPLIT_N == 2 only; dead code otherwise
        for kt in range(0, N_KB):  # N_KB constexpr: one compile per K (Triton's interpreter needs it)
            k0 = kt * BK
            a = _load_tile(a_src, off_m, k0, offs_m, m_ok, K, s_am, s_ak, BK, USE_TMA, EVEN)
            b0 = _load_tile(b_src, off_n0, k0, offs_n0, n0_ok, K, s_bn, s_bk, BK, USE_TMA, EVEN)
            acc0 = tl.dot(a, b0.T, acc0, out_dtype=tl.int32)
            if SPLIT_N == 2:
                b1 = _load_tile(b_src, off_n1, k0, offs_n1, n1_ok, K, s_bn, s_bk, BK, USE_TMA, EVEN)
                acc1 = tl.dot(a, b1.T, acc1, out_dtype=tl.int32)
    sa_inv = tl.math.div_rn(tl.full((BM,), 1.0, tl.float32), tl.load(sa_ptr + offs_m, mask=m_ok, other=1.0))
    _row_epilogue(acc0, sa_inv, c_ptr, bias_ptr, a2_src, b2_src, sa2_ptr, sb_ptr, fb_idx_ptr, fb_cnt_ptr, pid_m,
                  off_m, off_n0, offs_m, offs_n0, m_ok, n0_ok, K, s_a2m, s_a2k, s_b2n, s_b2k, s_cm, s_cn, s_fb,
                  FALLBACK, HAS_BIAS, EVEN, N_KB, BK, USE_TMA, DYNAMIC_FB, FB_STAGES, C_TMA, FB_TMA)
    if SPLIT_N == 2:
        _row_epilogue(acc1, sa_inv, c_ptr, bias_ptr, a2_src, b2_src, sa2_ptr, sb_ptr, fb_idx_ptr, fb_cnt_ptr, pid_m,
                      off_m, off_n1, offs_m, offs_n1, m_ok, n1_ok, K, s_a2m, s_a2k, s_b2n, s_b2k, s_cm, s_cn, s_fb,
                      FALLBACK, HAS_BIAS, EVEN, N_KB, BK, USE_TMA, DYNAMIC_FB, FB_STAGES, C_TMA, FB_TMA)
