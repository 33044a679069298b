"""Triton ``@jit`` kernels of the INT8 path; imported only by :mod:`lowbit_amp.kernels.int8_gemm`'s launchers, lazily.

Kept apart so that importing the launchers (and ``lowbit_amp``) never imports Triton. See that module for the design.
"""

import triton
import triton.language as tl


@triton.jit
def int8_block_mm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr,
    a2_ptr, sa2_ptr, b2_ptr, fb_idx_ptr, fb_cnt_ptr,
    M, N, K,
    s_am, s_ak, s_bn, s_bk, s_cm, s_cn, s_sam, s_sak, s_sbn, s_sbk,
    s_a2m, s_a2k, s_sa2m, s_sa2k, s_b2n, s_b2k, s_fb,
    A_ROWS: tl.constexpr, B_ROWS: tl.constexpr, SB_SCALAR: tl.constexpr, FALLBACK: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, N_KB: tl.constexpr, DYNAMIC_FB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    sa_rows = sa_ptr + (offs_m // A_ROWS) * s_sam
    sb_rows = sb_ptr + (offs_n // B_ROWS) * s_sbn
    sb_tile = sb_ptr + ((pid_n * BN) // B_ROWS) * s_sbn
    a_tile = a_ptr + offs_m[:, None] * s_am + offs_k[None, :] * s_ak
    b_tile = b_ptr + offs_k[:, None] * s_bk + offs_n[None, :] * s_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, N_KB):  # N_KB constexpr: one compile per K, and Triton's interpreter needs it
        if EVEN:
            a = tl.load(a_tile + kb * BK * s_ak)
            b = tl.load(b_tile + kb * BK * s_bk)
        else:
            k_ok = (kb * BK + offs_k) < K
            a = tl.load(a_tile + kb * BK * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_tile + kb * BK * s_bk, mask=k_ok[:, None] & n_ok[None, :], other=0)
        part = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
        sa = tl.load(sa_rows + kb * s_sak, mask=m_ok, other=0.0)
        if SB_SCALAR:
            scale = (sa * tl.load(sb_tile + kb * s_sbk))[:, None]
        else:
            scale = sa[:, None] * tl.load(sb_rows + kb * s_sbk, mask=n_ok, other=0.0)[None, :]
        acc += part * scale
    if FALLBACK != 0:
        count = tl.load(fb_cnt_ptr + pid_m)
        if DYNAMIC_FB:
            for i in range(0, count):
                acc = fallback_step(acc, i, pid_m, offs_m, offs_n, offs_k, m_ok, n_ok, K, b_ptr, s_bk, s_bn,
                                    sb_rows, sb_tile, s_sbk, a2_ptr, sa2_ptr, b2_ptr, fb_idx_ptr,
                                    s_a2m, s_a2k, s_sa2m, s_sa2k, s_b2n, s_b2k, s_fb,
                                    A_ROWS, SB_SCALAR, FALLBACK, BK)
        else:  # Triton's interpreter rejects loop bounds loaded from memory: a static bound with a guard
            for i in range(0, N_KB):
                if i < count:
                    acc = fallback_step(acc, i, pid_m, offs_m, offs_n, offs_k, m_ok, n_ok, K, b_ptr, s_bk, s_bn,
                                        sb_rows, sb_tile, s_sbk, a2_ptr, sa2_ptr, b2_ptr, fb_idx_ptr,
                                        s_a2m, s_a2k, s_sa2m, s_sa2k, s_b2n, s_b2k, s_fb,
                                        A_ROWS, SB_SCALAR, FALLBACK, BK)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

@triton.jit
def fallback_step(acc, i, pid_m, offs_m, offs_n, offs_k, m_ok, n_ok, K, b_ptr, s_bk, s_bn,
                  sb_rows, sb_tile, s_sbk, a2_ptr, sa2_ptr, b2_ptr, fb_idx_ptr,
                  s_a2m, s_a2k, s_sa2m, s_sa2k, s_b2n, s_b2k, s_fb,
                  A_ROWS: tl.constexpr, SB_SCALAR: tl.constexpr, FALLBACK: tl.constexpr, BK: tl.constexpr):
    """One fallback K block of this M tile: the residual INT8 product (mode 1) or the bf16 product (mode 2)."""
    kb = tl.load(fb_idx_ptr + pid_m * s_fb + i)
    ks = kb * BK + offs_k
    k_ok = ks < K
    a_mask = m_ok[:, None] & k_ok[None, :]
    b_mask = k_ok[:, None] & n_ok[None, :]
    if FALLBACK == 1:
        a2 = tl.load(a2_ptr + offs_m[:, None] * s_a2m + ks[None, :] * s_a2k, mask=a_mask, other=0)
        b = tl.load(b_ptr + ks[:, None] * s_bk + offs_n[None, :] * s_bn, mask=b_mask, other=0)
        part = tl.dot(a2, b, out_dtype=tl.int32).to(tl.float32)
        sa2 = tl.load(sa2_ptr + (offs_m // A_ROWS) * s_sa2m + kb * s_sa2k, mask=m_ok, other=0.0)
        if SB_SCALAR:
            scale = (sa2 * tl.load(sb_tile + kb * s_sbk))[:, None]
        else:
            scale = sa2[:, None] * tl.load(sb_rows + kb * s_sbk, mask=n_ok, other=0.0)[None, :]
        acc += part * scale
    else:
        a2 = tl.load(a2_ptr + offs_m[:, None] * s_a2m + ks[None, :] * s_a2k, mask=a_mask, other=0.0)
        b2 = tl.load(b2_ptr + ks[:, None] * s_b2k + offs_n[None, :] * s_b2n, mask=b_mask, other=0.0)
        acc += tl.dot(a2, b2, out_dtype=tl.float32)
    return acc


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
def row_amax_kernel(x_ptr, amax_ptr, M, K, s_xm, s_xk, s_am, s_ak, BM: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    ks = kb * BK + tl.arange(0, BK)
    mask = (offs_m[:, None] < M) & (ks[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * s_xm + ks[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
    tl.store(amax_ptr + offs_m * s_am + kb * s_ak, tl.max(tl.abs(x), axis=1), mask=offs_m < M)

@triton.jit
def quantize_kernel(
    x_ptr, amax_ptr, flag_ptr, q_ptr, scale_ptr, q2_ptr, scale2_ptr,
    M, K, s_xm, s_xk, s_am, s_ak, s_fm, s_fk, s_qm, s_qk,
    MODE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    ks = kb * BK + tl.arange(0, BK)
    m_ok = offs_m < M
    mask = m_ok[:, None] & (ks[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * s_xm + ks[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
    scale = scale_of(tl.load(amax_ptr + offs_m * s_am + kb * s_ak, mask=m_ok, other=0.0))
    tl.store(scale_ptr + offs_m * s_am + kb * s_ak, scale, mask=m_ok)
    q = round_codes(x * scale[:, None])
    flag = tl.load(flag_ptr + pid_m * s_fm + kb * s_fk)
    if MODE == 2:
        if flag != 0:
            q = tl.zeros_like(q)
    q_offs = offs_m[:, None] * s_qm + ks[None, :] * s_qk
    tl.store(q_ptr + q_offs, q, mask=mask)
    if MODE == 1:
        if flag != 0:
            scale_inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
            missed = x - q.to(tl.float32) * scale_inv[:, None]
            missed = tl.where(mask, missed, 0.0)
            scale2 = scale_of(tl.max(tl.abs(missed), axis=1))
            tl.store(scale2_ptr + offs_m * s_am + kb * s_ak, scale2, mask=m_ok)
            tl.store(q2_ptr + q_offs, round_codes(missed * scale2[:, None]), mask=mask)
