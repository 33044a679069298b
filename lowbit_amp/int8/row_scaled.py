"""Row-scaled INT8 with block-level fallback: one scale per row over the whole K, outlier blocks add a residual.

Why a second layout beside the ``1 x 128`` blocks: with a scale per K block, every block's INT32 product must be
promoted to FP32 (convert, multiply, add) inside the GEMM's main loop, and Triton waits for each INT8 MMA before
that promotion — on an H200 the block-scaled GEMM reaches 1.19-1.20x bf16 without fallback (docs/int8.md). With
one scale per row of each operand (``x``'s tokens, ``W``'s output channels), the whole contraction accumulates in
INT32 and the scales apply once in the epilogue, like an FP8 GEMM.

What it costs in precision, and how the fallback pays it back: a row scale is set by the row's largest value, so a
row holding an outlier block would lose the resolution of all its other blocks. The outlier blocks are therefore left
out of the row's scale: the row scale comes from the amax of the row's *unflagged* K blocks (flags as in
:mod:`lowbit_amp.int8.fallback`: a ``tile_rows x kblock`` tile whose amax exceeds ``threshold`` x the median tile
amax), the codes saturate at +-127, and inside flagged tiles what saturation cut off — ``x - q/s`` — is quantized again
(``residual``), with one scale per row (the residual is zero outside flagged tiles). Values the row scale covers are
then exact to the row's resolution even inside an outlier block (the residual there is only their rounding error), and
the outliers keep 8 bits relative to the row's largest one. The residual product runs on INT8 tensor cores for the
flagged tiles only and, its scale being per row too, accumulates in INT32 like the main product.

Exact arithmetic (the Triton kernel, :mod:`lowbit_amp.kernels.int8_row_gemm`, is tested against it)::

    acc  = Σ_k q_a[m, k] · q_b[n, k]                 (INT32 over the whole K: |acc| ≤ 127²·K < 2³¹)
    acc2 = Σ_k∈flagged tiles q2_a[m, k] · q_b[n, k]   (INT32)
    out  = (float(acc) · sinv_a[m] + float(acc2) · sinv2_a[m]) · sinv_b[n]  (+ bias), then the cast
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit_amp.formats import INT8
from lowbit_amp.int8.block_quant import Int8Blocks, expand_blocks, quantize_blocks
from lowbit_amp.int8.fallback import (
    FALLBACK_MODES,
    FallbackOperand,
    detect_outlier_tiles,
    main_of,
    require_b_hp,
    to_hp,
)
from lowbit_amp.quant.cast import compute_scale, quantize
from lowbit_amp.quant.granularity import Granularity, amax

__all__ = ["CHUNK_K", "MAX_K", "ROW", "check_given_flags", "is_row_scaled", "quantize_rows", "reference_row_mm_nt",
           "row_mm_chunked"]

ROW = Granularity(1, None)
MAX_K = (2**31 - 1) // (127 * 127)  # the longest contraction whose INT32 sum cannot overflow: 133,144
CHUNK_K = (MAX_K // 1024) * 1024  # longer contractions run in chunks of whole K blocks / fallback tiles: 133,120


def is_row_scaled(blocks: Int8Blocks) -> bool:
    return blocks.block.rows == 1 and blocks.block.cols is None


def quantize_rows(
    x2d: torch.Tensor,
    tile: Granularity | str | None = None,
    threshold: float = 6.0,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    mode: str = "residual",
    flags: torch.Tensor | None = None,
) -> Int8Blocks | FallbackOperand:
    """Row-scaled INT8 codes of ``x2d``; with ``tile`` (e.g. ``128x128``) outlier tiles fall back per ``mode``:
    ``residual`` (the module docstring) or ``hp`` (their codes zeroed, their product in bf16 with the other operand's
    16-bit values). ``flags``: the tiles' outlier flags when already known (see :func:`check_given_flags`), else
    detected here.

    Reference implementation (torch ops, any device); the fused Triton quantizer produces the same codes."""
    if x2d.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D tensor, got shape {tuple(x2d.shape)}; flatten leading dims first.")
    if mode not in FALLBACK_MODES:
        raise ValueError(f"Unknown fallback mode {mode!r}; use one of {list(FALLBACK_MODES)}.")
    if tile is None:
        return quantize_blocks(x2d, ROW, rounding=rounding, generator=generator)
    tile_g = Granularity.parse(tile)
    if tile_g.rows is None or tile_g.cols is None:
        raise ValueError(f"Fallback tile {tile!r} must be a block 'RxC' such as '128x128'.")
    rows = x2d.shape[0]
    block = Granularity(1, tile_g.cols)
    block_amax = amax(x2d, block)
    if flags is None:
        flags = detect_outlier_tiles(amax(block_amax, Granularity(tile_g.rows, 1)), threshold)
    else:
        check_given_flags(flags, x2d.shape, tile_g)
    row_flags = expand_blocks(flags, rows, flags.shape[1], Granularity(tile_g.rows, 1))
    clean = torch.where(row_flags, 0.0, block_amax).amax(1, keepdim=True)
    row_amax = torch.where(clean > 0, clean, block_amax.amax(1, keepdim=True))
    scale = compute_scale(row_amax, INT8)
    q = quantize(x2d, scale, INT8, ROW, rounding=rounding, generator=generator).contiguous()  # row-major, as above
    main = Int8Blocks(q, scale, ROW)
    operand = FallbackOperand(main, tile_g, flags, mode)
    if mode == "hp":
        main.q = main.q.masked_fill(operand.element_mask(), 0)
        operand.hp = to_hp(x2d)
        return operand
    missed = torch.where(operand.element_mask(), x2d.float() - main.dequantize(torch.float32), 0.0)
    operand.residual = quantize_blocks(missed, ROW, rounding=rounding, generator=generator)
    return operand


def check_given_flags(flags: torch.Tensor, shape: torch.Size | tuple[int, int], tile: Granularity) -> None:
    """Given flags must be the tile grid's: the weight gradient passes the forward's flags of ``x``, transposed, for
    ``xᵀ`` — the same square tiles transposed, with the median over the same tile amaxes, so the same flags that
    detection would find (one detection fewer per layer and step)."""
    rows, cols = shape
    assert tile.rows is not None and tile.cols is not None
    grid = (-(-rows // tile.rows), -(-cols // tile.cols))
    if flags.dtype != torch.bool or tuple(flags.shape) != grid:
        raise ValueError(f"Given fallback flags must be bool of the tile grid {grid} of a {rows}x{cols} operand in "
                         f"{tile} tiles, got {flags.dtype} {tuple(flags.shape)}.")


def reference_row_mm_nt(
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_hp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pure-PyTorch row-scaled INT8 GEMM ``out = a · bᵀ`` (the module docstring's arithmetic). ``hp`` fallback:
    ``out = float(acc) · sinv_a[m] · sinv_b[n] + Σ_flagged tiles (bf16 a · bf16 b_hp)`` (FP32 sums). Contractions
    longer than :data:`MAX_K` run in chunks (:func:`row_mm_chunked`)."""
    return row_mm_chunked(_reference_row_mm, a, b, out_dtype, bias, b_hp)


