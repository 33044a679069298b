"""Launcher of the row-scaled INT8 GEMM (:func:`lowbit_amp.kernels._int8_triton.int8_row_mm_kernel`).

Numerics: :mod:`lowbit_amp.int8.row_scaled` (whole-K INT32 accumulation, row scales in the epilogue, the residual
product of the flagged tiles accumulated in INT32 after the main loop and promoted once). Each program owns a
``128 x BN`` output tile (128 = the fallback tile's rows, as in the block-scaled kernel, whose fallback index it
shares); ``BK`` is the MMA's K step and the fallback tile's width. Configurations below are measured by
``bench/bench_int8.py --row`` (H200, 2026-12-01, runs q and s; docs/int8.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from lowbit_amp.int8.block_quant import Int8Blocks
from lowbit_amp.int8.fallback import FallbackOperand, main_of, require_b_hp
from lowbit_amp.int8.row_scaled import MAX_K, is_row_scaled
from lowbit_amp.kernels.int8_gemm import TILE_M, _interpreting, _Launcher, _tma_ok, fallback_index

__all__ = ["ROW_CONFIGS", "RowGemmConfig", "row_kernel_supports", "triton_row_mm_nt"]


@dataclass(frozen=True)
class RowGemmConfig:
    block_n: int = 256
    split_n: int = 2  # the epilogue in 2 halves of block_n/2 (one extra accumulator live in the fallback loop)
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    block_k: int = 128
    use_tma: bool = True
    # Pipeline depth of the fallback loop; None: num_stages for residual, 2 for hp (measured with r256_w8_s3: hp
    # 0.593 / 1.152 ms at depth 2 vs 0.630 / 1.208 at depth 1; residual 1.072 ms at 8192^3 at depth 2 vs 1.007 at 3)
    fb_stages: int | None = None
    tma_store: bool = True  # the output through a TMA descriptor where it allows (see _int8_triton._store_tile)
    # split_n == 2: the main loop as one block_n-wide MMA whose accumulator is split for the epilogue (True), or as
    # two block_n/2 MMAs (False)
    one_mma: bool = False


# ms at 16384x4096x4096 / 8192^3 with 5.4% of tiles falling back (H200, run s; run q in parentheses where it ran):
# none, residual, hp.
ROW_CONFIGS: dict[str, RowGemmConfig] = {
    # the default until run zb: 0.489 / 0.928 none, 0.548 (0.552) / 1.007 (1.050) residual, hp (fallback depth 2)
    # 0.593 / 1.152
    "r256_w8_s3": RowGemmConfig(256, 2, 8, 3),
    # 192 KB of shared memory: 0.490 / 0.923, 0.555 / 1.046, hp at fallback depth 1 0.615 / 1.204
    "r256_w8_s4": RowGemmConfig(256, 2, 8, 4),
    # one 128x256 INT32 accumulator: fastest without fallback (run q: 0.452 / 0.866) but the residual's second
    # accumulator spills (1.494 / 2.925)
    "r256_w8_s4_one": RowGemmConfig(256, 1, 8, 4),
    "r128_w4_s4": RowGemmConfig(128, 1, 4, 4),  # run q: 0.532 / 1.028 none; residual spills (1.647 / 3.173)
    "r128_w8_s5": RowGemmConfig(128, 1, 8, 5),  # 0.554 / 1.039, 0.607 / 1.157, 0.682 / 1.244
    "r256_w8_s4_fb2": RowGemmConfig(256, 2, 8, 4, fb_stages=2),  # run q: residual 0.560 / 1.092
    "r256_w8_s4_ptrc": RowGemmConfig(256, 2, 8, 4, tma_store=False),  # pointer stores: run q 0.554 / 1.063 residual
    "r256_w8_s3_fb2": RowGemmConfig(256, 2, 8, 3, fb_stages=2),  # 0.490 / 0.924, 0.557 / 1.072, 0.593 / 1.152
    # One 128x256 MMA per K step (as r256_w8_s4_one, the fastest without fallback) with the epilogue still in two
    # halves, so the residual loop's extra accumulator fits (sm_90 compile: 255 registers, no stack). Both compile to
    # the same eight m64n128k32 wgmma per K step as the two-MMA configs: the gain is in how Triton waits on one dot
    # vs two. Run zb (H200, 2026-12-02; same run: r256_w8_s3 0.486 / 0.910, 0.546 / 1.006, 0.591 / 1.119;
    # r256_w8_s4_one 0.453 / 0.825 none):
    "r256_w8_s3_1mma": RowGemmConfig(256, 2, 8, 3, one_mma=True),  # 0.471 / 0.898, 0.523 / 1.005, 0.578 / 1.090
    # the default from run zb to zd: 0.457 / 0.853, 0.521 / 0.990, 0.566 / 1.067
    "r256_w8_s4_1mma": RowGemmConfig(256, 2, 8, 4, one_mma=True),
    # Variants around the fallback loop's depth and the tile order's L2 grouping, run zd (same run: r256_w8_s4_1mma
    # 0.457 / 0.885, 0.520 / 0.998, 0.574 / 1.089; bf16 0.760 / 1.623):
    "r256_w8_s4_1mma_fb2": RowGemmConfig(256, 2, 8, 4, one_mma=True, fb_stages=2),  # 0.466 / 0.884, 0.522 / 0.990
    "r256_w8_s4_1mma_g4": RowGemmConfig(256, 2, 8, 4, group_m=4, one_mma=True),  # 0.457 / 0.908, 0.521 / 1.024
    # the default since run zd: 0.457 / 0.873, 0.517 / 0.972 (1.47x / 1.67x bf16), 0.556 / 1.065; run zj: 0.457 /
    # 0.833, 0.517 / 0.972 (1.59x / 1.67x: bf16 0.821 / 1.621 there), 0.543 / 1.074. (A variant running both N
    # halves' hp fallback in one loop was dropped in run zj: 320 KB of shared memory in hp, residual 0.528 / 0.986.)
    "r256_w8_s4_1mma_g16": RowGemmConfig(256, 2, 8, 4, group_m=16, one_mma=True),
    # Pre-Hopper (sm_80/86/89: mma.sync, no TMA, no wgmma): the default above spills 3.4 KB per thread there (sm_80
    # compile, Triton 3.6, ptxas -res-usage); a 128x128 tile as two 64-wide halves with pointer loads keeps 0 / 8 / 8
    # B of stack (none / residual / hp; sm_86: 0 / 0 / 0). Chosen by compiling, not timed: no pre-Hopper GPU was lent.
    "r128_w8_s3_split_ptr": RowGemmConfig(128, 2, 8, 3, use_tma=False),
}
DEFAULT_ROW_CONFIG = "r256_w8_s4_1mma_g16"
PRE_HOPPER_ROW_CONFIG = "r128_w8_s3_split_ptr"


def default_row_config(device: torch.device) -> str:
    """The configuration for ``device``: Hopper's (wgmma + TMA) from sm_90 on, the spill-free pointer one before."""
    return _default_for(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _default_for(index: int) -> str:
    return DEFAULT_ROW_CONFIG if torch.cuda.get_device_capability(index) >= (9, 0) else PRE_HOPPER_ROW_CONFIG

_launch_row_gemm = _Launcher("int8_row_mm_kernel")


def row_kernel_supports(a: Int8Blocks | FallbackOperand, b: Int8Blocks) -> tuple[bool, str]:
    main = main_of(a)
    if not (is_row_scaled(main) and is_row_scaled(b)):
        return False, f"operands must be row-scaled (blocks {main.block} and {b.block})"
    if isinstance(a, FallbackOperand) and (a.tile.rows != TILE_M or a.tile.cols != ROW_CONFIGS[DEFAULT_ROW_CONFIG].block_k):
        # the fallback loop walks the flagged tiles in steps of the configuration's K block (only 128 is GPU-tested)
        return False, (f"fallback tiles must be {TILE_M}x{ROW_CONFIGS[DEFAULT_ROW_CONFIG].block_k} for the kernel "
                       f"(got {a.tile})")
    return True, "ok"


def triton_row_mm_nt(
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: RowGemmConfig | str | None = None,
    b_hp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton row-scaled GEMM; same contract as :func:`lowbit_amp.int8.row_scaled.reference_row_mm_nt`."""
    ok, reason = row_kernel_supports(a, b)
    if not ok:
        raise ValueError(f"triton_row_mm_nt: {reason}.")
    if main_of(a).q.shape[1] > MAX_K:
        raise ValueError(f"triton_row_mm_nt: K > {MAX_K} could overflow INT32; call it through "
                         "lowbit_amp.int8.row_scaled.row_mm_chunked.")
    main = main_of(a)
    if isinstance(config, RowGemmConfig):
        cfg = config
    else:
        cfg = ROW_CONFIGS[config or (default_row_config(main.q.device) if main.q.is_cuda else DEFAULT_ROW_CONFIG)]
    rows, k_dim = main.q.shape
    cols = b.q.shape[0]
    bk = cfg.block_k
    if out is None:
        out = torch.empty(rows, cols, dtype=out_dtype, device=main.q.device)
    sa = main.scale.reshape(-1).float()
    sb_inv = b.scale.reshape(-1).float().reciprocal()
    fallback = isinstance(a, FallbackOperand)
    mode = 0
    a2: Any = main.q
    b2: Any = main.q
    sa2 = idx = cnt = sa
    s_a2 = s_b2 = (0, 0)
    s_fb = 0
    if fallback:
        if a.tile.cols != bk:
            raise ValueError(f"triton_row_mm_nt: the fallback tile's K block ({a.tile.cols}) must equal the config's "
                             f"block_k ({bk}).")
        cnt, idx = fallback_index(a.flags)
        s_fb = idx.stride(0)
        if a.mode == "residual":
            assert a.residual is not None
            mode, a2, sa2, b2 = 1, a.residual.q, a.residual.scale.reshape(-1).float(), b.q
            s_b2 = b2.stride()
        else:
            assert a.hp is not None
            mode, a2, b2 = 2, a.hp, require_b_hp(b_hp).to(a.hp.dtype)
            s_b2 = b2.stride()
        s_a2 = a2.stride()
    bm, bn = TILE_M, cfg.block_n
    bns = bn // cfg.split_n
    one_mma = cfg.one_mma and cfg.split_n == 2
    use_tma = cfg.use_tma and _tma_ok(main.q, b.q)
    # The fallback operands keep TMA only where they allow it: the weight gradient's 16-bit a and b are transposed views
    # (hp mode), and one strided operand must not take TMA away from the main loop.
    fb_tma = use_tma and _tma_ok(*((a2,) if mode else ()), *((b2,) if mode == 2 else ()))
    c_tma = use_tma and cfg.tma_store and _tma_ok(out) and out.dtype in (torch.bfloat16, torch.float16, torch.float32)
    a_src: Any = main.q
    b_src: Any = b.q
    c_src: Any = out
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_src = TensorDescriptor.from_tensor(main.q, [bm, bk])
        b_src = TensorDescriptor.from_tensor(b.q, [bn if one_mma else bns, bk])
        if mode and fb_tma:
            a2 = TensorDescriptor.from_tensor(a2, [bm, bk])
        if mode == 2 and fb_tma:
            b2 = TensorDescriptor.from_tensor(b2, [bns, bk])
        if mode == 1:  # the residual loop loads b's codes a half at a time, with TMA whenever the main loop does
            b2 = TensorDescriptor.from_tensor(b2, [bns, bk])
        if c_tma:
            c_src = TensorDescriptor.from_tensor(out, [bm, bns])
    even = rows % bm == 0 and cols % bn == 0 and k_dim % bk == 0
    grid = (math.ceil(rows / bm) * math.ceil(cols / bn),)
    _launch_row_gemm(
        grid,
        (a_src, b_src, c_src, sa, sb_inv, bias if bias is not None else sb_inv, a2, sa2, b2, idx, cnt),
        (rows, cols, k_dim, *main.q.stride(), *b.q.stride(), *out.stride(), *s_a2, *s_b2, s_fb),
        {"FALLBACK": mode, "HAS_BIAS": bias is not None, "EVEN": even, "N_KB": math.ceil(k_dim / bk),
         "DYNAMIC_FB": not _interpreting(), "BM": bm, "BN": bn, "BK": bk, "SPLIT_N": cfg.split_n,
         "GROUP_M": cfg.group_m, "USE_TMA": use_tma,
         "FB_STAGES": cfg.fb_stages or (cfg.num_stages if mode == 1 else 2),
         "C_TMA": c_tma, "FB_TMA": fb_tma, "ONE_MMA": one_mma},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
