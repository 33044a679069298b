"""Quantize operand ``a`` of an INT8 GEMM (activation or gradient), with fallback if configured: one entry point.

On CUDA the fused Triton quantizer runs when it serves the block shapes (``1 x kblock`` activation blocks, fallback
tiles ``128 x kblock``, round-to-nearest); it produces the same codes and scales as the reference. Stochastic rounding
and other block shapes run the reference (torch ops, on any device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit_amp.int8.block_quant import Int8Blocks, quantize_blocks
from lowbit_amp.int8.fallback import FallbackOperand, quantize_with_fallback
from lowbit_amp.quant.granularity import Granularity

if TYPE_CHECKING:
    from lowbit_amp.config import Int8Config


def _triton_serves(x2d: torch.Tensor, act: Granularity, tile: Granularity, rounding: str) -> bool:
    if not x2d.is_cuda or rounding != "nearest" or act.rows != 1:
        return False
    from lowbit_amp.kernels.int8_gemm import _KBLOCKS, TILE_M

    return act.cols in _KBLOCKS and tile.rows == TILE_M and tile.cols == act.cols


def quantize_act(
    x2d: torch.Tensor,
    cfg: "Int8Config",
    fallback: bool,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Int8Blocks | FallbackOperand:
    """Block-quantize ``x2d`` per ``cfg.act_block``; with ``fallback``, flag and re-represent outlier tiles."""
    act = Granularity.parse(cfg.act_block)
    tile = Granularity.parse(cfg.fallback_block)
    if backend != "reference" and _triton_serves(x2d, act, tile, rounding):
        from lowbit_amp.kernels.int8_gemm import triton_quantize_act

        return triton_quantize_act(x2d, act.cols, fallback, cfg.fallback_threshold, cfg.fallback_mode)  # type: ignore[arg-type]
    if fallback:
        return quantize_with_fallback(x2d, act, tile, cfg.fallback_threshold, cfg.fallback_mode, rounding, generator)
    return quantize_blocks(x2d, act, rounding=rounding, generator=generator)
