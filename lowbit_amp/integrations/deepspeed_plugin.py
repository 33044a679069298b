"""DeepSpeed plugin: a ``"lowbit_amp"`` section in the DeepSpeed config turns lowbit_amp on.

The call the user writes is a drop-in for ``deepspeed.initialize`` with the same arguments and return value::

    from lowbit_amp.integrations.deepspeed_plugin import initialize
    engine, optimizer, dataloader, scheduler = initialize(model=model, optimizer=torch.optim.AdamW(...),
                                                          config="ds_config.json")

    # ds_config.json
    {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
     "lowbit_amp": {"enabled": true, "opt_level": "O3", "linear": {"weight_grad": "e5m2"}}}
    # or "lowbit_amp": {"enabled": true, "config": "configs/O3.yaml"}   (a lowbit_amp YAML; other keys override it)

Why not ``deepspeed.initialize`` itself: DeepSpeed (0.19.8 checked) has no public way for a config section to call
into another library — no plugin registry or entry points, unknown top-level keys are accepted and ignored (so the
section given to ``deepspeed.initialize`` directly trains *without* lowbit_amp, silently), and its ``optimizer=``
callable sees only the parameters, after the model is built. So this function pops the section (DeepSpeed never sees
it), runs ``amp.initialize(model, optimizer, ...)`` and hands the swapped model and the (rebuilt) client optimizer to
the real ``deepspeed.initialize``. Public pieces only: the client optimizer, ``engine.enable_backward_allreduce``,
``engine.global_steps``, and torch's optimizer / module / post-accumulate-grad hooks; nothing in DeepSpeed is patched.

What is 8-bit where (``engine.lowbit_amp`` holds the same as a :class:`PluginStatus`; numbers from
``tests/distributed/test_deepspeed.py``, 2 gloo ranks, tiny GPT, 5 steps, docs/distributed.md has the details):

=========  ===========  ==============================  ==============================  ============================
ZeRO       FP8 GEMMs    optimizer states                weight gradients                reduction; gap to DDP
=========  ===========  ==============================  ==============================  ============================
0          yes          8-bit at O3 (client optimizer   ``Fp8Grad`` (1 B/param)         FP8 on the wire with
                        stepped directly)                                               ``comm.grad_reduce='fp8'``
                                                                                        (1.0e-3 vs DDP's FP8 hook),
                                                                                        else DeepSpeed's (7e-5)
1, 2       yes          8-bit at O3 on ZeRO's flat      FP8-rounded values, widened to  DeepSpeed's, in
                        fp32 partition: 4.12 B per      fp32 as DeepSpeed buckets them  ``communication_data_type``
                        held element, 1/N per rank                                      (O1 7e-5, O2 7.7e-4,
                                                                                        O3 1.2e-3)
3          yes (on the  O1 tested (DeepSpeed's          as 1, 2                         DeepSpeed's (O1: 0)
           gathered     partitioned params); the FP8
           weight)      weight cache is full-size per
                        rank between steps
=========  ===========  ==============================  ==============================  ============================

Three fixes live here, each found by comparing against DDP: gradient clipping moved after the ZeRO-0 FP8 reduction
(:func:`_install_fp8_grad_reduce`), FP8 weight caches dropped per DeepSpeed step (:func:`_install_weight_cache_reset`)
and ``Fp8Grad`` widened before ZeRO buckets it (:func:`_install_fp8_grad_widening`).

Amax synchronisation: the scaling manager runs from the optimizer's step post-hook on every rank (one MAX all-reduce),
so it works under every stage.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from lowbit_amp.config import ConfigError, LowBitConfig

__all__ = ["PluginStatus", "SECTION", "initialize", "split_config"]

SECTION = "lowbit_amp"
_SECTION_KEYS = ("enabled", "opt_level", "config")


@dataclass(frozen=True)
class PluginStatus:
    """What the plugin turned on, for logs and tests."""

    config: LowBitConfig
    zero_stage: int
    fp8_gemms: bool
    low_bit_optimizer: bool
    fp8_grad_reduce: bool
    #: ZeRO-0 FP8 reduction: the ``gradient_clipping`` the pre-hook applies after reducing (DeepSpeed is given 0)
    clip_after_reduce: float = 0.0
    #: ZeRO >= 1 with FP8 weight gradients: ``Fp8Grad`` is widened before DeepSpeed buckets it
    fp8_grads_widened: bool = False


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(
            "lowbit_amp's DeepSpeed plugin needs DeepSpeed, which is not installed: `pip install deepspeed` "
            f"(original error: {err})."
        ) from None
    return deepspeed


def _load_ds_config(config: "str | os.PathLike | Mapping[str, Any] | None") -> dict[str, Any]:
    if config is None:
        raise ConfigError("Pass the DeepSpeed config (a dict or a JSON path) as config=...; it holds the 'lowbit_amp' "
                          "section.")
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    try:
        with open(config) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Could not read the DeepSpeed config {os.fspath(config)!r}: {err}") from None


def split_config(ds_config: Mapping[str, Any]) -> tuple[dict[str, Any], LowBitConfig | None]:
    """``(deepspeed_config_without_the_section, lowbit_config_or_None)``; None when absent or ``enabled: false``."""
    from lowbit_amp.levels import resolve_config

    rest = {k: v for k, v in ds_config.items() if k != SECTION}
    section = ds_config.get(SECTION)
    if section is None:
        return rest, None
    if not isinstance(section, Mapping):
        raise ConfigError(f"The DeepSpeed config's {SECTION!r} section must be a mapping, got {section!r}.")
    if not section.get("enabled", True):
        return rest, None
    overrides = {k: v for k, v in section.items() if k not in _SECTION_KEYS}
    base = section.get("config", section.get("opt_level", "O1"))
    if "config" in section and "opt_level" in section:
        overrides["opt_level"] = section["opt_level"]
    return rest, resolve_config(base, overrides)


def _zero_stage(ds_config: Mapping[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _install_fp8_grad_reduce(optimizer: torch.optim.Optimizer, clip: float, group: object | None = None) -> None:
    """Step pre-hook: FP8 all-reduce (mean) of every gradient, one shared scale per parameter, one flat buffer; then
    DeepSpeed's ``gradient_clipping`` on the *reduced* gradients.

    Why the clipping lives here: at ZeRO-0 (fp32) DeepSpeed clips in ``_take_model_step`` right before
    ``optimizer.step()``, i.e. before this hook, so it would clip each rank's *un-reduced* gradient with its local
    norm (ranks then average differently clipped gradients: the ~6e-2 drift from DDP this plugin once had).
    ``initialize`` therefore hands DeepSpeed ``gradient_clipping: 0`` and clips here with the user's value (DeepSpeed's
    default when unset), after the reduction, where DDP users clip too.
    """
    from lowbit_amp.distributed.fp8_allreduce import fp8_all_reduce_

    def reduce_grads(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.detach().float().reshape(-1) for p in params])
        fp8_all_reduce_(flat, group, segments=[p.numel() for p in params])
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(piece.view_as(p.grad))
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)

    optimizer.register_step_pre_hook(reduce_grads)


def _install_weight_cache_reset(engine: Any, model: torch.nn.Module) -> None:
    """Forward pre-hook on the model: when DeepSpeed's public ``engine.global_steps`` has moved since the last forward,
    drop every ``LowBitLinear``'s cached FP8 weight, so the forward casts the new weights.

    Why: the cache is keyed on ``(weight._version, weight.data_ptr())``, which assumes the optimizer updates the
    Parameter in place. ZeRO-1/2 do not: they step the optimizer on flat fp32 partitions and copy the result back into
    the parameters' flat buffer through ``.data`` / all-gather, which bumps neither key — measured: the weight changed
    by 1e-3 while ``_version`` stayed put, so every forward after the first step ran on the FP8 cast of the *initial*
    weights. ZeRO-3 re-gathers parameters into recycled storage, where a reused address could hit the cache as well.
    Keyed on the engine's step counter it works whichever optimizer DeepSpeed steps (client or its own) and keeps the
    "cast once per optimizer step" contract across gradient-accumulation micro-batches.
    """
    from lowbit_amp.nn.linear import LowBitLinear

    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    engine_ref = weakref.ref(engine)  # the engine holds the model; no cycle through the hook
    seen = [engine.global_steps]

    def reset(_module: torch.nn.Module, _inputs: Any) -> None:
        live = engine_ref()
        if live is None or live.global_steps == seen[0]:
            return
        seen[0] = live.global_steps
        for layer in layers:
            layer.invalidate_weight_cache()

    model.register_forward_pre_hook(reset)


def _install_fp8_grad_widening(model: torch.nn.Module) -> int:
    """Post-accumulate-grad hook on every parameter, registered *before* DeepSpeed's own (hooks run in registration
    order): an :class:`~lowbit_amp.grads.Fp8Grad` weight gradient becomes a plain tensor holding the same FP8-rounded
    values, in the parameter's dtype. Returns how many parameters got the hook.

    Why: ZeRO-1/2/3 copy each gradient into a bucket and then rebind ``grad.data`` to the bucket slice, reading the
    reduced values back through ``param.grad``. ``Fp8Grad`` is a wrapper subclass whose values live in ``codes`` and
    ``scale``, so that ``.data`` assignment is silently lost — measured: the optimizer then stepped each rank's
    partition with that rank's *un-averaged* FP8 gradient (errors as large as the gradient, plain grads exact). The
    bucket is fp32/bf16 anyway, so an 8-bit gradient buys no memory under ZeRO; what stays is its FP8 rounding.
    """
    from lowbit_amp.grads.fp8_grad import Fp8Grad

    def widen(param: torch.Tensor) -> None:
        if isinstance(param.grad, Fp8Grad):
            param.grad = param.grad.dequantize(param.dtype)

    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.register_post_accumulate_grad_hook(widen)
    return len(params)


def _deepspeed_default_clipping() -> float:
    """DeepSpeed's ``gradient_clipping`` when the config leaves it out (1.0 in DeepSpeed 0.19; it was 0 in old ones)."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    return float(GRADIENT_CLIPPING_DEFAULT)


