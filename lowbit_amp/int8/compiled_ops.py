"""The row-scaled INT8 quantizer and GEMM as ``torch.library`` ops, so compiled graphs can hold them.

Why: on CUDA both launch Triton kernels through a Python launcher (:class:`lowbit_amp.kernels.int8_gemm._Launcher`)
that Dynamo cannot trace, so an INT8 layer under ``torch.compile`` breaks the graph around every quantization and GEMM.
As opaque ops with fake (meta) implementations they stay in the graph, as the FP8 cast does
(:mod:`lowbit_amp.kernels.fp8_cast_op`). Each op's implementation is the eager entry point itself
(:func:`lowbit_amp.int8.activation.quantize_act`'s row path, :func:`lowbit_amp.int8.reference_gemm.int8_block_mm_nt`),
so eager and compiled run the same kernels on CUDA and the same reference on CPU.

The operands cross the op boundary as plain tensors (a :class:`FallbackOperand` is codes, scales, flags and either the
residual's codes and scales or the 16-bit operand); empty tensors stand for absent parts. No output aliases an input:
the hp operand's 16-bit values are the caller's ``x`` (not returned), and given flags are not returned either.

Routing (:func:`use_compiled_ops`): only while compiling, and only row-scaled operands with round-to-nearest (other
layouts and stochastic rounding keep the eager path, with graph breaks on CUDA). Tested on CPU through the same ops
(tests/nn/test_compile.py, tests/int8/test_compiled_ops.py) and on an H200 (tests/int8/test_compiled_ops_gpu.py, run
zk 2026-12-02: compiled INT8 anchor step 35.90 ms vs compiled bf16 43.13 ms, 1.20x; eager INT8 39.02 ms).
"""

from __future__ import annotations

import torch

from lowbit_amp.int8.block_quant import Int8Blocks
from lowbit_amp.int8.fallback import FallbackOperand, main_of, to_hp
from lowbit_amp.int8.row_scaled import ROW, is_row_scaled
from lowbit_amp.quant.granularity import Granularity

__all__ = ["compiled_quantize_rows", "compiled_row_mm", "use_compiled_ops"]

_LIB = torch.library.Library("lowbit_amp", "FRAGMENT")
_LIB.define(
    "int8_quantize_rows(Tensor x, int tile_rows, int tile_cols, bool fallback, float threshold, bool hp, "
    "Tensor? flags) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define(
    "int8_row_mm(Tensor aq, Tensor ascale, Tensor bq, Tensor bscale, Tensor flags, Tensor q2, Tensor scale2, "
    "Tensor? a_hp, Tensor? b_hp, Tensor? bias, int tile_rows, int tile_cols, ScalarType out_dtype) -> Tensor")


def use_compiled_ops(act: Granularity, rounding: str) -> bool:
    """Whether this row-layout call goes through the ops: compiling, row-scaled, nearest rounding."""
    return torch.compiler.is_compiling() and act == ROW and rounding == "nearest"


def _quantize_impl(x, tile_rows, tile_cols, fallback, threshold, hp, flags):  # type: ignore[no-untyped-def]
    from lowbit_amp.int8.activation import _quantize_rows

    op = _quantize_rows(x, Granularity(tile_rows, tile_cols), threshold, fallback, "hp" if hp else "residual",
                        "nearest", None, "auto", flags)
    main = main_of(op)
    none8 = x.new_empty((0,), dtype=torch.int8)
    none32 = x.new_empty((0,), dtype=torch.float32)
    if not isinstance(op, FallbackOperand):
        return main.q, main.scale, x.new_empty((0, 0), dtype=torch.bool), none8, none32
    out_flags = op.flags if flags is None else x.new_empty((0, 0), dtype=torch.bool)
    if hp:
        return main.q, main.scale, out_flags, none8, none32
    assert op.residual is not None
    return main.q, main.scale, out_flags, op.residual.q, op.residual.scale


