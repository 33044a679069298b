"""Block-wise symmetric INT8: one float32 scale per ``rows x cols`` block, ``q = round(x * scale)`` in [-127, 127].

The scale of a block is ``127 / amax(block)`` (the core formula, :func:`lowbit_amp.quant.cast.compute_scale`, with its
edge cases: an all-zero block gets scale 1). Symmetric and without -128 so that negation is exact and the INT32
accumulator of a K-block of 128 products, at most ``127² · 128 < 2²⁴``, is also exact in float32. Ragged edges are
smaller blocks (the core granularity rule). Gradients may round stochastically (unbiased, ``E[q/scale] = x``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit_amp.formats import INT8
from lowbit_amp.quant.cast import compute_scale, dequantize, quantize
from lowbit_amp.quant.granularity import Granularity, amax

__all__ = ["Int8Blocks", "dequantize_blocks", "expand_blocks", "quantize_blocks"]


def expand_blocks(per_block: torch.Tensor, rows: int, cols: int, block: Granularity) -> torch.Tensor:
    """``per_block`` (one value per ``block`` of a ``rows x cols`` matrix) repeated to ``rows x cols``.

    The same values as :func:`lowbit_amp.quant.granularity.expand_scale`, in one copy instead of two
    ``repeat_interleave`` calls (several ops each): every INT8 quantization, fallback mask and reference GEMM runs it,
    and at small sizes the step time is the number of ops, not their work."""
    br, bc = block.block_shape(rows, cols)
    nr, nc = per_block.shape
    if br == 1 and bc == 1:
        return per_block[:rows, :cols]
    return per_block[:, None, :, None].expand(nr, br, nc, bc).reshape(nr * br, nc * bc)[:rows, :cols]


@dataclass
class Int8Blocks:
    """A block-quantized 2-D operand: ``x ≈ q / scale`` blockwise.

    Attributes:
        q: int8 codes, ``(rows, cols)``.
        scale: float32 ``(ceil(rows/br), ceil(cols/bc))``; the hp → int8 multiplier (core convention).
        block: the block shape ``br x bc``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    block: Granularity

    def t(self) -> "Int8Blocks":
        """The transposed operand, free only for square blocks (the scales transpose with the codes)."""
        if self.block.rows != self.block.cols:
            raise ValueError(f"Block {self.block} is not square: re-quantize the transposed tensor instead.")
        return Int8Blocks(self.q.t().contiguous(), self.scale.t().contiguous(), self.block)

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self, out_dtype)


def quantize_blocks(
    x2d: torch.Tensor,
    block: Granularity | str,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Int8Blocks:
    """Quantize a 2-D tensor to INT8 with one scale per ``block`` (reference; runs on any device)."""
    if x2d.dim() != 2:
        raise ValueError(f"quantize_blocks expects a 2-D tensor, got shape {tuple(x2d.shape)}; flatten leading dims first.")
    gran = Granularity.parse(block)
    scale = compute_scale(amax(x2d, gran), INT8)
    # The scale expanded here and passed as a full-size "tensorwise" one: the same products x * scale, fewer ops.
    q = quantize(x2d, expand_blocks(scale, *x2d.shape, gran), INT8, "tensor", rounding=rounding, generator=generator)
    # Row-major codes whatever x2d's strides (elementwise ops keep a transposed view's column-major layout): every INT8
    # GEMM reads them with TMA, which needs a unit last stride; the row layout's transposed weight came out column-major
    # and its grad-input GEMM fell back to strided pointer loads (H200 run v, 2026-12-02).
    return Int8Blocks(q.contiguous(), scale.contiguous(), gran)


def dequantize_blocks(blocks: Int8Blocks, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q / scale`` blockwise, in ``out_dtype``."""
    return dequantize(blocks.q, blocks.scale, out_dtype, blocks.block)