def initialize(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
               config: "str | os.PathLike | Mapping[str, Any] | None" = None, **kwargs: Any) -> tuple:
    """Drop-in for ``deepspeed.initialize(model=..., optimizer=..., config=..., **kwargs)`` (see module docstring).

    Returns DeepSpeed's own ``(engine, optimizer, dataloader, lr_scheduler)``; ``engine.lowbit_amp`` is a
    :class:`PluginStatus`. Without a section (or ``enabled: false``) it is exactly ``deepspeed.initialize``.
    """
    deepspeed = _import_deepspeed()
    from lowbit_amp.initialize import initialize as amp_initialize

    ds_config, lb_config = split_config(_load_ds_config(config))
    if lb_config is None:
        return deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, **kwargs)
    stage = _zero_stage(ds_config)
    needs_lowbit_opt = lb_config.optimizer.enabled or lb_config.linear.weight_grad != "hp"
    if "optimizer" in ds_config and (needs_lowbit_opt or lb_config.comm.grad_reduce == "fp8"):
        raise ConfigError(
            f"opt_level {lb_config.opt_level} rebuilds the optimizer as lowbit_amp's 8-bit optimizer, so it needs a "
            "client optimizer: remove the 'optimizer' section from the DeepSpeed config and pass "
            "optimizer=torch.optim.AdamW(model.parameters(), ...) instead (same hyper-parameters)."
        )
    fp8_reduce = lb_config.comm.grad_reduce == "fp8" and stage == 0
    clip = 0.0
    if fp8_reduce:
        if ds_config.get("fp16", {}).get("enabled") or ds_config.get("bf16", {}).get("enabled"):
            raise ConfigError(
                "comm.grad_reduce='fp8' at ZeRO stage 0 needs DeepSpeed's fp32 engine path: with an 'fp16'/'bf16' "
                "section DeepSpeed wraps the optimizer (loss scaling, overflow check, clipping) before the FP8 "
                "reduction could run. Remove that section (lowbit_amp's FP8 GEMMs already run in low precision), or "
                "use ZeRO stage 1/2 (DeepSpeed reduces in communication_data_type), or set comm.grad_reduce='hp'.")
        clip = float(ds_config.get("gradient_clipping", _deepspeed_default_clipping()))
        ds_config["gradient_clipping"] = 0.0  # the pre-hook clips after reducing (see _install_fp8_grad_reduce)
    if lb_config.comm.grad_reduce == "fp8" and stage > 0:
        warnings.warn(
            f"comm.grad_reduce='fp8' is not available under ZeRO stage {stage}: DeepSpeed reduces gradients itself in "
            "communication_data_type (no public hook replaces it). FP8 GEMMs and 8-bit optimizer states stay on.",
            stacklevel=2,
        )
    if optimizer is not None:
        model, optimizer = amp_initialize(model, optimizer, lb_config)
    else:
        model = amp_initialize(model, None, lb_config)
    widened = stage > 0 and lb_config.linear.weight_grad != "hp"
    if widened:
        _install_fp8_grad_widening(model)
    if optimizer is not None and stage > 0:
        # ZeRO accepts only DeepSpeed's own optimizer classes unless told otherwise; the 8-bit optimizer (or the
        # user's client optimizer) is a per-parameter torch optimizer, which is what ZeRO 1/2 step on partitions.
        ds_config.setdefault("zero_allow_untested_optimizer", True)
    if fp8_reduce:
        if optimizer is None:
            raise ConfigError("comm.grad_reduce='fp8' needs a client optimizer (optimizer=...).")
        _install_fp8_grad_reduce(optimizer, clip)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                        config=ds_config, **kwargs)
    if fp8_reduce:
        if engine.optimizer is not optimizer:
            raise ConfigError(
                f"comm.grad_reduce='fp8' at ZeRO stage 0 needs DeepSpeed to step the client optimizer directly, but it "
                f"wrapped it in {type(engine.optimizer).__name__}; set lowbit_amp comm.grad_reduce='hp' or use "
                "ZeRO 1/2.")
        engine.enable_backward_allreduce = False  # the optimizer's pre-hook reduces in FP8 instead
    if stage > 0:
        _install_weight_cache_reset(engine, model)
    engine.lowbit_amp = PluginStatus(lb_config, stage, lb_config.linear.compute != "hp", needs_lowbit_opt, fp8_reduce,
                                     clip, widened)
    return engine, ds_optimizer, dataloader, scheduler
