"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with lowbit_amp layers.

Order matters, and this is the whole recipe::

    model = amp.initialize(model, opt_level="O1")          # 1. swap layers first (FSDP2 records module objects)
    for block in model.blocks:
        fully_shard(block)                                  # 2. shard (plain FSDP2 API, any mesh / policy)
    fully_shard(model)
    optimizer = lowbit_amp.distributed.fsdp.prepare_optimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-4))

Why: ``fully_shard`` replaces every parameter by a sharded ``DTensor`` Parameter, so an optimizer built before sharding
holds dead tensors, and FSDP2 keeps references to the modules it sharded, so layers must be swapped before it runs.
:func:`prepare_optimizer` does the optimizer half of ``amp.initialize`` on the sharded parameters (rebuild as the
8-bit optimizer at O2/O3, scaling-manager step hook, loss scaler).

What runs in low precision under FSDP2:

* the three GEMMs of every ``LowBitLinear`` (FSDP2 all-gathers the weight before forward; the layer casts the gathered
  weight to FP8 once per version, exactly as on one device);
* scaling states are buffers (replicated, not sharded); the scaling manager's one MAX all-reduce keeps them identical;
* gradients are reduce-scattered by FSDP2 in the parameters' dtype (or ``MixedPrecisionPolicy.reduce_dtype``).

Not done (``comm.weight_all_gather='fp8'``, part of O3): casting the weight shards to FP8 before the all-gather. FSDP2's
extension point for it is a tensor subclass on the sharded parameter implementing ``fsdp_pre_all_gather`` /
``fsdp_post_all_gather`` (what torchao's float8 training does); that subclass must also survive every optimizer and
``DTensor`` op, and it is not written yet. :func:`fully_shard_lowbit` therefore all-gathers in the parameter dtype and
says so with a warning when the config asks for FP8 — it never pretends.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["full_state_dict", "fully_shard_lowbit", "load_full_state_dict", "prepare_optimizer"]


def fully_shard_lowbit(module: nn.Module, root: nn.Module | None = None, **fsdp_kwargs: Any) -> nn.Module:
    """``fully_shard(module, **fsdp_kwargs)`` after checking the lowbit_amp order; warns where O3's FP8 all-gather is
    asked for but not available (see module docstring). ``root`` is the model passed to ``amp.initialize``."""
    from torch.distributed.fsdp import fully_shard

    from lowbit_amp.initialize import amp_state

    config = amp_state(root if root is not None else module).config
    if config.comm.weight_all_gather == "fp8":
        warnings.warn(
            "comm.weight_all_gather='fp8' is not implemented for FSDP2 yet: weights are all-gathered in the parameter "
            "dtype (GEMMs still run in FP8). Set comm.weight_all_gather='hp' to silence this.",
            stacklevel=2,
        )
    return fully_shard(module, **fsdp_kwargs)


def prepare_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer half of ``amp.initialize`` for an optimizer built on FSDP2-sharded parameters.

    At O2/O3 it returns the 8-bit optimizer rebuilt from ``optimizer``'s param groups (use the returned object); it
    always registers the scaling-manager update on ``step()`` and attaches the loss scaler.
    """
    from lowbit_amp.initialize import _loss_scaling, amp_state
    from lowbit_amp.loss_scaler import DynamicLossScaler

    state = amp_state(model)
    config = state.config
    sharded = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in sharded):
        raise ValueError(
            "prepare_optimizer expects an optimizer over FSDP2-sharded (DTensor) parameters: call fully_shard(...) "
            "first, then build the optimizer from model.parameters(). For DDP or one device use amp.initialize."
        )
    if config.optimizer.enabled or config.linear.weight_grad != "hp":
        from lowbit_amp.optim.build import build_optimizer

        optimizer = build_optimizer(optimizer, model, config)
    optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: state.manager.update())
    optimizer.lowbit_loss_scaler = DynamicLossScaler(_loss_scaling(config, model))  # type: ignore[attr-defined]
    return optimizer


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state (every rank gets it; CPU tensors) — what to ``torch.save`` for loading under any world
    size, including 1. Collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, Any], strict: bool = True) -> Any:
    """Load a state dict into ``model``, with a clear error for a *sharded* checkpoint loaded without the same mesh."""
    for key, value in state.items():
        if type(value).__name__ == "DTensor":
            raise ValueError(
                f"Checkpoint entry {key!r} is a sharded DTensor (saved with model.state_dict() under FSDP2). A sharded "
                "checkpoint only loads under the same process layout; save with "
                "lowbit_amp.distributed.fsdp.full_state_dict(model) (or torch.distributed.checkpoint) to load it under "
                "another world size."
            )
    return model.load_state_dict(state, strict=strict)
