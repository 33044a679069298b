"""Quantize operand ``a`` of an INT8 GEMM (activation or gradient), with fallback if configured: one entry point.

On CUDA the fused Triton quantizer runs when it serves the block shapes (``1 x kblock`` activation blocks, fallback
tiles ``128 x kblock``, round-to-nearest); it produces the same codes and scales as the reference. Stochastic rounding
and other block shapes run the reference (torch ops, on any device). ``act_block: row`` quantizes per row
(:mod:`lowbit_amp.int8.row_scaled`), fused on CUDA likewise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit_amp.int8.block_quant import Int8Blocks, quantize_blocks
from lowbit_amp.int8.compiled_ops import compiled_quantize_rows, use_compiled_ops
from lowbit_amp.int8.fallback import FallbackOperand, quantize_with_fallback, to_hp
from lowbit_amp.int8.row_scaled import ROW, quantize_rows
from lowbit_amp.quant.granularity import Granularity

if TYPE_CHECKING:
    from lowbit_amp.config import Int8Config

# The row quantizer zeroes hp-mode flagged codes in its own pass (interpreter-equal to the reference; bit-equal on the
# H200, tests/int8/test_row_quant_gpu.py, run u 2026-12-02). False: flagged codes zeroed by torch ops instead.
FUSED_HP_ZEROING = True


def _triton_serves(x2d: torch.Tensor, act: Granularity, tile: Granularity, rounding: str) -> bool:
    if not x2d.is_cuda or rounding != "nearest" or act.rows != 1:
        return False
    from lowbit_amp.kernels.int8_gemm import _KBLOCKS, TILE_M

    return act.cols in _KBLOCKS and tile.rows == TILE_M and tile.cols == act.cols


def _quantize_rows(x2d: torch.Tensor, tile: Granularity, threshold: float, fallback: bool, mode: str, rounding: str,
                   generator: torch.Generator | None, backend: str,
                   flags: torch.Tensor | None = None) -> Int8Blocks | FallbackOperand:
    given = flags if fallback else None
    if backend != "reference" and x2d.is_cuda and rounding == "nearest":
        from lowbit_amp.kernels.int8_gemm import TILE_M
        from lowbit_amp.kernels.int8_row_quant import ROW_QUANT_KBLOCKS, triton_quantize_rows

        if tile.cols not in ROW_QUANT_KBLOCKS or tile.rows != TILE_M:  # its tiles are the GEMM's 128-row M tiles
            return quantize_rows(x2d, tile if fallback else None, threshold, rounding, generator, mode, given)
        # Transposed views (the weight gradient's xᵀ, dyᵀ) take the quantizer's K-split kernel (coalesced 128-byte
        # loads; H200 run zc). Copying them row-major first was tried and lost 5-7 ms per anchor step (runs x, z).
        if mode == "hp" and not FUSED_HP_ZEROING:
            op = triton_quantize_rows(x2d, tile.cols, fallback, threshold, flags=given)  # type: ignore[arg-type]
            if fallback:  # the same row scales and flags; flagged codes zeroed by two torch ops (0.38 ms vs 0.18 ms
                # for the fused residual at 16384x4096, H200 run s)
                op.main.q.masked_fill_(op.element_mask(), 0)
                op.mode, op.residual = "hp", None
                op.hp = to_hp(x2d)  # a view when x2d is bf16 already
            return op
        return triton_quantize_rows(x2d, tile.cols, fallback, threshold, mode=mode, flags=given)  # type: ignore[arg-type]
    return quantize_rows(x2d, tile if fallback else None, threshold, rounding, generator, mode, given)


def quantize_weight(w: torch.Tensor, cfg: Int8Config) -> Int8Blocks:
    """INT8 codes of a weight (or its transpose) per ``cfg.weight_block``: once per optimizer step per layer.

    Row-scaled weights take the fused row quantizer on CUDA (no fallback: the same codes and scales as the reference,
    GPU-tested): the reference's torch ops took 9.7 ms per anchor step for W and 12.5 ms for Wᵀ (strided reads), a
    third of the INT8 step (H200 run w, 2026-12-02). Block-scaled weights take the reference."""
    row = Granularity.parse(cfg.weight_block) == ROW
    if row and use_compiled_ops(ROW, "nearest"):
        return compiled_quantize_rows(w, Granularity(128, 128), 0.0, False, "residual", None)  # type: ignore[return-value]
    if row and w.is_cuda:
        from lowbit_amp.kernels.int8_row_quant import triton_quantize_rows

        return triton_quantize_rows(w, 128, False, threshold=0.0)  # type: ignore[return-value]  # (no fallback)
    return quantize_blocks(w, cfg.weight_block)


def quantize_act(
    x2d: torch.Tensor,
    cfg: Int8Config,
    fallback: bool,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    flags: torch.Tensor | None = None,
) -> Int8Blocks | FallbackOperand:
    """Block-quantize ``x2d`` per ``cfg.act_block``; with ``fallback``, flag and re-represent outlier tiles.
    ``flags`` (row layout only): the tiles' outlier flags when already known, e.g. the forward's for ``x``, transposed,
    when the weight gradient quantizes ``xᵀ`` (:func:`lowbit_amp.int8.row_scaled.check_given_flags`)."""
    act = Granularity.parse(cfg.act_block)
    tile = Granularity.parse(cfg.fallback_block)
    if act == ROW:
        if backend == "auto" and use_compiled_ops(act, rounding):  # torch.compile: the op (compiled_ops.py)
            return compiled_quantize_rows(x2d, tile, cfg.fallback_threshold, fallback, cfg.fallback_mode, flags)
        return _quantize_rows(x2d, tile, cfg.fallback_threshold, fallback, cfg.fallback_mode, rounding, generator,
                              backend, flags)
    if flags is not None:
        raise ValueError(f"quantize_act: given flags serve the row layout only (act_block {cfg.act_block!r}).")
    if backend != "reference" and _triton_serves(x2d, act, tile, rounding):
        from lowbit_amp.kernels.int8_gemm import triton_quantize_act

        return triton_quantize_act(x2d, act.cols, fallback, cfg.fallback_threshold, cfg.fallback_mode)  # type: ignore[arg-type]
    if fallback:
        return quantize_with_fallback(x2d, act, tile, cfg.fallback_threshold, cfg.fallback_mode, rounding, generator)
    return quantize_blocks(x2d, act, rounding=rounding, generator=generator)
