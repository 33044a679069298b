"""Fused row-scaled INT8 quantizer (kernels: :mod:`lowbit_amp.kernels._int8_row_quant_triton`).

Produces what :func:`lowbit_amp.int8.row_scaled.quantize_rows` produces — codes, scales, flags and the residual's codes
inside flagged tiles, bit for bit — in two kernel launches with fallback (one without) and no host sync:

1. ``row_block_amax_kernel`` (fallback only): one read of ``x``; the amax of every ``1 x block_k`` block and of every
   ``128 x block_k`` tile.
2. torch: :func:`~lowbit_amp.int8.fallback.detect_outlier_tiles` on the tile amaxes (its median needs every tile, so it
   cannot join a pass over ``x``).
3. ``row_quantize_kernel``: one program per few rows, over all of K. Row scale (the unflagged blocks' amax, else the
   row's), codes, the residual's row amax over the flagged tiles, its scale, then the residual codes — a second read
   of ``x`` in the flagged tiles only. Without fallback the row amax comes from a first loop over ``x`` in the same
   launch (``x`` is read twice either way).

Why these are the reference's values bit for bit: amaxes are exact maxima (NaN-propagating, as ``torch.amax``); the
scale is :func:`~lowbit_amp.kernels._int8_triton.scale_of` (``127 · (1/amax)`` with an IEEE reciprocal, capped, 1 where
the amax is 0 or not finite, as ``compute_scale``); codes are ``x.float() · scale`` clamped to ±127 and rounded half to
even (``round_codes``; NaN -> 0); the residual is ``x - q · (1/scale)`` with the product rounded before the
subtraction, as ``Int8Blocks.dequantize`` followed by the subtraction — FMA contraction is turned off for the launch
(``enable_fp_fusion=False``) so the GPU does not fuse them. Verified in Triton's interpreter
(tests/int8/test_row_quant_interp.py); tests/int8/test_row_quant_gpu.py checks the GPU.

Difference from the reference: the residual codes outside flagged tiles are left unwritten (``torch.empty``), where the
reference has zeros. Every consumer reads them inside flagged tiles only (the row GEMM's fallback loop, the reference
GEMM's mask, ``FallbackOperand.dequantize``); zeroing them would write another byte per element.

Transposed inputs (rows the contiguous dim: the weight gradient's xᵀ and dyᵀ) take a third kernel for step 3 with no
fallback or ``hp``: ``row_quantize_split_kernel``, 64 rows per program (128-byte loads) and K split over programs,
each re-deriving its rows' scale from pass 1's block amaxes (pass 1 then runs without fallback too). The whole-row
kernel on such inputs had 8-16 rows per program (16-32-byte loads): 0.44 ms for the 14336x8192 xᵀ vs 0.16 ms for the
contiguous tensor of the same size (H200, run zb). Rows per program elsewhere: :func:`_rows_per_program`.
"""

from __future__ import annotations

import math

import torch

from lowbit_amp.int8.block_quant import Int8Blocks
from lowbit_amp.int8.fallback import FallbackOperand, detect_outlier_tiles, to_hp
from lowbit_amp.int8.row_scaled import ROW, check_given_flags, quantize_rows
from lowbit_amp.kernels.int8_gemm import TILE_M, _interpreting, _Launcher
from lowbit_amp.quant.granularity import Granularity

__all__ = ["triton_quantize_rows"]

ROW_QUANT_KBLOCKS = (64, 128, 256)  # the K blocks (fallback tile widths) this quantizer serves
_AMAX_ELEMS = 8192  # elements per load in pass 1 (rows x block_k), as the block quantizer's 64 x 128
_AMAX_CHUNK = 64  # block amaxes per load when the row kernel reduces them to the row scale
_STAGES = 3  # software-pipeline depth of the row kernel's loops over x (see the kernel's docstring)
_MIN_PROGRAMS = 512  # the row kernel's rows per program shrink (down to 4) until there are this many programs


_KERNELS = "lowbit_amp.kernels._int8_row_quant_triton"
_launch_block_amax = _Launcher("row_block_amax_kernel", _KERNELS)
_launch_row_quantize = _Launcher("row_quantize_kernel", _KERNELS)
_launch_row_quantize_split = _Launcher("row_quantize_split_kernel", _KERNELS)
_SPLIT_RB = 64  # rows per program of the K-split kernel: 64 contiguous bf16 = 128 bytes per column load
_SPLIT_MIN_PROGRAMS = 1024  # its K groups shrink (down to 2 K blocks each) until there are this many programs


