"""Dynamic block-level fallback (arXiv 2503.08040): outlier tiles of an activation get ~16-bit precision.

Why: SwiGLU outputs carry outliers that sit in different blocks from step to step, not in fixed channels. In a block
holding one, the scale is set by the outlier and the block's other values round to a few levels (or to zero), so
block-wise INT8 training of GLU models drifts. Detecting those blocks per step and representing only them more
precisely restores accuracy at the cost of a few percent extra work.

Detection: a fallback tile (``fallback_block``, default 128x128 — the GEMM kernel's M tile by K block, so a fallback
costs one extra product for that tile only) is an outlier when its amax exceeds ``threshold`` times the median tile
amax of the tensor. The median is robust: unlike the mean, a few large tiles do not raise the bar that detects them.
If the median is 0 (a mostly-zero tensor) nothing falls back. The measured default threshold is in docs/int8.md.

Two representations of an outlier tile (``mode``):

* ``residual``: ``x ≈ q1/s1 + q2/s2``; ``q2`` quantizes what ``q1`` missed, with its own block scales, giving about
  15 bits of resolution relative to the block amax. One extra INT8 product for that tile, still on INT8 tensor cores;
  the other operand stays INT8.
* ``hp``: the tile's INT8 codes are zeroed and the tile's product is done in bf16 with the other operand's 16-bit
  values (``hp`` tensors carried along).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit_amp.int8.block_quant import Int8Blocks, expand_blocks, quantize_blocks
from lowbit_amp.quant.granularity import Granularity, amax

__all__ = ["FALLBACK_MODES", "FallbackOperand", "detect_outlier_tiles", "main_of", "quantize_with_fallback", "require_b_hp",
           "to_hp"]

FALLBACK_MODES = ("residual", "hp")
HP_DTYPE = torch.bfloat16  # the "16-bit product" of hp mode
_FLAGS_KERNEL_TILES = 32768  # = lowbit_amp.kernels.outlier_flags.MAX_TILES (a test keeps them equal)


def to_hp(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to :data:`HP_DTYPE` (bf16, round-to-nearest-even), the operand of hp fallback's 16-bit product.

    Why not just ``x.to(bf16)``: a compiled graph that later reads it as ``.float()`` may drop the round trip —
    Inductor on torch 2.11 does for the block layout's fallback on CPU even with ``emulate_precision_casts`` (14004 of
    32768 outputs off by up to 0.1 against eager, tests/nn/test_compile.py on the H200, run zu) — and compute the
    fallback product from unrounded FP32 operands. While compiling, the rounding is therefore done on the bits
    (``bits + 0x7FFF + lsb`` then truncation: the same RNE values, NaN kept), which no pass can fold away; eager
    keeps the one-kernel cast. A bf16 input is returned as is."""
    if x.dtype == HP_DTYPE:
        return x
    if not torch.compiler.is_compiling():
        return x.to(HP_DTYPE)
    xf = x.float()
    bits = xf.view(torch.int32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).view(torch.float32)
    return torch.where(torch.isnan(xf), xf, rounded).to(HP_DTYPE)


