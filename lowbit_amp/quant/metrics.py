"""Error metrics against a high-precision reference, used by the tests, the benchmarks and the numerics monitor.

Both are computed in float64 (on the reference's device: a GPU result is compared with a CPU float64 reference) so
that the metric's own rounding never shows up in a stated tolerance.
"""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference`` in dB (``inf`` when identical)."""
    ref = reference.detach().double()
    noise = (approx.detach().to(ref.device).double() - ref).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def rel_err(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖approx - reference‖ / ‖reference‖`` (Frobenius), in float64."""
    ref = reference.detach().double()
    return float((approx.detach().to(ref.device).double() - ref).norm() / ref.norm().clamp_min(1e-300))