def _use_split(x2d: torch.Tensor, fallback: bool, mode: str, split: bool | None) -> bool:
    """The K-split pass 2 (``row_quantize_split_kernel``) for inputs whose rows are the contiguous dim (transposed
    views: the weight gradient's xᵀ, dyᵀ), except with residual fallback, which needs whole rows. ``split`` forces
    the choice (tests, tuning)."""
    if split is not None:
        if split and fallback and mode == "residual":
            raise ValueError("triton_quantize_rows: split=True serves no fallback or mode='hp'; the residual needs "
                             "whole rows (use split=None).")
        return split
    return x2d.stride(0) == 1 and x2d.stride(1) != 1 and not (fallback and mode == "residual")


def _kblocks_per_program(row_blocks: int, n_kb: int) -> int:
    """K blocks per program of the split kernel: 16, halved (down to 2) until the grid has _SPLIT_MIN_PROGRAMS."""
    per = 16
    while per > 2 and row_blocks * math.ceil(n_kb / per) < _SPLIT_MIN_PROGRAMS:
        per //= 2
    return min(per, max(1, n_kb))


def _rows_per_program(rows: int) -> int:
    """The largest of 32, 16, 8, 4 rows per program that still gives ``_MIN_PROGRAMS`` programs (each program walks
    a whole row block, so few programs would leave SMs idle); always a divisor of ``TILE_M``. The interpreter runs
    programs one after another at a fixed cost per operation, so there it takes 32 (fewer, larger programs)."""
    if _interpreting():
        return 32
    for rb in (32, 16, 8):
        if math.ceil(rows / rb) >= _MIN_PROGRAMS:
            return rb
    return 4


