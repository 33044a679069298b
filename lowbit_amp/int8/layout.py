"""Block geometry of the INT8 path, checked once when the config is built.

Every INT8 GEMM is written in NT form, ``out = a · bᵀ`` with both operands row-major and contracting over their last
dim, so one rule covers all three GEMMs of the linear layer: an operand's scale blocks are ``rows x kblock`` with
``kblock`` running along the contraction dim. The epilogue applies ``scale_a[m, kb] * scale_b[n, kb]`` once per
k-block, so the two operands must agree on ``kblock``. The fallback unit is a ``tile_rows x kblock`` tile of operand
``a``: the GEMM kernel's M tile, so a tile that falls back costs one extra product for that tile only.
Or both operands ``row``-scaled (:mod:`lowbit_amp.int8.row_scaled`): the whole K is one block, and the fallback tile
(any ``R x C``) only decides which tiles get the residual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowbit_amp.quant.granularity import Granularity

ROW = Granularity(1, None)

if TYPE_CHECKING:
    from lowbit_amp.config import Int8Config


def _block(spec: str, what: str) -> Granularity:
    gran = Granularity.parse(spec)
    if gran.rows is None or gran.cols is None:
        raise ValueError(f"{what}={spec!r} must be a block 'RxC' (e.g. '1x128' or '128x128'), not a whole dimension.")
    return gran


def check_int8_config(cfg: Int8Config) -> None:
    """Raise ``ValueError`` naming the field and the fix when the block shapes cannot work together."""
    act_row = Granularity.parse(cfg.act_block) == ROW
    weight_row = Granularity.parse(cfg.weight_block) == ROW
    if act_row or weight_row:
        _check_row_layout(cfg, act_row, weight_row)
        return
    act = _block(cfg.act_block, "act_block")
    weight = _block(cfg.weight_block, "weight_block")
    tile = _block(cfg.fallback_block, "fallback_block")
    if act.cols != weight.cols:
        raise ValueError(
            f"act_block {cfg.act_block!r} and weight_block {cfg.weight_block!r} must share the K block (their "
            f"column count): the epilogue applies both scales once per K block. Try weight_block='{weight.rows}x{act.cols}'."
        )
    if tile.cols != act.cols or tile.rows % act.rows:
        raise ValueError(
            f"fallback_block {cfg.fallback_block!r} must have act_block's columns ({act.cols}) and a multiple of its "
            f"rows ({act.rows}), so a fallback tile is a whole number of activation blocks. Try '128x{act.cols}'."
        )
    _check_threshold(cfg)


def _check_row_layout(cfg: Int8Config, act_row: bool, weight_row: bool) -> None:
    """The row-scaled layout (:mod:`lowbit_amp.int8.row_scaled`): both operands per row."""
    if not (act_row and weight_row):
        raise ValueError(
            f"act_block {cfg.act_block!r} and weight_block {cfg.weight_block!r}: 'row' scaling accumulates the whole K "
            "in INT32, so both operands must be row-scaled. Set both to 'row', or use blocks such as '1x128' / '128x128'."
        )
    _block(cfg.fallback_block, "fallback_block")
    _check_threshold(cfg)


def _check_threshold(cfg: Int8Config) -> None:
    if not cfg.fallback_threshold > 1.0:
        raise ValueError(
            f"fallback_threshold={cfg.fallback_threshold} must be > 1: it is a multiple of the median tile amax, and "
            "at <= 1 about half the tiles would fall back. The measured default is in docs/int8.md."
        )
