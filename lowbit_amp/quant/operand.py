"""Quantize one GEMM operand with its scaling state: amax → scale → saturating cast (+ record for delayed scaling).

This is the single entry point the linear layers use, so a fused GPU kernel can replace the reference steps here
without touching the layers. The reference does three passes over memory (amax, scale·cast, optional transpose).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowbit_amp.kernels.fp8_cast_op import traceable_fused_quantize
from lowbit_amp.quant.cast import quantize
from lowbit_amp.quant.granularity import amax as block_amax
from lowbit_amp.scaling.state import ScalingState


def quantize_operand(
    x2d: torch.Tensor, state: ScalingState, rounding: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(lp, scale)`` for a 2-D operand, using and updating ``state`` (no host sync); ``rounding`` defaults
    to the operand's (``state.rounding``)."""
    lp, scale, _ = _quantize_operand_amax(x2d, state, rounding)
    return lp, scale


def _quantize_operand_amax(
    x2d: torch.Tensor, state: ScalingState, rounding: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_operand` plus the amax it recorded into ``state`` (None when the state records none)."""
    rounding = rounding or state.rounding
    gran = state.granularity
    needs_amax = not (state.config.algo == "static" or (state.delayed and state._warm))
    current_amax = None
    if needs_amax or state.delayed:
        current_amax = block_amax(x2d, gran)
    scale = state.scale_for(current_amax)
    recorded = None
    if state.delayed and current_amax is not None:
        state.record(current_amax)
        recorded = current_amax
    lp = quantize(x2d, scale, state.fmt, gran, rounding=rounding)
    return lp, scale, recorded


class OperandCast(NamedTuple):
    """One operand's FP8 cast: ``lp``, its contiguous transpose (or None), the scale and its inverse (None where the
    reference path leaves it to the GEMM), and the amax recorded into the state (None when it records none: static
    or current scaling) — what a sibling layer sharing this cast records into its own state."""

    lp: torch.Tensor
    lp_t: torch.Tensor | None
    scale: torch.Tensor
    scale_inv: torch.Tensor | None
    amax: torch.Tensor | None


def cast_operand(x2d: torch.Tensor, state: ScalingState, want_transpose: bool, use_kernel: bool = True) -> OperandCast:
    """:func:`quantize_operand` plus the contiguous transpose the backward GEMMs read, in one fused pass on CUDA when
    :mod:`lowbit_amp.kernels.dispatch` allows (same bytes and state updates as the reference; the fused path also
    returns the inverse scale so the GEMM needs no reciprocal)."""
    from lowbit_amp.kernels.dispatch import fused_cast_unavailable

    if fused_cast_unavailable(x2d, state, state.rounding, enabled=use_kernel) is None:
        if torch.compiler.is_compiling():
            return OperandCast(*traceable_fused_quantize(x2d, state, want_transpose))  # the same kernel, custom op
        from lowbit_amp.kernels.fp8_cast import fused_quantize

        return OperandCast(*fused_quantize(x2d, state, want_transpose))
    lp, scale, amax = _quantize_operand_amax(x2d, state)
    return OperandCast(lp, (lp.t().contiguous() if want_transpose else None), scale, None, amax)


def quantize_operand_t(
    x2d: torch.Tensor, state: ScalingState, want_transpose: bool, use_kernel: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(lp, lpᵀ or None, scale, 1/scale or None)``: :func:`cast_operand` without the recorded amax."""
    return cast_operand(x2d, state, want_transpose, use_kernel)[:4]
