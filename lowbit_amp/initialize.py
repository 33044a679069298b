"""``amp.initialize``: config → capability check → module swap → optimizer rebuild → step hook.

The user's training loop stays unchanged: scaling histories advance from a post-hook on ``optimizer.step()``, so no
extra call is needed. The returned model is the same object (layers swapped in place, the same Parameter objects).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit_amp.capability import fp8_gemm_supported
from lowbit_amp.config import ConfigError, LossScalingConfig, LowBitConfig
from lowbit_amp.levels import resolve_config
from lowbit_amp.loss_scaler import DynamicLossScaler
from lowbit_amp.nn.shared_input_cast import attach as attach_shared_input_cast
from lowbit_amp.nn.swap import ConversionReport, convert_linears
from lowbit_amp.scaling.manager import ScalingManager

STATE_ATTR = "lowbit_amp_state"


@dataclass
class AmpState:
    """What ``initialize`` did to a model: its config, the conversion report and the scaling manager."""

    config: LowBitConfig
    report: ConversionReport
    manager: ScalingManager


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_capability(config: LowBitConfig, device: torch.device) -> None:
    if config.linear.compute == "fp8":
        ok, reason = fp8_gemm_supported(device)
        if not ok:
            raise ConfigError(f"opt_level {config.opt_level} needs FP8 GEMMs, but {reason}.")
    if config.linear.compute == "int8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 5):
        raise ConfigError("INT8 tensor-core GEMMs need compute capability 7.5+; use opt_level='O0' on this GPU.")


def _loss_scaling(config: LowBitConfig, model: nn.Module) -> LossScalingConfig:
    scaling = config.loss_scaling
    if scaling.mode == "none" and any(p.dtype == torch.float16 for p in model.parameters()):
        # fp16 models underflow without it (apex's default for fp16 too).
        return LossScalingConfig(**{**scaling.__dict__, "mode": "dynamic"})
    return scaling


_FP16_TINY = 2.0**-24  # the smallest fp16 subnormal: a smaller Adam eps is 0 in fp16 arithmetic


def _warn_fp16_adam(optimizer: torch.optim.Optimizer) -> None:
    """Warn when torch's Adam/AdamW will update fp16 parameters in fp16 arithmetic with an eps fp16 cannot hold.

    Measured (CPU, 2026-12-02): an fp16 TinyGPT under ``AdamW(eps=1e-8)`` is NaN after one step, without lowbit_amp
    too — tiny second moments plus an eps that rounds to 0 divide by zero. The fused implementation computes in FP32
    and avoids the NaN (but pure-fp16 weights still lose small updates); lowbit_amp's own optimizer (O3) keeps master
    weights."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("eps", 1.0) >= _FP16_TINY:
            continue
        if any(p.dtype == torch.float16 for p in group["params"]):
            warnings.warn(
                f"{type(optimizer).__name__}(eps={group['eps']}) over float16 parameters: the update runs in fp16, where "
                "this eps is 0, and the first step with a tiny second moment divides by zero (NaN). Keep FP32 or bf16 "
                "parameters (or FP32 master weights), or pass fused=True (FP32 math inside).", stacklevel=3)
            return


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    opt_level: "str | os.PathLike | LowBitConfig | None" = "O1",
    **overrides: Any,
) -> "tuple[nn.Module, torch.optim.Optimizer] | nn.Module":
    """Make ``model`` (and ``optimizer``) train in low precision.

    Args:
        model: the user's model; its ``nn.Linear`` layers are swapped in place.
        optimizer: the user's optimizer over ``model``'s parameters (or None). At O2/O3 it is rebuilt as the low-bit
            optimizer with the same param groups and hyper-parameters; use the returned one.
        opt_level: ``"O0"``–``"O3"``, ``"int8"``, a YAML path, or a :class:`LowBitConfig`.
        **overrides: config overrides applied last, as sections (``linear={"weight_grad": "e5m2"}``) or dotted keys
            passed through ``overrides={"linear.weight_grad": "e5m2"}``. The ``optimizer`` section shares its name
            with the ``optimizer`` argument, so pass it as ``optimizer_config={...}`` (or dotted keys).

    Returns:
        ``(model, optimizer)``, or just ``model`` when ``optimizer`` is None (apex's convention).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"amp.initialize expects an nn.Module as model, got {type(model).__name__}.")
    if isinstance(optimizer, dict):
        raise TypeError(
            "amp.initialize's `optimizer` argument is the torch optimizer; to override the config's optimizer section "
            "pass optimizer_config={...} (or overrides={'optimizer.exp_avg_sq': ...}).")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"amp.initialize expects a torch.optim.Optimizer (or None), got {type(optimizer).__name__}.")
    flat = dict(overrides.pop("overrides", None) or {})
    if "optimizer_config" in overrides:  # the `optimizer` section under a name that does not clash with the argument
        overrides["optimizer"] = overrides.pop("optimizer_config")
    flat.update(overrides)
    config = resolve_config(opt_level, flat)
    _check_capability(config, _model_device(model))
    report = convert_linears(model, config)
    attach_shared_input_cast(model)
    manager = ScalingManager(model, sync_amax=config.comm.sync_amax)
    setattr(model, STATE_ATTR, AmpState(config, report, manager))
    if config.monitor:  # hooks exist only when asked for, so the monitor costs nothing when off
        from lowbit_amp.monitor import attach as attach_monitor

        attach_monitor(model, None, config.monitor_options)
    if config.unit_scaling.enabled:  # re-initialises the linear weights (before the optimizer is rebuilt below)
        from lowbit_amp.recipes.unit_scaling import unit_scale

        unit_scale(model, constrain=config.unit_scaling.constrain, scale_weight_grad=config.linear.weight_grad == "hp")
    if config.activations.storage == "fp8":  # COAT: saved activations in FP8 (docs/recipes.md); off by default
        from lowbit_amp.recipes.fp8_activations import attach as attach_fp8_activations

        attach_fp8_activations(model, config.activations.group_size, config.activations.min_numel,
                               config.activations.attention, config.activations.glu)
    if optimizer is None:
        return model
    if config.optimizer.enabled or config.linear.weight_grad != "hp":
        from lowbit_amp.optim.build import build_optimizer

        optimizer = build_optimizer(optimizer, model, config)
    _warn_fp16_adam(optimizer)
    optimizer.register_step_post_hook(after_step_hook(model, manager))
    optimizer.lowbit_loss_scaler = DynamicLossScaler(_loss_scaling(config, model))  # type: ignore[attr-defined]
    if config.monitor:
        from lowbit_amp.monitor import get_monitor

        get_monitor(model).watch_optimizer(optimizer)
    return model, optimizer


def after_step_hook(model: nn.Module, manager: ScalingManager) -> Callable[..., None]:
    """The optimizer step post-hook: scaling-state update (delayed scaling's history roll) and a fresh FP8 weight cast.

    Why the caches are dropped here and not left to their ``weight._version`` key: torch's ``AdamW(fused=True)``
    (and any kernel writing through a raw pointer) updates the weights in place without bumping ``_version`` — measured:
    O1 with fused AdamW kept multiplying the *initial* FP8 weights, its loss flat at 1.012 for 8 steps while bf16 and
    non-fused O1 fell to 0.80 (H200 and CPU, 2026-12-01). After a step every cached cast is stale whatever the
    optimizer, so dropping them costs nothing; between steps (gradient-accumulation micro-batches) they are reused."""
    from lowbit_amp.nn.linear import LowBitLinear

    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]

    def hook(_optimizer: object, _args: object, _kwargs: object) -> None:
        manager.update()
        for layer in layers:
            layer.invalidate_weight_cache()

    return hook


def amp_state(model: nn.Module) -> AmpState:
    """The :class:`AmpState` ``initialize`` attached to ``model``."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("This model was not passed through amp.initialize; call amp.initialize(model, ...) first.")
    return state


def step_scaling(model: nn.Module) -> None:
    """Advance the delayed-scaling histories by hand (only needed when ``initialize`` got no optimizer)."""
    amp_state(model).manager.update()


def summary(model: nn.Module) -> str:
    """The conversion report — every linear layer, converted or kept, and why — then the model-wide pieces of the
    config (weight gradients, optimizer states, weight copy, activation storage with its last forward's counts, unit
    scaling, loss scaling), so one print shows everything lowbit_amp changed."""
    state = amp_state(model)
    return "\n".join([str(state.report), *_model_wide_lines(model, state.config)])


def _model_wide_lines(model: nn.Module, config: LowBitConfig) -> list[str]:
    lin, opt, act = config.linear, config.optimizer, config.activations
    wgrad = "model dtype" if lin.weight_grad == "hp" else f"{lin.weight_grad} ({lin.weight_grad_rounding} rounding, " \
        f"{lin.weight_grad_gemm} GEMM output)"
    optim = (f"m {opt.exp_avg}, v {opt.exp_avg_sq}, master {opt.master_weights}" if opt.enabled
             else "the user's optimizer, unchanged")
    lines = ["  model-wide:",
             f"    opt level {config.opt_level}; weight gradients: {wgrad}; optimizer states: {optim}",
             f"    FP8 weight copy between forward and backward: {'kept per step' if lin.weight_cache == 'step' else 'none'}"]
    if act.storage == "fp8":
        from lowbit_amp.recipes.fp8_activations import storage_of

        text = (f"    saved activations: FP8, 1x{act.group_size} groups (tensors >= {act.min_numel} elements), attention "
                f"{act.attention}, gated units {act.glu}")
        storage = storage_of(model)
        if storage is not None and storage.stats.packed_tensors:
            st = storage.stats
            text += (f"; last forward: {st.packed_tensors} tensors {st.packed_bytes_in / 2**20:.1f} -> "
                     f"{st.packed_bytes_out / 2**20:.1f} MiB, {st.kept_bytes / 2**20:.1f} MiB kept as they were, "
                     f"{st.glu_fused} gated units fused")
        lines.append(text)
    else:
        lines.append("    saved activations: as the ops save them")
    if config.unit_scaling.enabled:
        lines.append(f"    unit scaling: on (constrain={config.unit_scaling.constrain})")
    lines.append(f"    loss scaling: {config.loss_scaling.mode}")
    return lines
