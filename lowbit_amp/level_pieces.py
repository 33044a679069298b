"""Which optional modules a config needs, checked before training starts.

``LowBitLinear`` and ``amp.initialize`` import the INT8 GEMM, the FP8 weight-gradient cast and the low-bit optimizer
lazily, the first time a layer or optimizer needs them. That keeps ``import lowbit_amp`` light, but a missing or broken
piece would otherwise surface as an ``ImportError`` from deep inside the first forward pass, possibly after other levels
already trained for minutes. :func:`check_pieces` finds that out up front and names the level, the module and why.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from lowbit_amp.config import LowBitConfig

__all__ = ["MissingPieceError", "Piece", "check_pieces", "missing_pieces", "pieces_for"]


class MissingPieceError(RuntimeError):
    """A config needs a module that this installation does not have (or that fails to import)."""


@dataclass(frozen=True)
class Piece:
    """One lazily imported module (and the name in it that the core calls) and what it provides."""

    module: str
    attribute: str
    provides: str


INT8_GEMM = Piece("lowbit_amp.nn.int8_function", "Int8LinearFunction", "INT8 block-wise GEMMs (opt_level 'int8')")
FP8_WEIGHT_GRAD = Piece("lowbit_amp.grads.fp8_grad", "to_fp8_weight_grad", "FP8 weight gradients (O2, O3)")
LOWBIT_OPTIMIZER = Piece("lowbit_amp.optim.build", "build_optimizer", "the optimizer rebuild for 8-bit grads/states (O2, O3)")


def _linear_values(config: LowBitConfig, field_name: str) -> set[Any]:
    """A LinearConfig field's value for the whole model and in every per-module override."""
    values = {getattr(config.linear, field_name)}
    for override in config.modules.overrides:
        if field_name in override.linear:
            values.add(override.linear[field_name])
    return values


def pieces_for(config: LowBitConfig, with_optimizer: bool = True) -> list[Piece]:
    """The optional modules training with ``config`` imports (mirrors the lazy imports in nn/linear.py and
    initialize.py)."""
    pieces = []
    if "int8" in _linear_values(config, "compute"):
        pieces.append(INT8_GEMM)
    low_bit_wgrad = any(value != "hp" for value in _linear_values(config, "weight_grad"))
    if low_bit_wgrad:
        pieces.append(FP8_WEIGHT_GRAD)
    if with_optimizer and (config.optimizer.enabled or config.linear.weight_grad != "hp"):
        pieces.append(LOWBIT_OPTIMIZER)
    return pieces


def missing_pieces(config: LowBitConfig, with_optimizer: bool = True) -> list[tuple[Piece, str]]:
    """``(piece, why)`` for every needed piece that cannot be imported or lacks the expected name."""
    missing = []
    for piece in pieces_for(config, with_optimizer):
        try:
            module = importlib.import_module(piece.module)
        except ImportError as err:
            missing.append((piece, f"import failed: {err}"))
            continue
        if not hasattr(module, piece.attribute):
            missing.append((piece, f"{piece.module} has no {piece.attribute}"))
    return missing


def check_pieces(config: LowBitConfig, label: str | None = None, with_optimizer: bool = True) -> None:
    """Raise :class:`MissingPieceError` naming every missing piece of ``config``."""
    missing = missing_pieces(config, with_optimizer)
    if not missing:
        return
    name = label or config.opt_level
    lines = [f"  - {piece.module} ({piece.provides}): {why}" for piece, why in missing]
    raise MissingPieceError(
        f"opt level {name!r} needs modules this installation of lowbit_amp does not have:\n" + "\n".join(lines) +
        "\nFix: install a lowbit_amp version that includes them, or run the levels that are available "
        "(e.g. --levels O0,O1)."
    )
