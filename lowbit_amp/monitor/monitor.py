"""The numerics monitor of one model: a :class:`LayerProbe` per low-bit linear layer, the optimizer it watches, and
the automatic move of a persistently saturating layer back to high precision.

Attached by ``amp.initialize`` when ``config.monitor`` is true (or by hand with :func:`attach`); when it is off no hook
exists, so it costs nothing. Stored on the model as ``model.lowbit_amp_monitor`` (no global registry).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from lowbit_amp.config import MonitorConfig
from lowbit_amp.monitor.probe import LayerProbe

MONITOR_ATTR = "lowbit_amp_monitor"
logger = logging.getLogger("lowbit_amp.monitor")


class Monitor:
    """See the module docstring. ``events`` lists every automatic fallback (also logged at WARNING)."""

    def __init__(self, model: nn.Module, options: MonitorConfig | None = None) -> None:
        from lowbit_amp.nn.linear import LowBitLinear

        self.model = model
        self.options = options or MonitorConfig()
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps: int | None = None
        self.events: list[dict[str, Any]] = []
        self._step_handle: Any = None
        self.probes: dict[str, LayerProbe] = {}
        for name, module in model.named_modules():
            if isinstance(module, LowBitLinear) and module.lb_config.compute in ("fp8", "int8"):
                self.probes[name] = LayerProbe(name, module, self.options, self._step, self._on_streak)
        if not self.probes:
            raise ValueError("The numerics monitor found no FP8/INT8 LowBitLinear layer in this model; attach it after "
                             "amp.initialize at a low-bit opt level (O1 or above, or 'int8').")

    def _step(self) -> int | None:
        return self.steps

    def watch_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Count optimizer steps (records carry the step) and read its state tensors in the report."""
        if self._step_handle is not None:
            self._step_handle.remove()
            self._step_handle = None
        self.optimizer = optimizer
        if optimizer is None:
            return
        self.steps = 0

        def count(_opt: Any, _args: Any, _kwargs: Any) -> None:
            self.steps = (self.steps or 0) + 1

        self._step_handle = optimizer.register_step_post_hook(count)

    def _on_streak(self, probe: LayerProbe, operand: str, streak: int) -> None:
        opts = self.options
        if not opts.auto_fallback or streak < opts.fallback_after or probe.moved_to_hp is not None:
            return
        self.move_to_high_precision(probe, f"{operand} saturated above {opts.saturation_threshold:g} of its values "
                                           f"in {streak} consecutive samples")

    def move_to_high_precision(self, probe: LayerProbe, reason: str) -> None:
        """Run ``probe``'s layer in high precision from its next call on (its scaling buffers stay, so checkpoints
        keep their keys); logged and recorded in ``events`` and in the conversion report."""
        layer = probe.layer
        layer.lb_config = dataclasses.replace(layer.lb_config, compute="hp", weight_grad="hp")
        layer._weight_cache = None
        event = {"layer": probe.name, "call": probe.calls, "step": self.steps, "reason": reason}
        probe.moved_to_hp = event
        self.events.append(event)
        logger.warning("lowbit_amp monitor: moved layer %r to high precision at call %d (step %s): %s",
                       probe.name, probe.calls, self.steps, reason)
        state = getattr(self.model, "lowbit_amp_state", None)
        if state is not None:
            for decision in state.report.decisions:
                if decision.name == probe.name:
                    decision.converted = False
                    decision.detail = f"moved to high precision by the numerics monitor: {reason}"

    def remove(self) -> None:
        for probe in self.probes.values():
            probe.remove()
        self.watch_optimizer(None)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
           options: MonitorConfig | None = None) -> Monitor:
    """Attach a monitor to ``model`` (after ``amp.initialize``); replaces a previous one."""
    detach(model)
    monitor = Monitor(model, options)
    monitor.watch_optimizer(optimizer)
    setattr(model, MONITOR_ATTR, monitor)
    return monitor


def detach(model: nn.Module) -> None:
    """Remove the monitor's hooks from ``model`` (no-op if none)."""
    monitor = getattr(model, MONITOR_ATTR, None)
    if monitor is not None:
        monitor.remove()
        delattr(model, MONITOR_ATTR)


def get_monitor(model: nn.Module) -> Monitor:
    monitor = getattr(model, MONITOR_ATTR, None)
    if monitor is None:
        raise ValueError("This model has no numerics monitor: pass monitor=True to amp.initialize (or set "
                         "'monitor: true' in the YAML), or call lowbit_amp.monitor.attach(model, optimizer).")
    return monitor
