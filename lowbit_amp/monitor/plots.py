"""Plots of the monitor's report, one PNG per layer: scale, saturated and underflow fractions per operand, and the
sampled SQNRs, against the sample's optimizer step (or call index). Needs matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import pathlib
import re
from typing import Any

from lowbit_amp.monitor.probe import OPERANDS


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Monitor plots need matplotlib, which is not installed. Install the extra: "
                          "pip install 'lowbit-amp[plot]' (or pip install matplotlib), or call save(plots=False) "
                          "for the JSON report alone.") from None
    return plt


def plot_layers(data: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    plt = _pyplot()
    written = []
    for name, layer in data["layers"].items():
        samples = layer["samples"]
        if not samples:
            continue
        xs = [s["step"] if s.get("step") is not None else s["call"] for s in samples]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
        for operand in OPERANDS:
            points = [(x, s[operand]) for x, s in zip(xs, samples) if operand in s]
            if not points:
                continue
            px = [p[0] for p in points]
            axes[0].semilogy(px, [p[1]["scale_max"] for p in points], label=operand)
            axes[1].plot(px, [100 * p[1]["saturated"] for p in points], label=operand)
            axes[2].plot(px, [100 * p[1]["underflow"] for p in points], label=operand)
        for key in ("output_sqnr_db", "grad_input_sqnr_db"):
            points = [(x, s[key]) for x, s in zip(xs, samples) if key in s]
            if points:
                axes[3].plot([p[0] for p in points], [p[1] for p in points], marker=".", label=key.replace("_db", ""))
        for ax, title in zip(axes, ("scale", "saturated %", "underflow %", "SQNR dB vs float64")):
            ax.set_title(title)
            ax.set_xlabel("step" if samples[0].get("step") is not None else "call")
            if ax.lines:
                ax.legend(fontsize=7)
        title = name + (" (moved to high precision)" if layer["moved_to_hp"] else "")
        fig.suptitle(title)
        fig.tight_layout()
        path = out / f"monitor_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
