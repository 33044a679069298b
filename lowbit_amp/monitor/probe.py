"""Hooks on one :class:`~lowbit_amp.nn.LowBitLinear`, attached from outside: the layer's code has no monitor branch.

On a *sampled* call (one of every ``options.every`` calls of that layer) the hooks:

* forward pre-hook — count the input and the weight with exactly the scales the layer is about to use
  (``ScalingState.scale_for`` has no side effect, and the layer's own weight cache is left alone);
* forward hook — on SQNR samples, recompute ``x·Wᵀ + b`` in float64 and compare with the layer's output; hang a
  gradient hook on the output;
* output-gradient hook — count the output gradient with the scale the backward is about to use; on SQNR samples
  recompute ``dy·W`` in float64 and compare with the input gradient (caught on a private view of the input, so other
  consumers of the same input do not mix into it).

Unsampled calls cost one Python counter increment per hook. A sampled call costs one extra cast per operand and one
host sync (the counters are read back so the auto-fallback can act at once).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from lowbit_amp.monitor.counters import operand_stats
from lowbit_amp.quant.granularity import amax as block_amax
from lowbit_amp.quant.metrics import sqnr_db

if TYPE_CHECKING:
    from lowbit_amp.config import MonitorConfig
    from lowbit_amp.nn.linear import LowBitLinear

OPERANDS = ("input", "weight", "grad_output")
STATE_OF = {"input": "input_scaling", "weight": "weight_scaling", "grad_output": "grad_output_scaling"}


class LayerProbe:
    """Samples, records and saturation streaks of one layer; ``on_saturation`` is called with each operand's verdict."""

    def __init__(self, name: str, layer: "LowBitLinear", options: "MonitorConfig",
                 step_of: Callable[[], int | None], on_streak: Callable[["LayerProbe", str, int], None]) -> None:
        self.name = name
        self.layer = layer
        self.options = options
        self.step_of = step_of
        self.on_streak = on_streak
        self.calls = 0
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=options.max_records)
        self.streaks = {op: 0 for op in OPERANDS}
        self.moved_to_hp: dict[str, Any] | None = None
        self._current: dict[str, Any] | None = None
        self._handles = [
            layer.register_forward_pre_hook(self._pre_forward),
            layer.register_forward_hook(self._post_forward),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---------------------------------------------------------------------------------------------------- sampling
    @property
    def compute(self) -> str:
        return self.layer.lb_config.compute

    def _record_operand(self, record: dict[str, Any], operand: str, stats: dict[str, float]) -> None:
        record[operand] = stats
        if stats["saturated"] > self.options.saturation_threshold:
            self.streaks[operand] += 1
        else:
            self.streaks[operand] = 0
        self.on_streak(self, operand, self.streaks[operand])

    def _pre_forward(self, layer: "LowBitLinear", args: tuple) -> tuple | None:
        index = self.calls
        self.calls += 1
        self._current = None
        if self.compute not in ("fp8", "int8") or index % self.options.every:
            return None
        record: dict[str, Any] = {"call": index, "step": self.step_of()}
        want_sqnr = self.options.sqnr_every > 0 and index % self.options.sqnr_every == 0
        x = args[0]
        self._current = {"record": record, "sqnr": want_sqnr, "x": x}
        self.records.append(record)
        if self.compute == "fp8":
            with torch.no_grad():
                x2d = x.detach().reshape(-1, x.shape[-1])
                state = layer.input_scaling
                scale = state.scale_for(block_amax(x2d, state.granularity))
                self._record_operand(record, "input", operand_stats(x2d, scale, state.fmt, state.granularity).to_host())
                weight = layer.weight.detach()
                wstate = layer.weight_scaling
                w_scale = wstate.scale_for(block_amax(weight, wstate.granularity))
                self._record_operand(record, "weight",
                                     operand_stats(weight, w_scale, wstate.fmt, wstate.granularity).to_host())
        if want_sqnr and x.requires_grad and torch.is_grad_enabled():
            # A private view: its gradient is this layer's dx alone, whatever else consumes x.
            view = x.view_as(x)
            self._current.update(x=view, private_view=True)
            return (view, *args[1:])
        return None

    def _post_forward(self, layer: "LowBitLinear", args: tuple, output: torch.Tensor) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        record = current["record"]
        x = current["x"]
        if self.compute == "int8" and hasattr(layer, "fallback_fraction"):
            record["fallback_fraction"] = float(layer.fallback_fraction)
        if current["sqnr"]:
            with torch.no_grad():
                bias = layer.bias.double() if layer.bias is not None else None
                reference = F.linear(x.detach().double(), layer.weight.detach().double(), bias)
                record["output_sqnr_db"] = sqnr_db(reference, output)
        if not (output.requires_grad and torch.is_grad_enabled()):
            return
        grad_state: dict[str, torch.Tensor] = {}

        def on_grad_output(dy: torch.Tensor) -> None:
            if self.compute == "fp8":
                with torch.no_grad():
                    dy2d = dy.detach().reshape(-1, dy.shape[-1])
                    state = layer.grad_output_scaling
                    scale = state.scale_for(block_amax(dy2d, state.granularity))
                    stats = operand_stats(dy2d, scale, state.fmt, state.granularity).to_host()
                self._record_operand(record, "grad_output", stats)
            if current["sqnr"]:
                grad_state["dy"] = dy.detach()

        def on_grad_input(dx: torch.Tensor) -> None:
            dy = grad_state.pop("dy", None)
            if dy is None:
                return
            with torch.no_grad():
                reference = dy.double() @ layer.weight.detach().double()
                record["grad_input_sqnr_db"] = sqnr_db(reference, dx)

        output.register_hook(on_grad_output)
        if current.get("private_view"):
            x.register_hook(on_grad_input)
