"""Quantize one GEMM operand with its scaling state: amax → scale → saturating cast (+ record for delayed scaling).

This is the single entry point the linear layers use, so a fused GPU kernel can replace the reference steps here
without touching the layers. The reference does three passes over memory (amax, scale·cast, optional transpose).
"""

from __future__ import annotations

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
    rounding = rounding or state.rounding
    gran = state.granularity
    needs_amax = not (state.config.algo == "static" or (state.delayed and state._warm))
    current_amax = None
    if needs_amax or state.delayed:
        current_amax = block_amax(x2d, gran)
    scale = state.scale_for(current_amax)
    if state.delayed and current_amax is not None:
        state.record(current_amax)
    lp = quantize(x2d, scale, state.fmt, gran, rounding=rounding)
    return lp, scale


def quantize_operand_t(
    x2d: torch.Tensor, state: ScalingState, want_transpose: bool, use_kernel: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(lp, lpᵀ or None, scale, 1/scale or None)``: :func:`quantize_operand` plus the contiguous transpose the
    backward GEMMs read, in one fused pass on CUDA when :mod:`lowbit_amp.kernels.dispatch` allows (same bytes and
    state updates as the reference; the fused path also returns the inverse scale so the GEMM needs no reciprocal)."""
    from lowbit_amp.kernels.dispatch import fused_cast_unavailable

    if fused_cast_unavailable(x2d, state, state.rounding, enabled=use_kernel) is None:
        if torch.compiler.is_compiling():
            return traceable_fused_quantize(x2d, state, want_transpose)  # the same kernel as a custom op
        from lowbit_amp.kernels.fp8_cast import fused_quantize

        return fused_quantize(x2d, state, want_transpose)
    lp, scale = quantize_operand(x2d, state)
    return lp, (lp.t().contiguous() if want_transpose else None), scale, None
