"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with lowbit_amp layers.

Order matters, and this is the whole recipe::

    model = amp.initialize(model, opt_level="O1")          # 1. swap layers first (FSDP2 records module objects)
    for block in model.blocks:
        fully_shard_lowbit(block, root=model)               # 2. shard (fully_shard's kwargs: any mesh / policy)
    fully_shard_lowbit(model)
    optimizer = lowbit_amp.distributed.fsdp.prepare_optimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-4))

Why: ``fully_shard`` replaces every parameter by a sharded ``DTensor`` Parameter, so an optimizer built before sharding
holds dead tensors, and FSDP2 keeps references to the modules it sharded, so layers must be swapped before it runs.
Plain ``fully_shard`` is not enough: :func:`fully_shard_lowbit` also wraps weights for the FP8 all-gather and makes the
layers re-cast their weight each forward (FSDP2 re-gathers in place, which the single-device cache key cannot see).
:func:`prepare_optimizer` does the optimizer half of ``amp.initialize`` on the sharded parameters (rebuild as the
8-bit optimizer at O2/O3, scaling-manager step hook, loss scaler).

What runs in 8 bits under FSDP2 (docs/distributed.md has the table):

* the three GEMMs of every ``LowBitLinear``, as on one device;
* at ``comm.weight_all_gather='fp8'`` (O3) the weight all-gather: :func:`fully_shard_lowbit` wraps each FP8
  ``LowBitLinear`` weight in :class:`~lowbit_amp.distributed.fsdp_fp8_weight.Fp8AllGatherWeight`, whose FSDP2 hooks cast
  the shard to E4M3 with the full weight's scale (one MAX all-reduce of the amax) and gather 1 byte per parameter; the
  layer computes with the gathered codes directly;
* at O2/O3 the optimizer state: the 8-bit optimizer steps each rank's local shard (its blocks are blocks of the local
  flat shard) and all-reduces its skip-on-non-finite decision so every rank steps or skips together;
* scaling states are buffers (replicated, not sharded); the scaling manager's one MAX all-reduce keeps them identical.

Not 8-bit: the gradient reduce-scatter. FSDP2 reduce-scatters in the parameters' dtype (or
``MixedPrecisionPolicy.reduce_dtype``); an ``Fp8Grad`` (O2+) is dequantized into FSDP2's reduce buffer, and
``comm.grad_reduce='fp8'`` is not applied — :func:`fully_shard_lowbit` warns when it is asked for.

Checkpoints: :func:`full_state_dict` (model) and :func:`full_optimizer_state_dict` (8-bit optimizer, decoded to FP32 and
gathered) load under any world size — the optimizer's per-block 8-bit state cannot be moved across world sizes as is,
because its blocks follow the local shard, so it travels as FP32 and is re-encoded into the new shards' blocks.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lowbit_amp.optim.state_codec import get_codec

__all__ = ["full_optimizer_state_dict", "full_state_dict", "fully_shard_lowbit", "load_full_optimizer_state_dict",
           "load_full_state_dict", "prepare_optimizer"]


def fully_shard_lowbit(module: nn.Module, root: nn.Module | None = None, **fsdp_kwargs: Any) -> nn.Module:
    """``fully_shard(module, **fsdp_kwargs)`` with lowbit_amp's part: at ``comm.weight_all_gather='fp8'`` the FP8
    ``LowBitLinear`` weights under ``module`` not sharded yet are wrapped for the FP8 all-gather first (see
    :mod:`lowbit_amp.distributed.fsdp_fp8_weight`). ``root`` is the model passed to ``amp.initialize``."""
    from torch.distributed.fsdp import fully_shard

    from lowbit_amp.distributed.fsdp_fp8_weight import wrap_fp8_all_gather_weights
    from lowbit_amp.initialize import amp_state

    config = amp_state(root if root is not None else module).config
    if config.comm.grad_reduce == "fp8":
        warnings.warn(
            "comm.grad_reduce='fp8' is not applied under FSDP2: gradients are reduce-scattered in the parameter dtype "
            "(or MixedPrecisionPolicy.reduce_dtype). Set comm.grad_reduce='hp' to silence this.",
            stacklevel=2,
        )
    if config.comm.weight_all_gather == "fp8":
        wrap_fp8_all_gather_weights(module)
    _drop_weight_cache_each_forward(module)
    return fully_shard(module, **fsdp_kwargs)


def _drop_current_weight_cache(layer: nn.Module, _args: Any) -> None:
    layer.invalidate_weight_cache()


def _drop_weight_cache_each_forward(module: nn.Module) -> None:
    """Make every ``LowBitLinear`` under ``module`` re-cast its weight on each forward.

    Why: the layer caches its FP8 weight under ``(weight._version, weight.data_ptr())``, which every in-place update
    bumps on one device. FSDP2 instead re-gathers the updated shards into the *same* unsharded parameter while
    preserving its version counter, and the freed-and-reallocated storage often gets the same address — so the key
    can match a stale cast (measured: nondeterministic O2 losses, 3e-3 apart, before this hook). Under FSDP2 the weight
    is gathered once per forward anyway, so casting once per forward costs one elementwise pass per gather.
    """
    from lowbit_amp.nn.linear import LowBitLinear

    for layer in module.modules():
        if isinstance(layer, LowBitLinear) and not getattr(layer, "_lowbit_fsdp_cache_hook", False):
            layer.register_forward_pre_hook(_drop_current_weight_cache)
            layer._lowbit_fsdp_cache_hook = True


