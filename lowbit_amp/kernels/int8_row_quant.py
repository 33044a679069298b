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

Launch shapes (rows per program, warps) are not tuned: no GPU measurement exists for this quantizer yet.
"""

from __future__ import annotations

import math

import torch

from lowbit_amp.int8.block_quant import Int8Blocks
from lowbit_amp.int8.fallback import FallbackOperand, detect_outlier_tiles
from lowbit_amp.int8.row_scaled import ROW, quantize_rows
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
    mode: str = "residual",
) -> Int8Blocks | FallbackOperand:
    """Row-scaled INT8 codes of ``x2d``: ``quantize_rows(x2d, f"128x{block_k}", threshold, mode=mode)`` with
    ``fallback``, else ``quantize_rows(x2d)`` (``block_k`` then only sets the kernel's K step). Same return types and
    fields; the residual's codes are meaningful inside flagged tiles only (see the module docstring). ``mode="hp"``:
    the flagged tiles' codes are zeroed in the same pass and ``hp`` is ``x2d`` in bf16 (no residual).

    ``rows_per_program``: the row kernel's rows per program (a power of two dividing 128; default
    :func:`_rows_per_program`), for tests and tuning."""
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
    if rows == 0 or k_dim == 0:  # nothing to launch: the reference's result
        return quantize_rows(x2d, tile if fallback else None, threshold, mode=mode)
    dev = x2d.device
    q = torch.empty(rows, k_dim, dtype=torch.int8, device=dev)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=dev)
    rb = rows_per_program or _rows_per_program(rows)
    grid = (math.ceil(rows / rb),)
    n_mt, n_kb = math.ceil(rows / TILE_M), math.ceil(k_dim / block_k)
    consts = {"TILE_M": TILE_M, "RB": rb, "BK": block_k, "CH": _AMAX_CHUNK, "N_KB": n_kb, "STAGES": _STAGES}
    warps = min(8, max(1, rb * block_k // 256))  # 8 elements (16 bytes of bf16) per thread per load
    if not fallback:
        _launch_row_quantize(
            grid, (x2d, scale, q, q, scale, q, scale),  # amax, flags, q2, scale2: placeholders, never read
            (rows, k_dim, *x2d.stride(), 0, 0, 0, 0, *q.stride(), 0, 0),
            {"FALLBACK": False, **consts, "HP": False}, num_warps=warps, enable_fp_fusion=False,
        )
        return Int8Blocks(q, scale, ROW)
    block_amax = torch.empty(rows, n_kb, dtype=torch.float32, device=dev)
    tile_amax = torch.empty(n_mt, n_kb, dtype=torch.float32, device=dev)
    _launch_block_amax(
        (n_mt, n_kb), (x2d, block_amax, tile_amax),
        (rows, k_dim, *x2d.stride(), *block_amax.stride(), *tile_amax.stride()),
        {"TILE_M": TILE_M, "RB": min(TILE_M, _AMAX_ELEMS // block_k), "BK": block_k}, num_warps=4,
    )
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
        return FallbackOperand(main, tile, flags, "hp", hp=x2d if x2d.dtype == torch.bfloat16 else x2d.to(torch.bfloat16))
    return FallbackOperand(main, tile, flags, "residual", residual=Int8Blocks(q2, scale2, ROW))
