"""The monitor's report: a plain-data snapshot (JSON-ready), a summary table, and files on disk (JSON + plots).

Which layer is in trouble, at a glance: the table has one line per layer and operand with the last amax and scale,
the saturated fraction (last sample and worst sample), the underflow fraction (last and mean), and the SQNRs of the
last float64 recomputation; INT8 layers show their fallback fraction; a layer the monitor moved to high precision says
so. Optimizer state tensors with many zeros follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import torch
from torch import nn

from lowbit_amp.monitor.monitor import Monitor, get_monitor
from lowbit_amp.monitor.optimizer_state import optimizer_state_stats
from lowbit_amp.monitor.probe import OPERANDS, STATE_OF, LayerProbe

REPORT_FILE = "monitor_report.json"


def _scaling_snapshot(probe: LayerProbe) -> dict[str, Any]:
    out = {}
    for operand in OPERANDS:
        state = getattr(probe.layer, STATE_OF[operand], None)
        if state is None:
            continue
        out[operand] = {
            "format": str(state.fmt),
            "scaling": state.config.describe(),
            "scale": float(state.scale),
            "amax_history": [float(v) for v in state.amax_history.cpu()],
            "nonfinite_count": int(state.nonfinite_count),
        }
    return out


def _layer_snapshot(probe: LayerProbe) -> dict[str, Any]:
    return {
        "compute": probe.layer.lb_config.compute,
        "calls": probe.calls,
        "moved_to_hp": probe.moved_to_hp,
        "scaling": _scaling_snapshot(probe),
        "samples": [dict(r) for r in probe.records],
    }


class MonitorReport:
    """A snapshot of the monitor; ``str()`` is the summary table, :meth:`save` writes it to disk."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    # ---------------------------------------------------------------------------------------------------- table
    def __str__(self) -> str:
        header = ("layer", "operand", "fmt/scaling", "samples", "amax", "scale", "sat% last/max", "under% last/mean",
                  "SQNR dB")
        rows: list[tuple[str, ...]] = []
        for name, layer in self.data["layers"].items():
            samples = layer["samples"]
            note = " (moved to hp)" if layer["moved_to_hp"] else ""
            for operand in OPERANDS:
                series = [s[operand] for s in samples if operand in s]
                if not series:
                    continue
                last = series[-1]
                sat = f"{100 * last['saturated']:.3g}/{100 * max(s['saturated'] for s in series):.3g}"
                under = f"{100 * last['underflow']:.3g}/{100 * sum(s['underflow'] for s in series) / len(series):.3g}"
                scaling = layer["scaling"].get(operand, {})
                fmt = f"{scaling.get('format', '?')}/{scaling.get('scaling', '?')}"
                scale = (f"{last['scale_min']:.3g}" if last["scale_min"] == last["scale_max"]
                         else f"{last['scale_min']:.3g}..{last['scale_max']:.3g}")
                rows.append((name + note, operand, fmt, str(len(series)), f"{last['amax']:.4g}", scale, sat, under, ""))
            for key, label in (("output_sqnr_db", "output (fwd GEMM)"), ("grad_input_sqnr_db", "grad_input (bwd)")):
                series = [s[key] for s in samples if key in s]
                if series:
                    rows.append((name + note, label, "", str(len(series)), "", "", "", "", f"{series[-1]:.1f}"))
            fallback = [s["fallback_fraction"] for s in samples if "fallback_fraction" in s]
            if fallback:
                rows.append((name + note, "int8 fallback", "", str(len(fallback)), "", "",
                             f"last {100 * fallback[-1]:.3g}%", f"mean {100 * sum(fallback) / len(fallback):.3g}%", ""))
        lines = [_format_table(header, rows)]
        opt_rows = [r for r in self.data.get("optimizer_state", []) if r["zero_fraction"] > 0 or r["low_bit"]]
        if opt_rows:
            lines.append("")
            lines.append(_format_table(("param", "state", "dtype", "numel", "zero%"),
                                       [(r["param"], r["state"], r["dtype"], str(r["numel"]),
                                         f"{100 * r['zero_fraction']:.3g}") for r in opt_rows]))
        for event in self.data["events"]:
            lines.append(f"moved {event['layer']} to high precision at call {event['call']} "
                         f"(step {event['step']}): {event['reason']}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------------- files
    def to_json(self) -> str:
        return json.dumps(self.data, indent=1, default=_json_default, allow_nan=True)

    def save(self, directory: str | os.PathLike, plots: bool = False) -> list[pathlib.Path]:
        """Write ``monitor_report.json`` (and with ``plots=True`` one PNG per layer, needs the ``plot`` extra) into
        ``directory``; returns the written paths."""
        out = pathlib.Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / REPORT_FILE
        path.write_text(self.to_json())
        written = [path]
        if plots:
            from lowbit_amp.monitor.plots import plot_layers

            written += plot_layers(self.data, out)
        return written


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MonitorReport:
    """Snapshot ``model``'s monitor (``print`` it for the table; ``.save(dir)`` for JSON and plots).

    ``optimizer`` defaults to the one the monitor watches; its state tensors' zero fractions are included.
    """
    monitor: Monitor = get_monitor(model)
    optimizer = optimizer if optimizer is not None else monitor.optimizer
    data = {
        "options": dataclasses.asdict(monitor.options),
        "optimizer_steps": monitor.steps,
        "layers": {name: _layer_snapshot(probe) for name, probe in monitor.probes.items()},
        "optimizer_state": optimizer_state_stats(optimizer, model) if optimizer is not None else [],
        "events": list(monitor.events),
    }
    return MonitorReport(data)
