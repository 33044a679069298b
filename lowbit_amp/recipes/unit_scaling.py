"""Unit scaling (Blake et al., arXiv 2303.11257): make every linear layer's inputs, outputs and gradients ~unit RMS at
initialisation, so FP8 casts work with a fixed scale of 1 — no amax, no history, no loss scaling.

How (our reading of the paper, not its code): weights are initialised N(0, 1), and each ``y = x·Wᵀ`` gets separate
scales for its forward and its two backward paths, chosen so each output is unit when its inputs are:

* forward  ``y  = x·Wᵀ / sqrt(fan_in)``            (a sum of ``fan_in`` unit products has RMS ``sqrt(fan_in)``)
* backward ``dx = (dy·W) / sqrt(fan_out)``         (a sum over ``fan_out``)
* backward ``dW = (dyᵀ·x) / sqrt(batch_tokens)``   (a sum over the tokens of the batch)

So gradients are no longer the exact gradient of the loss: each is the true gradient times a per-tensor constant.
The paper argues (and we rely on) this being harmless for Adam-style optimizers, which are invariant to a constant
gradient scale per parameter tensor; with SGD it amounts to a per-tensor learning rate. ``constrain=True`` instead
uses the geometric mean ``(fan_in·fan_out)**-1/4`` for both the forward and the input-gradient scale (the paper's
constraint for edges that are not cut), which keeps ``dx`` the exact gradient up to one global factor per layer at the
price of outputs only roughly unit when ``fan_in != fan_out``.

The scales are applied by hooks on the (already converted) layers, outside the GEMMs: :func:`unit_scale` must run
*after* ``amp.initialize`` (which replaces the layer objects) — the config section ``unit_scaling: {enabled: true}``
(``configs/unit_scaled_O1.yaml``) makes ``amp.initialize`` do it, and :func:`initialize` sets that section with static
FP8 scaling.
The loss needs the same care: :func:`unit_scaled_cross_entropy` scales its gradient to unit RMS.

Not covered (see docs/recipes.md): the paper's unit-scaled residual adds, attention and non-linearities; their RMS
still shows up in :func:`unit_scaling_report` because it measures the linear layers' actual inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

UNIT_ATTR = "lowbit_amp_unit_scaling"


class _ScaleForward(torch.autograd.Function):
    """``x * alpha`` forward; the gradient passes through unscaled."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        return x * alpha

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class _ScaleBackward(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``beta``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, beta: float) -> torch.Tensor:  # type: ignore[override]
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.beta, None


