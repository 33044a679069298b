"""The scale formula and the casts between high precision and a low-precision format.

Convention (the same as Transformer Engine's and ``torch._scaled_mm``'s inputs): ``scale`` maps high precision to the
low-precision grid, ``lp = saturate(hp * scale)``; its reciprocal ``scale_inv`` maps back, ``hp ≈ lp * scale_inv``.

The scale formula, ``scale = fmt.max / (amax * 2**margin)``, and its edge cases:

==========================  ==================================================================================
amax                        scale
==========================  ==================================================================================
finite, > 0                 ``fmt.max / (amax * 2**margin)``, rounded down to a power of two if asked
0 (an all-zero tensor)      the previous scale if there is one, else 1 — any scale represents zeros exactly
inf or NaN                  the previous scale if there is one, else 1 — a non-finite amax never becomes a scale
so tiny the ratio overflows capped at ``2**126`` (finite in fp32, and its reciprocal is a normal fp32)
==========================  ==================================================================================

Saturation: values beyond ``±fmt.max`` after scaling clamp to ``±fmt.max`` (torch ≥ 2.12 saturates on its own; 2.11 does
not, so we always clamp first). NaN inputs stay NaN in FP8 (E4M3/E5M2 have NaN encodings); for INT8 they become 0.
"""

from __future__ import annotations

import math

import torch

from lowbit_amp.formats import Format, get_format
from lowbit_amp.quant.granularity import Granularity, as_2d, expand_scale

MAX_SCALE = 2.0**126


def compute_scale(
    amax: torch.Tensor,
    fmt: Format | str,
    margin: int = 0,
    power_of_2: bool = False,
    prev_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale(s) that map ``amax`` to ``fmt.max / 2**margin``; see the module docstring for the edge cases.

    Works elementwise on any shape of ``amax`` (tensorwise, per-row, per-block) with no host synchronisation.
    """
    fmt = get_format(fmt)
    amax = amax.float()
    target = fmt.max / (2.0**margin)
    # Seven elementwise ops (it was 13): this runs for every current-scaled cast, every FP8 weight gradient and the
    # per-step history roll, and at small sizes each op is ~10 us of host time (a launch on CUDA), not work.
    # ``0 < amax < inf`` is ``isfinite(amax) & (amax > 0)`` (NaN compares False), without isfinite's four kernels;
    # ``reciprocal() * target`` is exactly what ``target / amax`` runs (Tensor.__rtruediv__), here computed for every
    # element and replaced below where unusable, instead of dividing a copy with the unusable ones set to 1.
    usable = (amax > 0) & (amax < math.inf)
    scale = (amax.reciprocal() * target).clamp(max=MAX_SCALE)
    if power_of_2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    if prev_scale is not None:
        return torch.where(usable, scale, prev_scale.float().expand_as(scale))
    return torch.where(usable, scale, 1.0)


def _ulp(y_abs: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Spacing of ``fmt``'s grid at magnitude ``y_abs`` (subnormal spacing below ``min_normal``)."""
    _, exponent = torch.frexp(torch.clamp(y_abs, min=fmt.min_normal))  # y = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(y_abs), exponent - 1 - fmt.mantissa_bits)


def round_stochastic(
    y: torch.Tensor, fmt: Format | str, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Round float32 ``y`` onto ``fmt``'s grid stochastically: up with probability equal to the distance fraction.

    Unbiased, ``E[round(y)] = y``, inside the representable range. Returns float32 values exactly on the grid
    (not saturated; callers clamp). Integer formats use ``floor(y + U[0,1))``. ``noise`` (U[0,1) float32, ``y``'s
    shape) replaces the draw from ``generator``: the optimizer passes counter-based noise so a resumed run
    reproduces the same roundings and the step stays traceable by torch.compile.
    """
    fmt = get_format(fmt)
    if noise is None:
        noise = torch.rand(y.shape, device=y.device, dtype=torch.float32, generator=generator)
    if not fmt.is_float:
        return torch.floor(y + noise)
    magnitude = y.abs()
    ulp = _ulp(magnitude, fmt)
    rounded = torch.floor(magnitude / ulp + noise) * ulp
    return torch.copysign(rounded, y)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format | str,
    granularity: Granularity | str = "tensor",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``saturate(x * scale)`` cast to ``fmt.dtype``; ``x`` keeps its shape.

    ``rounding='nearest'`` is round-to-nearest-even (bit-identical to torch's own conversion of the scaled, clamped
    float32 value); ``'stochastic'`` rounds up with probability proportional to the remainder.
    """
    fmt = get_format(fmt)
    g = Granularity.parse(granularity)
    x2 = as_2d(x)
    factor = expand_scale(scale.float(), x.shape, g)
    # A 16-bit input's FP32 upcast is a fresh copy: scale it in place (one full-size FP32 temporary, not two).
    scaled = x2 * factor if x2.dtype == torch.float32 else x2.float().mul_(factor)
    if rounding == "stochastic":
        scaled = round_stochastic(scaled, fmt, generator)
    elif rounding != "nearest":
        raise ValueError(f"Unknown rounding {rounding!r}; use 'nearest' or 'stochastic'.")
    # In place on this function's own FP32 temporary: one full-size copy fewer (for a 4096x14336 FP32 weight gradient
    # on the GPU, 224 MiB less at the issue-7 anchor's memory peak; bench/memory_peak_breakdown.py). Same values.
    scaled = scaled.clamp_(-fmt.max, fmt.max)
    if not fmt.is_float:
        scaled = torch.nan_to_num_(scaled.round_(), nan=0.0)
    return scaled.to(fmt.dtype).reshape(x.shape)


def dequantize(
    lp: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    granularity: Granularity | str = "tensor",
) -> torch.Tensor:
    """``lp * (1/scale)`` in ``out_dtype`` — the inverse of :func:`quantize` up to rounding."""
    g = Granularity.parse(granularity)
    scale_inv = expand_scale(scale.float().reciprocal(), lp.shape, g)
    return (as_2d(lp).float() * scale_inv).to(out_dtype).reshape(lp.shape)
