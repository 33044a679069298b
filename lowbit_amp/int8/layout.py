"""Block geometry of the INT8 path, checked once when the config is built.

Every INT8 GEMM is written in NT form, ``out = a · bᵀ`` with both operands row-major and contracting over their last
dim, so one rule covers all three GEMMs of the linear layer: an operand's scale blocks are ``rows x kblock`` with
``kblock`` running along the contraction dim. The epilogue applies ``scale_a[m, kb] * scale_b[n, kb]`` once per
k-block, so the two operands must agree on ``kblock``. The fallback unit is a ``tile_rows x kblock`` tile of operand
``a``: the GEMM kernel's M tile, so a tile that falls back costs one extra product for that tile only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowbit_amp.quant.granularity import Granularity

if TYPE_CHECKING:
    from lowbit_amp.config import Int8Config


def _block(spec: str, what: str) -> Granularity:
    gran = Granularity.parse(spec)
    if gran.rows is None or gran.cols is None:
        raise ValueError(f"{what}={spec!r} must be a block 'RxC' (e.g. '1x128' or '128x128'), not a whole dimension.")
    return gran


def check_int8_config(cfg: "Int8Config") -> None:
    """Raise ``ValueError`` naming the field and the fix when the block shapes cannot work together."""
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
    if not cfg.fallback_threshold > 1.0:
        raise ValueError(
            f"fallback_threshold={cfg.fallback_threshold} must be > 1: it is a multiple of the median tile amax, and "
            "at <= 1 about half the tiles would fall back. The measured default is in docs/int8.md."
        )