def scale_forward(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return _ScaleForward.apply(x, alpha)


def scale_grad(x: torch.Tensor, beta: float) -> torch.Tensor:
    return _ScaleBackward.apply(x, beta)


@dataclass
class _LayerScales:
    forward: float
    grad_input: float
    scale_weight_grad: bool
    tokens: int = 1
    handles: list = field(default_factory=list)


def _install(layer: nn.Linear, scales: _LayerScales) -> None:
    def pre(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        scales.tokens = max(1, x.numel() // x.shape[-1])
        return (scale_grad(x, scales.grad_input), *args[1:])

    def post(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return scale_forward(output, scales.forward)

    def weight_grad(grad: torch.Tensor) -> torch.Tensor:
        if type(grad) is not torch.Tensor:
            raise TypeError(f"unit scaling cannot rescale a {type(grad).__name__} weight gradient (the FP8 weight "
                            "gradients of O2+); call unit_scale(..., scale_weight_grad=False) with those levels.")
        return grad * (1.0 / math.sqrt(scales.tokens))

    scales.handles = [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    if scales.scale_weight_grad:
        scales.handles.append(layer.weight.register_hook(weight_grad))


def unit_scale(model: nn.Module, reinit: bool = True, constrain: bool = False,
               scale_weight_grad: bool = True) -> list[str]:
    """Make every ``nn.Linear`` of ``model`` (``LowBitLinear`` included) unit-scaled; returns their names.

    ``reinit``: draw weights from N(0, 1) and zero the biases (unit scaling needs unit-variance weights; keep False
    only for weights that already are). Call after ``amp.initialize``. Calling it twice raises.
    """
    if getattr(model, UNIT_ATTR, None):
        raise ValueError("unit_scale was already applied to this model; applying it twice would scale twice.")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        fan_in, fan_out = module.in_features, module.out_features
        if constrain:
            forward = grad_input = (fan_in * fan_out) ** -0.25
        else:
            forward, grad_input = fan_in**-0.5, fan_out**-0.5
        if reinit:
            with torch.no_grad():
                module.weight.normal_()
                if module.bias is not None:
                    module.bias.zero_()
        _install(module, _LayerScales(forward, grad_input, scale_weight_grad))
        names.append(name)
    if not names:
        raise ValueError("unit_scale found no nn.Linear layer in this model.")
    setattr(model, UNIT_ATTR, names)
    return names


def static_fp8_overrides(static_scale: float = 1.0, constrain: bool = False) -> dict[str, Any]:
    """Config overrides for unit scaling: every operand cast with a fixed scale, no loss scaling, and the
    ``unit_scaling`` section on (``amp.initialize`` then calls :func:`unit_scale` itself)."""
    static = {"scaling": {"algo": "static", "static_scale": static_scale}}
    return {"linear": {"input": static, "weight": static, "grad_output": static}, "loss_scaling": {"mode": "none"},
            "unit_scaling": {"enabled": True, "constrain": constrain}}


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, opt_level: Any = "O1",
               constrain: bool = False, **overrides: Any) -> Any:
    """``amp.initialize`` at ``opt_level`` with :func:`static_fp8_overrides` applied (static FP8 scales and the
    ``unit_scaling`` config section, which makes ``amp.initialize`` call :func:`unit_scale`).

    The same as ``amp.initialize(model, opt, "configs/unit_scaled_O1.yaml")`` for O1. Keyword ``overrides`` apply on
    top. Returns what ``amp.initialize`` returns. At O2+ the FP8 weight gradients are not rescaled.
    """
    from lowbit_amp.config import apply_overrides
    from lowbit_amp.initialize import initialize as amp_initialize
    from lowbit_amp.levels import resolve_config

    config = apply_overrides(resolve_config(opt_level), static_fp8_overrides(constrain=constrain))
    return amp_initialize(model, optimizer, config, **overrides)


def unit_scaled_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` (mean) whose gradient w.r.t. ``logits`` is scaled to ~unit RMS.

    The mean cross-entropy's gradient is ``(softmax - onehot) / B``, RMS about ``1 / (B·sqrt(V))`` for ``B`` rows of
    ``V`` classes near initialisation; it is multiplied by ``B·sqrt(V)``. The loss value is unchanged.
    """
    rows = max(1, logits.numel() // logits.shape[-1])
    return F.cross_entropy(scale_grad(logits, rows * math.sqrt(logits.shape[-1])).reshape(rows, -1),
                           target.reshape(-1))


# ---------------------------------------------------------------------------------------------------------- report
@dataclass
class OpRms:
    name: str
    input: float
    output: float
    grad_output: float = float("nan")
    grad_input: float = float("nan")
    grad_weight: float = float("nan")

    def values(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("input", "output", "grad_output", "grad_input", "grad_weight")}


@dataclass
class UnitScalingReport:
    """Per linear layer, the RMS of its input, output and the three gradients at one forward/backward."""

    ops: list[OpRms]

    def outside(self, low: float = 0.3, high: float = 3.0) -> list[tuple[str, str, float]]:
        """``(layer, tensor, rms)`` for every measured RMS outside ``[low, high]``."""
        return [(op.name, key, value) for op in self.ops for key, value in op.values().items()
                if not math.isnan(value) and not low <= value <= high]

    def __str__(self) -> str:
        width = max(len(op.name) for op in self.ops)
        head = f"{'layer':<{width}}  {'x':>7} {'y':>7} {'dy':>7} {'dx':>7} {'dW':>7}"
        rows = [f"{op.name:<{width}}  " + " ".join(f"{v:7.3f}" for v in op.values().values()) for op in self.ops]
        return "\n".join([head, *rows])


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def unit_scaling_report(model: nn.Module, sample_input: Any,
                        output_fn: Callable[[Any], torch.Tensor] | None = None) -> UnitScalingReport:
    """Run ``model(sample_input)`` forward and backward once and report each linear layer's RMSs.

    The backward is seeded with a unit-normal cotangent on the output (``output_fn`` picks the tensor from a
    structured output), i.e. it measures the scaling of the model itself, independent of any loss. Existing ``.grad``
    values of the parameters are restored afterwards.
    """
    ops: dict[str, OpRms] = {}
    handles: list[Any] = []
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not layers:
        raise ValueError("unit_scaling_report found no nn.Linear layer in this model.")
    saved_grads = {p: p.grad for p in model.parameters()}
    for p in saved_grads:
        p.grad = None

    for name, layer in layers.items():
        def pre(_m: nn.Module, args: tuple, name: str = name) -> tuple | None:
            x = args[0]
            ops[name] = OpRms(name, _rms(x), float("nan"))
            if not x.requires_grad:
                return None
            view = x.view_as(x)
            view.register_hook(lambda g, name=name: setattr(ops[name], "grad_input", _rms(g)))
            return (view, *args[1:])

        def post(_m: nn.Module, _args: tuple, out: torch.Tensor, name: str = name) -> None:
            ops[name].output = _rms(out)
            if out.requires_grad:
                out.register_hook(lambda g, name=name: setattr(ops[name], "grad_output", _rms(g)))

        handles.append(layer.register_forward_pre_hook(pre, prepend=True))
        handles.append(layer.register_forward_hook(post))
        handles.append(layer.weight.register_hook(lambda g, name=name: setattr(ops[name], "grad_weight", _rms(g))))
    try:
        out = model(sample_input)
        out = output_fn(out) if output_fn is not None else out
        out.backward(torch.randn_like(out))
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in saved_grads.items():
            p.grad = grad
    return UnitScalingReport([ops[name] for name in layers if name in ops])