def prepare_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer half of ``amp.initialize`` for an optimizer built on FSDP2-sharded parameters.

    At O2/O3 it returns the 8-bit optimizer rebuilt from ``optimizer``'s param groups (use the returned object); it
    always registers the scaling-manager update on ``step()`` and attaches the loss scaler.
    """
    from lowbit_amp.initialize import _loss_scaling, after_step_hook, amp_state
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
    optimizer.register_step_post_hook(after_step_hook(model, state.manager))
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


# ---------------------------------------------------------------------------------------------------- optimizer state
_FULL_BLOCK = 0  # block size written in a full (gathered FP32) state's format tag: never a real block size, so the
# loader always converts (re-encodes into its own blocks) instead of copying bytes laid out for other shards.


def _check_lowbit(optimizer: torch.optim.Optimizer) -> Any:
    from lowbit_amp.optim.lowbit_optimizer import LowBitOptimizer

    if not isinstance(optimizer, LowBitOptimizer):
        raise TypeError(
            f"full_optimizer_state_dict handles lowbit_amp's 8-bit optimizer; got {type(optimizer).__name__}. For a "
            "torch optimizer use torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, optimizer, "
            "options=StateDictOptions(full_state_dict=True)) and set_optimizer_state_dict.")
    return optimizer


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The 8-bit optimizer's state as full (unsharded) FP32 tensors, on CPU, in ``optimizer.state_dict()``'s layout
    (states keyed by position). Collective over each parameter's mesh: call it on every rank.

    Why FP32: each rank's 8-bit state is blocks of its *local* flat shard with one scale per block, so the blocks of
    world size 2 do not line up with those of world size 1 or 4; the only layout-free form is the decoded values. The
    loader (:func:`load_full_optimizer_state_dict`, or ``LowBitOptimizer.load_state_dict`` on one process) re-encodes
    them into its own blocks — a round trip through the 8-bit format, not a byte copy. Master weights are exported when
    the optimizer keeps a copy; when the parameter is its own master there is nothing to export.
    """
    from torch.distributed.tensor import DTensor

    from lowbit_amp.optim.lowbit_optimizer import format_tag

    opt = _check_lowbit(optimizer)
    out_state: dict[int, Any] = {}
    groups_out = []
    position = 0
    for group in opt.param_groups:
        ids = []
        for param in group["params"]:
            ids.append(position)
            state = opt.state.get(param)
            if state:
                out_state[position] = _full_param_state(opt, group, param, state, DTensor, format_tag)
            position += 1
        groups_out.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": out_state, "param_groups": groups_out}


def _full_param_state(opt: Any, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any], dtensor_cls: Any,
                      format_tag: Any) -> dict[str, Any]:
    local = param.to_local() if isinstance(param, dtensor_cls) else param
    local = getattr(local, "lowbit_plain_data", local)
    numel = local.numel()

    def full(flat: torch.Tensor) -> torch.Tensor:
        values = flat.reshape(-1)[:numel].reshape(local.shape)
        if isinstance(param, dtensor_cls):
            values = dtensor_cls.from_local(values, param.device_mesh, param.placements, shape=param.shape,
                                            stride=param.stride()).full_tensor()
        return values.detach().cpu().clone()

    name = opt._momentum_codec_name(group)
    sq = "fp32" if opt.exp_avg_sq_codec is not None else None
    has_master = bool(state["master"])
    saved: dict[str, Any] = {
        "step": state["step"].detach().cpu().clone(),
        "salt": state["salt"].detach().cpu().clone(),
        "format": format_tag(opt.rule, "fp32" if name is not None else None, sq, "fp32" if has_master else "none",
                             _FULL_BLOCK),
    }
    for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        if key in state:
            codec = opt.exp_avg_sq_codec if key == "exp_avg_sq" else get_codec(name)
            saved[key] = {"value": full(codec.decode(state[key]))}
    saved["master"] = {"value": full(opt.master.read(state["master"], torch.empty(0)))} if has_master else {}
    return saved


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Load a :func:`full_optimizer_state_dict` (saved under any world size) into an 8-bit optimizer over FSDP2-sharded
    parameters: each rank takes its shard of every FP32 tensor and re-encodes it into blocks of its local shard.
    Not collective. On one process (plain parameters) ``optimizer.load_state_dict(state_dict)`` does the same."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from lowbit_amp.optim.checkpoint import import_param_state

    opt = _check_lowbit(optimizer)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)):
        raise ValueError("The optimizer checkpoint has a different number of parameter groups or parameters than this "
                         "optimizer; build the optimizer from the same model (model.parameters()) it was saved from.")
    for saved_group, group in zip(saved_groups, opt.param_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    positions = [pid for g in saved_groups for pid in g["params"]]
    for position, (saved_id, (group, param)) in enumerate(zip(positions, opt._params_with_groups())):
        saved = state_dict["state"].get(saved_id)
        if saved is None:
            continue
        local = param.to_local() if isinstance(param, DTensor) else param
        local = getattr(local, "lowbit_plain_data", local)

        def shard(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: shard(v) for k, v in value.items()}
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                return value
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"Optimizer checkpoint tensor of shape {tuple(value.shape)} does not match the "
                                 f"parameter's full shape {tuple(param.shape)}: was it saved with "
                                 "full_optimizer_state_dict from the same model?")
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()
            return value.reshape(-1)

        local_saved = {k: shard(v) for k, v in saved.items()}
        opt.state[param] = import_param_state(opt, group, local, local_saved, position)
