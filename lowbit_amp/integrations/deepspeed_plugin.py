"""DeepSpeed plugin: a ``"lowbit_amp"`` section in the DeepSpeed config turns lowbit_amp on.

The call the user writes is a drop-in for ``deepspeed.initialize`` with the same arguments and return value::

    from lowbit_amp.integrations.deepspeed_plugin import initialize
    engine, optimizer, dataloader, scheduler = initialize(model=model, optimizer=torch.optim.AdamW(...),
                                                          config="ds_config.json")

    # ds_config.json
    {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
     "lowbit_amp": {"enabled": true, "opt_level": "O3", "linear": {"weight_grad": "e5m2"}}}
    # or "lowbit_amp": {"enabled": true, "config": "configs/O3.yaml"}   (a lowbit_amp YAML; other keys override it)

It pops the section (DeepSpeed never sees it), runs ``amp.initialize(model, optimizer, ...)`` and hands the swapped
model and the (rebuilt) optimizer to the real ``deepspeed.initialize`` — DeepSpeed's documented entry point with a
client optimizer is the only extension point used; nothing in DeepSpeed is patched or copied.

What is 8-bit where (``engine.lowbit_amp`` holds the same as a :class:`PluginStatus`):

=========  ===========  ===========================  ==========================================================
ZeRO       FP8 GEMMs    8-bit optimizer states       gradient reduction
=========  ===========  ===========================  ==========================================================
0          yes (O1+)    yes (O2/O3 client optimizer)  FP8 on the wire when ``comm.grad_reduce='fp8'``: DeepSpeed's
                                                      all-reduce is switched off (``engine.enable_backward_allreduce
                                                      = False``, a public engine attribute) and a step pre-hook on the
                                                      optimizer runs :func:`fp8_all_reduce_` over all gradients
1, 2       yes          yes: DeepSpeed's ZeRO wraps   DeepSpeed's own reduce(-scatter) in ``communication_data_type``
                        the client optimizer, which   (fp32/bf16/fp16): DeepSpeed has no public hook to replace it.
                        steps on the flat partitions  A warning says so when the config asks for FP8.
3          yes          not tested                    DeepSpeed's own
=========  ===========  ===========================  ==========================================================

Amax synchronisation: the scaling manager runs from the optimizer's step post-hook on every rank (one MAX all-reduce),
so it works under every stage.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
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


def _install_fp8_grad_reduce(optimizer: torch.optim.Optimizer, group: object | None = None) -> None:
    """Step pre-hook: FP8 all-reduce (mean) of every gradient, one shared scale per parameter, one flat buffer."""
    from lowbit_amp.distributed.fp8_allreduce import fp8_all_reduce_

    def reduce_grads(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.detach().float().reshape(-1) for p in params])
        fp8_all_reduce_(flat, group, segments=[p.numel() for p in params])
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(piece.view_as(p.grad))

    optimizer.register_step_pre_hook(reduce_grads)


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
    if fp8_reduce and float(ds_config.get("gradient_clipping", 0.0)) > 0:
        raise ConfigError(
            "comm.grad_reduce='fp8' at ZeRO stage 0 reduces gradients inside optimizer.step(), after DeepSpeed's "
            "gradient clipping, which would then clip un-reduced gradients. Remove 'gradient_clipping' or set "
            "lowbit_amp comm.grad_reduce='hp'."
        )
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
    if optimizer is not None and stage > 0:
        # ZeRO accepts only DeepSpeed's own optimizer classes unless told otherwise; the 8-bit optimizer (or the
        # user's client optimizer) is a per-parameter torch optimizer, which is what ZeRO 1/2 step on partitions.
        ds_config.setdefault("zero_allow_untested_optimizer", True)
    if fp8_reduce:
        if optimizer is None:
            raise ConfigError("comm.grad_reduce='fp8' needs a client optimizer (optimizer=...).")
        _install_fp8_grad_reduce(optimizer)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                        config=ds_config, **kwargs)
    if fp8_reduce:
        engine.enable_backward_allreduce = False  # the optimizer's pre-hook reduces in FP8 instead
    engine.lowbit_amp = PluginStatus(lb_config, stage, lb_config.linear.compute != "hp", needs_lowbit_opt, fp8_reduce)
    return engine, ds_optimizer, dataloader, scheduler
