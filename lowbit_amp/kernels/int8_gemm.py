"""Triton kernels of the INT8 path: the block-scaled INT8 GEMM with the fallback fused in, and the fused quantizer.

GEMM (NT form, ``out = a · bᵀ``; numerics of :mod:`lowbit_amp.int8.reference_gemm`): each program owns a
``BM x BN`` output tile. Its main loop runs over K blocks: INT8 ``tl.dot`` into INT32, then
``acc += float(part) · (sinv_a[m] · sinv_b[n])`` — per-K-block promotion to FP32 as in DeepSeek-V3's FP8 GEMM. When the
weight's scale block covers the whole N tile (128x128 blocks, BN = 128), ``sinv_b`` is one scalar and the promotion is
one FMA per element. Then a second, short loop visits only this M tile's fallback K blocks, from a compact
per-tile index list built without a host sync: ``residual`` mode does one more INT8 product with the residual codes,
``hp`` mode one bf16 product of the tile's 16-bit values. Keeping the fallback out of the main loop leaves the main
loop branch-free, so Triton software-pipelines it; the extra cost is proportional to the fallback fraction.

Quantizer (activation blocks ``1 x BK``, fallback tiles ``BM x BK``), two passes because the fallback threshold
depends on the whole tensor (its median tile amax): pass 1 writes every row-block amax; torch then reduces them to
tile amaxes, takes the median and flags tiles (no host sync); pass 2 writes the codes and scales and, for flagged
tiles only, the residual codes and scales (``residual``) or zeroes the codes (``hp``). Rounding is round-half-even
(as ``torch.round``), divisions are IEEE (``div_rn``) so codes and scales match the reference bit for bit.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lowbit_amp.int8.block_quant import Int8Blocks
from lowbit_amp.int8.fallback import FallbackOperand, detect_outlier_tiles

__all__ = ["fallback_index", "kernel_supports", "triton_block_mm_nt", "triton_quantize_act"]

TILE_M = 128  # the GEMM's M tile = the fallback tile's rows
_KBLOCKS = (32, 64, 128, 256)


def _kernels() -> dict[str, Any]:
    from lowbit_amp.kernels import _int8_triton as k

    return {"mm": k.int8_block_mm_kernel, "amax": k.row_amax_kernel, "quant": k.quantize_kernel}


# ------------------------------------------------------------------------------------------------------- launchers


def fallback_index(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per M tile: how many K blocks fall back, and their indices first in ascending order (int32, no host sync)."""
    counts = flags.sum(dim=1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous()
    return counts, order


def kernel_supports(a: Int8Blocks | FallbackOperand, b: Int8Blocks) -> tuple[bool, str]:
    """Whether :func:`triton_block_mm_nt` serves these operands, and if not why."""
    main = a.main if isinstance(a, FallbackOperand) else a
    bk = main.block.cols
    if bk not in _KBLOCKS or b.block.cols != bk:
        return False, f"K block {bk} (a) / {b.block.cols} (b) must be equal and one of {_KBLOCKS}"
    if isinstance(a, FallbackOperand) and (a.tile.rows != TILE_M or a.tile.cols != bk):
        return False, f"fallback tile {a.tile} must be {TILE_M}x{bk} (the kernel's M tile by the K block)"
    return True, "ok"


def triton_block_mm_nt(
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_hp: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 128,
    num_warps: int = 8,
    num_stages: int = 4,
    group_m: int = 8,
    dynamic_fallback_loop: bool = False,
) -> torch.Tensor:
    """The Triton GEMM; same contract as :func:`lowbit_amp.int8.reference_gemm.reference_block_mm_nt`.

    ``out`` may be a strided view (e.g. the transpose of a buffer), which writes a transposed result for free.
    ``dynamic_fallback_loop``: loop over the flagged K blocks with a loaded bound (not yet validated on GPU) instead
    of the validated static bound with a guard.
    """
    ok, reason = kernel_supports(a, b)
    if not ok:
        raise ValueError(f"triton_block_mm_nt: {reason}.")
    main = a.main if isinstance(a, FallbackOperand) else a
    rows, k_dim = main.q.shape
    cols = b.q.shape[0]
    bk = main.block.cols
    if out is None:
        out = torch.empty(rows, cols, dtype=out_dtype, device=main.q.device)
    sa_inv = main.scale.float().reciprocal()
    sb_inv = b.scale.float().reciprocal()
    mode = 0
    a2 = sa2 = b2 = idx = cnt = main.q  # placeholders, never read when mode == 0
    s_a2 = s_sa2 = s_b2 = (0, 0)
    s_fb = 0
    if isinstance(a, FallbackOperand):
        cnt, idx = fallback_index(a.flags)
        s_fb = idx.stride(0)
        if a.mode == "residual":
            assert a.residual is not None
            mode, a2, sa2 = 1, a.residual.q, a.residual.scale.float().reciprocal()
            s_a2, s_sa2 = a2.stride(), sa2.stride()
        else:
            if b_hp is None:
                raise ValueError("fallback_mode='hp' needs b_hp, the other operand in 16 bits, for the fallback tiles.")
            mode, a2, b2 = 2, a.hp, b_hp.to(a.hp.dtype)
            s_a2, s_b2 = a2.stride(), b2.stride()
    b_rows = b.block.rows
    even = rows % TILE_M == 0 and cols % block_n == 0 and k_dim % bk == 0
    grid = (math.ceil(rows / TILE_M) * math.ceil(cols / block_n),)
    _kernels()["mm"][grid](
        main.q, b.q, out, sa_inv, sb_inv, bias if bias is not None else sa_inv,
        a2, sa2, b2, idx, cnt,
        rows, cols, k_dim,
        *main.q.stride(), *b.q.stride(), *out.stride(), *sa_inv.stride(), *sb_inv.stride(),
        *s_a2, *s_sa2, *s_b2, s_fb,
        A_ROWS=main.block.rows, B_ROWS=b_rows, SB_SCALAR=b_rows % block_n == 0, FALLBACK=mode,
        HAS_BIAS=bias is not None, EVEN=even, N_KB=math.ceil(k_dim / bk),
        DYNAMIC_FB=dynamic_fallback_loop and os.environ.get("TRITON_INTERPRET", "0") != "1", BM=TILE_M, BN=block_n, BK=bk, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def triton_quantize_act(
    x2d: torch.Tensor, block_k: int, fallback: bool, threshold: float, mode: str = "residual"
) -> Int8Blocks | FallbackOperand:
    """Fused ``1 x block_k`` quantization with fallback tiles ``128 x block_k``; same codes as the reference."""
    from lowbit_amp.quant.granularity import Granularity, amax

    if block_k not in _KBLOCKS:
        raise ValueError(f"triton_quantize_act: block_k={block_k} must be one of {_KBLOCKS}.")
    rows, k_dim = x2d.shape
    n_kb = math.ceil(k_dim / block_k)
    grid = (math.ceil(rows / TILE_M), n_kb)
    kernels = _kernels()
    row_amax = torch.empty(rows, n_kb, dtype=torch.float32, device=x2d.device)
    kernels["amax"][grid](x2d, row_amax, rows, k_dim, *x2d.stride(), *row_amax.stride(), BM=TILE_M, BK=block_k)
    tile = Granularity(TILE_M, block_k)
    if fallback:
        flags = detect_outlier_tiles(amax(row_amax, Granularity(TILE_M, 1)), threshold)
    else:
        flags = torch.zeros(grid, dtype=torch.bool, device=x2d.device)
    q = torch.empty(rows, k_dim, dtype=torch.int8, device=x2d.device)
    scale = torch.empty_like(row_amax)
    mode_id = 0 if not fallback else (1 if mode == "residual" else 2)
    q2 = torch.empty_like(q) if mode_id == 1 else q
    scale2 = torch.ones_like(row_amax) if mode_id == 1 else scale
    flag_codes = flags.to(torch.int8)
    kernels["quant"][grid](
        x2d, row_amax, flag_codes, q, scale, q2, scale2,
        rows, k_dim, *x2d.stride(), *row_amax.stride(), *flag_codes.stride(), *q.stride(),
        MODE=mode_id, BM=TILE_M, BK=block_k,
    )
    main = Int8Blocks(q, scale, Granularity(1, block_k))
    if not fallback:
        return main
    operand = FallbackOperand(main, tile, flags, mode)
    if mode_id == 1:
        operand.residual = Int8Blocks(q2, scale2, Granularity(1, block_k))
    else:
        operand.hp = x2d if x2d.dtype == torch.bfloat16 else x2d.to(torch.bfloat16)
    return operand
