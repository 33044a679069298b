"""What the monitor counts for one quantized operand: saturation, underflow, amax, scale range, quantization SQNR.

Definitions (the tests count these directly on crafted tensors):

* **saturated** — elements the cast clipped: their scaled magnitude ``|x * scale|`` lies beyond the rounding interval
  of the format's max, ``max + ulp(max)/2`` (E4M3: 464, E5M2: 61440, INT8: 127.5). Values between the max and that bound
  round to the max with an ordinary rounding error, so they are not counted — nor is the amax itself under current
  scaling, which float32 rounding of ``scale`` can put a hair above the max.
* **underflowed** — elements that are non-zero in high precision but zero after the cast (flushed below half the
  smallest subnormal). Zeros of the input are not counted.

Both are fractions of all elements (NaNs count as neither). Computed in float32 on the operand's device; the single
host transfer per sample happens in :meth:`OperandStats.to_host`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit_amp.formats import Format
from lowbit_amp.quant.cast import dequantize, quantize
from lowbit_amp.quant.granularity import Granularity, as_2d, expand_scale
from lowbit_amp.quant.metrics import sqnr_db


@dataclass
class OperandStats:
    """One sample of one operand. Device tensors until :meth:`to_host`."""

    amax: torch.Tensor
    scale_min: torch.Tensor
    scale_max: torch.Tensor
    saturated: torch.Tensor
    underflowed: torch.Tensor
    numel: int

    def to_host(self) -> dict[str, float]:
        values = torch.stack([self.amax, self.scale_min, self.scale_max, self.saturated.float(),
                              self.underflowed.float()]).cpu().tolist()
        amax, smin, smax, sat, under = values
        n = max(self.numel, 1)
        return {"amax": amax, "scale_min": smin, "scale_max": smax, "saturated": sat / n, "underflow": under / n,
                "numel": self.numel}


def count_saturated(hp: torch.Tensor, scale: torch.Tensor, fmt: Format, granularity: Granularity | str) -> torch.Tensor:
    """Number of elements with ``|hp * scale| > saturation_bound(fmt)`` (0-d int64 tensor, no host sync)."""
    scaled = as_2d(hp).float() * expand_scale(scale.float(), hp.shape, Granularity.parse(granularity))
    return (scaled.abs() > saturation_bound(fmt)).sum()


def saturation_bound(fmt: Format) -> float:
    """``fmt.max + ulp(fmt.max) / 2``: beyond it a value is clipped rather than rounded to the max."""
    if not fmt.is_float:
        return fmt.max + 0.5
    ulp = 2.0 ** (math.floor(math.log2(fmt.max)) - fmt.mantissa_bits)
    return fmt.max + ulp / 2


def count_underflowed(hp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Number of elements non-zero in ``hp`` and zero in its cast ``lp`` (0-d int64 tensor, no host sync)."""
    return ((hp != 0) & (lp.float() == 0)).sum()


def operand_stats(
    hp: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format,
    granularity: Granularity | str,
    lp: torch.Tensor | None = None,
) -> OperandStats:
    """Counters for ``hp`` cast with ``scale``; ``lp`` (the cast the layer made) is recomputed when not given."""
    hp = hp.detach()
    if lp is None:
        lp = quantize(hp, scale, fmt, granularity)
    scale = scale.detach().float()
    finite_amax = torch.nan_to_num(hp.abs().float(), nan=0.0).amax() if hp.numel() else torch.zeros((), device=hp.device)
    return OperandStats(
        amax=finite_amax,
        scale_min=scale.min(),
        scale_max=scale.max(),
        saturated=count_saturated(hp, scale, fmt, granularity),
        underflowed=count_underflowed(hp, lp),
        numel=hp.numel(),
    )


def quantization_sqnr(hp: torch.Tensor, scale: torch.Tensor, fmt: Format, granularity: Granularity | str) -> float:
    """SQNR (dB) of the round trip ``dequantize(quantize(hp))`` against ``hp`` itself."""
    lp = quantize(hp.detach(), scale, fmt, granularity)
    return sqnr_db(hp, dequantize(lp, scale, torch.float64, granularity))
