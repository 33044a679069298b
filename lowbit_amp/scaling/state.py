"""The scaling state of one GEMM operand (input, weight or output gradient of one layer).

It lives in module buffers, so ``model.state_dict()`` saves it and ``load_state_dict`` restores the exact next-step
scales. Three algorithms (``ScalingConfig.algo``):

* ``delayed`` — cast with the scale derived from the amax history of *earlier* steps; this step's amax is recorded into
  ``pending_amax`` (max over micro-batches) and folded into the history by :meth:`ScalingState.update` once per
  optimizer step. One pass over the data and no host sync; the price is a one-step lag that ``margin`` and the history
  window absorb.
* ``current`` — just-in-time: the scale comes from this tensor's own amax (row/block granularities always use it).
* ``static`` — a fixed scale (unit-scaled models need none).

Before the history holds any finite, non-zero amax (the first step, or a layer not used yet), delayed scaling
falls back to current scaling, so the first steps never cast with an arbitrary scale. A non-finite amax is counted in
``nonfinite_count`` and never enters the history.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit_amp.config import ScalingConfig
from lowbit_amp.formats import Format, get_format
from lowbit_amp.quant.cast import compute_scale
from lowbit_amp.quant.granularity import Granularity


class ScalingState(nn.Module):
    """Per-operand scaling buffers and the scale formula applied to them.

    Buffers: ``amax_history (L,)`` (index 0 = most recent step), ``scale ()``, ``pending_amax ()`` (this step so far),
    ``has_history ()`` (bool), ``nonfinite_count ()``.
    """

    def __init__(self, config: ScalingConfig, fmt: Format | str, rounding: str = "nearest") -> None:
        super().__init__()
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"Unknown rounding {rounding!r}; use 'nearest' or 'stochastic'.")
        self.config = config
        self.fmt = get_format(fmt)
        self.rounding = rounding  # how this operand's casts round (OperandConfig.rounding)
        self.granularity = Granularity.parse(config.granularity)
        initial = config.static_scale if config.algo == "static" else 1.0
        self.register_buffer("amax_history", torch.zeros(config.history_len))
        self.register_buffer("scale", torch.tensor(float(initial)))
        self.register_buffer("pending_amax", torch.zeros(()))
        self.register_buffer("has_history", torch.zeros((), dtype=torch.bool))
        self.register_buffer("nonfinite_count", torch.zeros((), dtype=torch.int64))
        # The fused cast kernel's (amax bits, finished programs) words for a one-pass delayed cast: all-zero between
        # launches (the kernel's last program resets them). A buffer, not a per-call allocation, so it moves with the
        # model and a compiled graph reads it as an input instead of launching a zero-fill per cast; not saved.
        self.register_buffer("cast_scratch", torch.zeros(2, dtype=torch.int32), persistent=False)
        # Host-side mirror of ``has_history`` so the hot path never syncs; set by the manager / on load.
        self._warm = False

    @property
    def delayed(self) -> bool:
        return self.config.algo == "delayed"

    def scale_for(self, amax: torch.Tensor | None) -> torch.Tensor:
        """The scale to cast with now. ``amax`` is this tensor's amax (may be None only for warm delayed/static)."""
        if self.config.algo == "static" or (self.delayed and self._warm):
            return self.scale
        assert amax is not None, "current scaling needs the tensor's amax"
        return compute_scale(amax, self.fmt, self.config.margin, self.config.power_of_2)

    def record(self, amax: torch.Tensor) -> None:
        """Fold a tensorwise amax into this step's pending maximum (delayed scaling only); no host sync."""
        if not self.delayed:
            return
        amax = amax.detach().float()
        # Five ops where it was eleven (it runs per delayed cast on the reference path): isfinite() as one comparison
        # of |amax| (NaN compares False), the bool added to the int64 counter directly, a scalar 0 for where().
        finite = amax.abs() < math.inf
        self.nonfinite_count.add_(~finite)
        torch.maximum(self.pending_amax, torch.where(finite, amax, 0.0), out=self.pending_amax)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._warm = bool(self.has_history)

    def extra_repr(self) -> str:
        return f"{self.fmt}/{self.config.describe()}" + ("/SR" if self.rounding == "stochastic" else "")


def roll_histories(
    histories: torch.Tensor, pending: torch.Tensor, prev_scale: torch.Tensor, has_history: torch.Tensor,
    config: ScalingConfig, fmt: Format,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched delayed-scaling update for ``n`` states that share a config: ``histories (n, L)``, the rest ``(n,)``.

    Returns the new histories, scales and has-history flags. A state with no new amax this step (``pending == 0``,
    e.g. a layer not called) keeps its history and scale unchanged rather than pushing a zero.
    """
    seen = pending > 0
    rolled = torch.cat([pending.unsqueeze(1), histories[:, :-1]], dim=1)
    new_hist = torch.where(seen.unsqueeze(1), rolled, histories)
    if config.amax_compute == "max":
        amax = new_hist.amax(dim=1)
    else:
        amax = new_hist[:, 0]
    scale = compute_scale(amax, fmt, config.margin, config.power_of_2, prev_scale=prev_scale)
    return new_hist, scale, has_history | seen
