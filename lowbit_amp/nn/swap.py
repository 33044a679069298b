"""Replace eligible ``nn.Linear`` layers by :class:`LowBitLinear`, applying per-module overrides, with a report.

Every linear layer gets a line in the report: converted (with its formats) or kept, and why. ``print(report)`` is the
summary users read to see what lowbit_amp did to their model.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit_amp.config import ConfigError, LinearConfig, LowBitConfig, apply_overrides
from lowbit_amp.nn.linear import LowBitLinear
from lowbit_amp.nn.shape_policy import resolve_min_gemm_size, skip_reason


class NoEligibleLayersError(ValueError):
    """The model has no ``nn.Linear`` layer that lowbit_amp could convert."""


@dataclass
class LayerDecision:
    name: str
    shape: tuple[int, int]
    converted: bool
    detail: str


@dataclass
class ConversionReport:
    decisions: list[LayerDecision] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.decisions if d.converted]

    @property
    def kept(self) -> list[str]:
        return [d.name for d in self.decisions if not d.converted]

    def __str__(self) -> str:
        lines = [f"lowbit_amp: {len(self.converted)} of {len(self.decisions)} linear layers converted"]
        width = max((len(d.name) for d in self.decisions), default=4)
        for d in self.decisions:
            mark = "low-bit" if d.converted else "kept   "
            lines.append(f"  {d.name:<{width}}  {d.shape[0]}x{d.shape[1]:<6} {mark}  {d.detail}")
        return "\n".join(lines)


def _layer_config(name: str, config: LowBitConfig) -> LinearConfig:
    linear = config.linear
    for override in config.modules.overrides:
        if re.search(override.pattern, name):
            linear = apply_overrides(linear, override.linear, where=f"modules.overrides[{override.pattern!r}].linear")
    return linear


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def convert_linears(model: nn.Module, config: LowBitConfig) -> ConversionReport:
    """Swap layers in place and return the report; raises :class:`NoEligibleLayersError` if nothing converts."""
    if any(isinstance(m, LowBitLinear) for m in model.modules()):
        raise ConfigError("This model already contains LowBitLinear layers: amp.initialize was called on it twice. "
                          "Call it once, on the original model.")
    report = ConversionReport()
    mha_children = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in candidates:
        shape = (linear.out_features, linear.in_features)
        if name in mha_children:
            report.decisions.append(LayerDecision(name, shape, False, "nn.MultiheadAttention reads this weight directly"))
            continue
        layer_cfg = _layer_config(name, config)
        device = linear.weight.device if linear.weight.device.type != "meta" else torch.device("cpu")
        reason = skip_reason(name, linear, config.modules,
                             resolve_min_gemm_size(config.modules, device, layer_cfg.compute), layer_cfg.compute)
        if reason is not None:
            report.decisions.append(LayerDecision(name, shape, False, reason))
            continue
        new = LowBitLinear.from_linear(linear, layer_cfg)
        new.train(linear.training)
        _set_submodule(model, name, new)
        report.decisions.append(LayerDecision(name, shape, True, new.extra_repr().split(", ", 3)[-1]))
    if not report.converted and report.decisions and all(d.detail.startswith("too small to gain") or
                                                         d.detail.startswith("excluded by pattern")
                                                         for d in report.decisions) and any(
            d.detail.startswith("too small to gain") for d in report.decisions):
        # The shape policy kept every layer because none would gain: the model runs unchanged (never slower), which
        # is what turning lowbit_amp on should mean for small models. Say so instead of failing.
        warnings.warn("lowbit_amp: every eligible linear layer is below modules.min_gemm_size, so the model runs "
                      "unchanged in high precision (set modules.min_gemm_size=0 to force low precision).\n" + str(report),
                      stacklevel=3)
        return report
    if not report.converted:
        detail = "\n".join(f"  {d.name}: {d.detail}" for d in report.decisions) or "  (the model has no nn.Linear)"
        raise NoEligibleLayersError(
            "No nn.Linear layer is eligible for lowbit_amp, so initialize would change nothing:\n" + detail +
            "\nFix: check modules.exclude / modules.alignment / modules.min_gemm_size, or run without lowbit_amp."
        )
    return report