_LIB.impl("int8_quantize_rows", _quantize_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lowbit_amp::int8_quantize_rows", lib=_LIB)
def _quantize_fake(x, tile_rows, tile_cols, fallback, threshold, hp, flags):  # type: ignore[no-untyped-def]
    rows, cols = x.shape
    q = x.new_empty((rows, cols), dtype=torch.int8)
    scale = x.new_empty((rows, 1), dtype=torch.float32)
    grid = (-(-rows // tile_rows), -(-cols // tile_cols)) if fallback and flags is None else (0, 0)
    residual = fallback and not hp
    return (q, scale, x.new_empty(grid, dtype=torch.bool),
            x.new_empty((rows, cols) if residual else (0,), dtype=torch.int8),
            x.new_empty((rows, 1) if residual else (0,), dtype=torch.float32))


def _operand(aq, ascale, flags, q2, scale2, a_hp, tile):  # type: ignore[no-untyped-def]
    main = Int8Blocks(aq, ascale, ROW)
    if flags.numel() == 0 and q2.numel() == 0 and a_hp is None:
        return main
    if a_hp is not None:
        return FallbackOperand(main, tile, flags, "hp", hp=a_hp)
    return FallbackOperand(main, tile, flags, "residual", residual=Int8Blocks(q2, scale2, ROW))


def _mm_impl(aq, ascale, bq, bscale, flags, q2, scale2, a_hp, b_hp, bias,  # type: ignore[no-untyped-def]
             tile_rows, tile_cols, out_dtype):
    from lowbit_amp.int8.reference_gemm import int8_block_mm_nt

    a = _operand(aq, ascale, flags, q2, scale2, a_hp, Granularity(tile_rows, tile_cols))
    return int8_block_mm_nt(a, Int8Blocks(bq, bscale, ROW), out_dtype, bias, b_hp=b_hp)


_LIB.impl("int8_row_mm", _mm_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lowbit_amp::int8_row_mm", lib=_LIB)
def _mm_fake(aq, ascale, bq, bscale, flags, q2, scale2, a_hp, b_hp, bias,  # type: ignore[no-untyped-def]
             tile_rows, tile_cols, out_dtype):
    return aq.new_empty((aq.shape[0], bq.shape[0]), dtype=out_dtype)


def compiled_quantize_rows(x2d: torch.Tensor, tile: Granularity, threshold: float, fallback: bool, mode: str,
                           flags: torch.Tensor | None) -> Int8Blocks | FallbackOperand:
    """:func:`lowbit_amp.int8.activation.quantize_act`'s row path through the op (same return types)."""
    assert tile.rows is not None and tile.cols is not None
    hp = mode == "hp"
    q, scale, out_flags, q2, scale2 = torch.ops.lowbit_amp.int8_quantize_rows(
        x2d, tile.rows, tile.cols, fallback, threshold, hp, flags if fallback else None)
    main = Int8Blocks(q, scale, ROW)
    if not fallback:
        return main
    used = flags if flags is not None else out_flags
    if hp:
        return FallbackOperand(main, tile, used, "hp", hp=to_hp(x2d))
    return FallbackOperand(main, tile, used, "residual", residual=Int8Blocks(q2, scale2, ROW))


def compiled_row_mm(a: Int8Blocks | FallbackOperand, b: Int8Blocks, out_dtype: torch.dtype,
                    bias: torch.Tensor | None, b_hp: torch.Tensor | None) -> torch.Tensor:
    """:func:`lowbit_amp.int8.reference_gemm.int8_block_mm_nt` for row-scaled operands, through the op."""
    main = main_of(a)
    assert is_row_scaled(main) and is_row_scaled(b)
    empty8 = main.q.new_empty((0,), dtype=torch.int8)
    empty32 = main.q.new_empty((0,), dtype=torch.float32)
    if isinstance(a, FallbackOperand):
        tile = a.tile
        flags = a.flags
        q2 = a.residual.q if a.residual is not None else empty8
        scale2 = a.residual.scale if a.residual is not None else empty32
        a_hp = a.hp if a.mode == "hp" else None
    else:
        tile, q2, scale2, a_hp = Granularity(1, 1), empty8, empty32, None
        flags = main.q.new_empty((0, 0), dtype=torch.bool)
    assert tile.rows is not None and tile.cols is not None
    return torch.ops.lowbit_amp.int8_row_mm(main.q, main.scale, b.q, b.scale, flags, q2, scale2, a_hp,
                                            b_hp if a_hp is not None else None, bias, tile.rows, tile.cols, out_dtype)