def row_mm_chunked(
    mm: Callable[..., torch.Tensor],
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_hp: torch.Tensor | None = None,
    chunk_k: int | None = None,
) -> torch.Tensor:
    """``mm(a, b, out_dtype, bias, b_hp)``, or, when K exceeds what INT32 holds (:data:`MAX_K`: the weight gradient
    contracts over tokens, and 64 x 4096 tokens is 262,144), the sum in FP32 of ``mm`` over K chunks of
    :data:`CHUNK_K` (whole fallback tiles; the row scales are the same in every chunk), then the bias and the cast.
    ``chunk_k``: for tests."""
    main = main_of(a)
    if not (is_row_scaled(main) and is_row_scaled(b)):
        raise ValueError(f"Row-scaled INT8 GEMM needs row-scaled operands, got blocks {main.block} and {b.block}.")
    chunk = chunk_k or CHUNK_K
    k_dim = main.q.shape[1]
    if k_dim <= chunk:
        return mm(a, b, out_dtype, bias, b_hp)
    out = None
    for start in range(0, k_dim, chunk):
        a_c, b_c, hp_c = _k_slice(a, b, b_hp, start, min(k_dim, start + chunk))
        part = mm(a_c, b_c, torch.float32, None, hp_c)
        out = part if out is None else out.add_(part)
    assert out is not None
    return finish_gemm(out, bias, out_dtype)


def _k_slice(a: Int8Blocks | FallbackOperand, b: Int8Blocks, b_hp: torch.Tensor | None, start: int,
             end: int) -> tuple[Int8Blocks | FallbackOperand, Int8Blocks, torch.Tensor | None]:
    """Columns ``start:end`` of both operands (views; the row scales are whole-row and shared)."""
    main = main_of(a)
    main_c = Int8Blocks(main.q[:, start:end], main.scale, ROW)
    b_c = Int8Blocks(b.q[:, start:end], b.scale, ROW)
    hp_c = b_hp[:, start:end] if b_hp is not None else None
    if not isinstance(a, FallbackOperand):
        return main_c, b_c, hp_c
    tile_cols = a.tile.cols
    assert tile_cols is not None and start % tile_cols == 0, (start, a.tile)
    flags = a.flags[:, start // tile_cols: -(-end // tile_cols)]
    op = FallbackOperand(main_c, a.tile, flags, a.mode)
    if a.residual is not None:
        op.residual = Int8Blocks(a.residual.q[:, start:end], a.residual.scale, ROW)
    if a.hp is not None:
        op.hp = a.hp[:, start:end]
    return op, b_c, hp_c


def _reference_row_mm(
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_hp: torch.Tensor | None = None,
) -> torch.Tensor:
    from lowbit_amp.int8.reference_gemm import int_mm_nt

    main = main_of(a)
    if main.q.shape[1] > MAX_K:
        raise ValueError(f"Row-scaled INT8 GEMM: K={main.q.shape[1]} could overflow the INT32 accumulator (max "
                         f"{MAX_K}); call it through row_mm_chunked.")
    out = int_mm_nt(main.q, b.q).float() * main.scale.float().reciprocal()
    sb_inv = b.scale.float().reciprocal().t()
    if isinstance(a, FallbackOperand) and a.mode == "hp":
        assert a.hp is not None
        a_hp = torch.where(a.element_mask(), a.hp, 0).float()  # bf16 values, FP32 products and sums
        return finish_gemm(out * sb_inv + a_hp @ to_hp(require_b_hp(b_hp)).float().t(), bias, out_dtype)
    if isinstance(a, FallbackOperand):
        assert a.residual is not None
        q2 = a.residual.q.masked_fill(~a.element_mask(), 0)  # the kernel reads flagged tiles only
        out += int_mm_nt(q2, b.q).float() * a.residual.scale.float().reciprocal()
    return finish_gemm(out * sb_inv, bias, out_dtype)


def finish_gemm(out: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The INT8 GEMMs' last step (both layouts' references): the bias added in FP32 to the FP32 result, the cast."""
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)