@dataclass
class FallbackOperand:
    """Operand ``a`` of an INT8 GEMM with some tiles in higher precision.

    Attributes:
        main: the INT8 codes and scales of every block (in ``hp`` mode zero inside fallback tiles).
        tile: the fallback tile shape.
        flags: bool ``(ceil(rows/tr), ceil(cols/tc))``, True where the tile falls back.
        mode: ``"residual"`` or ``"hp"``.
        residual: ``residual`` mode: the second INT8 term (codes meaningful inside flagged tiles only).
        hp: ``hp`` mode: the operand in bf16 (read inside flagged tiles only).
    """

    main: Int8Blocks
    tile: Granularity
    flags: torch.Tensor
    mode: str
    residual: Int8Blocks | None = None
    hp: torch.Tensor | None = None

    @property
    def fraction(self) -> torch.Tensor:
        """Fraction of tiles that fell back, as a 0-d float32 tensor (no host sync)."""
        return self.flags.float().mean() if self.flags.numel() else torch.zeros((), device=self.flags.device)

    def fraction_into(self, out: torch.Tensor) -> None:
        """:attr:`fraction` written into the 0-d ``out`` by one reduction (the layer's per-forward monitor buffer: one
        launch instead of a cast, a mean and a copy)."""
        if self.flags.numel():
            torch.mean(self.flags, dim=tuple(range(self.flags.dim())), dtype=out.dtype, out=out)
        else:
            out.zero_()

    def element_mask(self) -> torch.Tensor:
        """Bool ``(rows, cols)``: True at elements inside a fallback tile."""
        return expand_blocks(self.flags, *self.main.q.shape, self.tile)

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The value this operand represents (what the GEMM multiplies)."""
        out = self.main.dequantize(torch.float32)
        mask = self.element_mask()
        if self.mode == "residual":
            assert self.residual is not None
            out = out + torch.where(mask, self.residual.dequantize(torch.float32), 0.0)
        else:
            assert self.hp is not None
            out = torch.where(mask, self.hp.float(), out)
        return out.to(out_dtype)


def main_of(a: Int8Blocks | FallbackOperand) -> Int8Blocks:
    """The INT8 codes and scales of a GEMM operand, with or without fallback."""
    return a.main if isinstance(a, FallbackOperand) else a


def require_b_hp(b_hp: torch.Tensor | None) -> torch.Tensor:
    """``hp`` fallback multiplies the flagged tiles by the other operand's 16-bit values: they must be given."""
    if b_hp is None:
        raise ValueError("fallback_mode='hp' needs b_hp, the other operand in 16 bits, for the fallback tiles.")
    return b_hp


def detect_outlier_tiles(tile_amax: torch.Tensor, threshold: float) -> torch.Tensor:
    """True for tiles whose amax exceeds ``threshold`` × the median tile amax (never when that median is 0 or NaN).

    The median is :func:`torch.median`'s: the lower middle value, NaN if any value is NaN. On CPU that is what runs.
    On CUDA ``median`` is a full sort with ~265 us of host time per call (H200 run v, 2026-12-02: 30 calls per
    anchor step, in a step its host time bounded), so CUDA takes the fused kernel
    :mod:`lowbit_amp.kernels.outlier_flags` (one launch), or :func:`_flags_by_selection` beyond its size."""
    if tile_amax.numel() == 0:
        return torch.zeros_like(tile_amax, dtype=torch.bool)
    if tile_amax.is_cuda:
        if tile_amax.numel() <= _FLAGS_KERNEL_TILES:
            from lowbit_amp.kernels.outlier_flags import triton_outlier_flags

            return triton_outlier_flags(tile_amax, threshold)
        return _flags_by_selection(tile_amax, threshold)
    median = tile_amax.flatten().median()
    return (tile_amax > threshold * median) & (median > 0)


def _flags_by_selection(tile_amax: torch.Tensor, threshold: float) -> torch.Tensor:
    """The same flags with the median as ``kthvalue((n-1)//2 + 1)`` (no sort), NaN's rule made explicit: kthvalue
    ranks NaN last instead of returning it, so a NaN anywhere clears every flag, as a NaN median would."""
    flat = tile_amax.flatten()
    median = flat.kthvalue((flat.numel() - 1) // 2 + 1).values
    return (tile_amax > threshold * median) & (median > 0) & ~flat.isnan().any()


def quantize_with_fallback(
    x2d: torch.Tensor,
    act_block: Granularity | str,
    tile: Granularity | str,
    threshold: float,
    mode: str = "residual",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> FallbackOperand:
    """Block-quantize ``x2d`` and represent its outlier tiles per ``mode`` (reference; any device)."""
    if mode not in FALLBACK_MODES:
        raise ValueError(f"Unknown fallback mode {mode!r}; use one of {list(FALLBACK_MODES)}.")
    act = Granularity.parse(act_block)
    tile_g = Granularity.parse(tile)
    main = quantize_blocks(x2d, act, rounding=rounding, generator=generator)
    flags = detect_outlier_tiles(amax(x2d, tile_g), threshold)
    operand = FallbackOperand(main, tile_g, flags, mode)
    mask = operand.element_mask()
    if mode == "residual":
        missed = torch.where(mask, x2d.float() - main.dequantize(torch.float32), 0.0)
        operand.residual = quantize_blocks(missed, act, rounding=rounding, generator=generator)
    else:
        main.q = main.q.masked_fill(mask, 0)
        operand.hp = to_hp(x2d)
    return operand