def triton_quantize_rows(
    x2d: torch.Tensor, block_k: int, fallback: bool, threshold: float, rows_per_program: int | None = None,
    mode: str = "residual", split: bool | None = None, flags: torch.Tensor | None = None,
) -> Int8Blocks | FallbackOperand:
    """Row-scaled INT8 codes of ``x2d``: ``quantize_rows(x2d, f"128x{block_k}", threshold, mode=mode)`` with
    ``fallback``, else ``quantize_rows(x2d)`` (``block_k`` then only sets the kernel's K step). Same return types and
    fields; the residual's codes are meaningful inside flagged tiles only (see the module docstring). ``mode="hp"``:
    the flagged tiles' codes are zeroed in the same pass and ``hp`` is ``x2d`` in bf16 (no residual).

    ``rows_per_program``: the row kernel's rows per program (a power of two dividing 128; default
    :func:`_rows_per_program`), for tests and tuning. ``split``: the K-split pass 2 (:func:`_use_split`; None:
    for transposed inputs). ``flags``: the outlier flags when already known (the reference's argument of that name):
    the detection is skipped."""
    if block_k not in ROW_QUANT_KBLOCKS:
        raise ValueError(f"triton_quantize_rows: block_k={block_k} must be one of {ROW_QUANT_KBLOCKS}.")
    if rows_per_program is not None and (rows_per_program < 1 or TILE_M % rows_per_program):
        raise ValueError(f"triton_quantize_rows: rows_per_program={rows_per_program} must divide {TILE_M}.")
    if x2d.dim() != 2:
        raise ValueError(f"triton_quantize_rows expects a 2-D tensor, got shape {tuple(x2d.shape)}.")
    if mode not in ("residual", "hp"):
        raise ValueError(f"Unknown fallback mode {mode!r}; use 'residual' or 'hp'.")
    rows, k_dim = x2d.shape
    tile = Granularity(TILE_M, block_k)
    if flags is not None:
        check_given_flags(flags, x2d.shape, tile)
    if rows == 0 or k_dim == 0:  # nothing to launch: the reference's result
        return quantize_rows(x2d, tile if fallback else None, threshold, mode=mode, flags=flags)
    dev = x2d.device
    q = torch.empty(rows, k_dim, dtype=torch.int8, device=dev)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=dev)
    use_split = _use_split(x2d, fallback, mode, split)
    rb = rows_per_program or (_SPLIT_RB if use_split else _rows_per_program(rows))
    grid = (math.ceil(rows / rb),)
    n_kb = math.ceil(k_dim / block_k)
    consts = {"TILE_M": TILE_M, "RB": rb, "BK": block_k, "CH": _AMAX_CHUNK, "N_KB": n_kb, "STAGES": _STAGES}
    warps = min(8, max(1, rb * block_k // 256))  # 8 elements (16 bytes of bf16) per thread per load
    if use_split:
        return _quantize_split(x2d, q, scale, block_k, fallback, threshold, mode, consts, warps, flags)
    if not fallback:
        _launch_row_quantize(
            grid, (x2d, scale, q, q, scale, q, scale),  # amax, flags, q2, scale2: placeholders, never read
            (rows, k_dim, *x2d.stride(), 0, 0, 0, 0, *q.stride(), 0, 0),
            {"FALLBACK": False, **consts, "HP": False}, num_warps=warps, enable_fp_fusion=False,
        )
        return Int8Blocks(q, scale, ROW)
    block_amax, tile_amax = _block_amaxes(x2d, block_k, n_kb)
    if flags is None:
        flags = detect_outlier_tiles(tile_amax, threshold)
    flag_bytes = flags.view(torch.uint8)
    hp = mode == "hp"
    q2 = q if hp else torch.empty_like(q)  # written inside flagged tiles only (never with hp)
    scale2 = scale if hp else torch.empty_like(scale)
    _launch_row_quantize(
        grid, (x2d, block_amax, flag_bytes, q, scale, q2, scale2),
        (rows, k_dim, *x2d.stride(), *block_amax.stride(), *flag_bytes.stride(), *q.stride(), *q2.stride()),
        {"FALLBACK": True, **consts, "HP": hp}, num_warps=warps, enable_fp_fusion=False,
    )
    main = Int8Blocks(q, scale, ROW)
    if hp:
        return _hp_operand(main, tile, flags, x2d)
    return FallbackOperand(main, tile, flags, "residual", residual=Int8Blocks(q2, scale2, ROW))


def _block_amaxes(x2d: torch.Tensor, block_k: int, n_kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: the amax of every ``1 x block_k`` block and of every ``TILE_M x block_k`` tile (one launch)."""
    rows, k_dim = x2d.shape
    n_mt = math.ceil(rows / TILE_M)
    block_amax = torch.empty(rows, n_kb, dtype=torch.float32, device=x2d.device)
    tile_amax = torch.empty(n_mt, n_kb, dtype=torch.float32, device=x2d.device)
    _launch_block_amax(
        (n_mt, n_kb), (x2d, block_amax, tile_amax),
        (rows, k_dim, *x2d.stride(), *block_amax.stride(), *tile_amax.stride()),
        {"TILE_M": TILE_M, "RB": min(TILE_M, _AMAX_ELEMS // block_k), "BK": block_k}, num_warps=4,
    )
    return block_amax, tile_amax


def _quantize_split(x2d: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_k: int, fallback: bool,
                    threshold: float, mode: str, consts: dict, warps: int,
                    given: torch.Tensor | None) -> Int8Blocks | FallbackOperand:
    """Pass 1 (block amaxes, with or without fallback), the flags, then the K-split pass 2."""
    rows, k_dim = x2d.shape
    n_kb = consts["N_KB"]
    block_amax, tile_amax = _block_amaxes(x2d, block_k, n_kb)
    flags = (given if given is not None else detect_outlier_tiles(tile_amax, threshold)) if fallback else None
    flag_bytes = flags.view(torch.uint8) if flags is not None else q
    row_blocks = math.ceil(rows / consts["RB"])
    per = _kblocks_per_program(row_blocks, n_kb)
    _launch_row_quantize_split(
        (row_blocks, math.ceil(n_kb / per)), (x2d, block_amax, flag_bytes, q, scale),
        (rows, k_dim, *x2d.stride(), *block_amax.stride(), *(flag_bytes.stride() if fallback else (0, 0)),
         *q.stride()),
        {**consts, "FALLBACK": fallback, "KB_PER": per, "HP": fallback}, num_warps=warps, enable_fp_fusion=False,
    )
    main = Int8Blocks(q, scale, ROW)
    if not fallback:
        return main
    assert flags is not None and mode == "hp"
    return _hp_operand(main, Granularity(TILE_M, block_k), flags, x2d)


def _hp_operand(main: Int8Blocks, tile: Granularity, flags: torch.Tensor, x2d: torch.Tensor) -> FallbackOperand:
    """The ``hp`` fallback operand: codes with the flagged tiles zeroed, and ``x2d`` itself as the 16-bit values
    (a view when it is bf16 already, the weight gradient's transposed activations included)."""
    return FallbackOperand(main, tile, flags, "hp", hp=to_hp(x2d))
