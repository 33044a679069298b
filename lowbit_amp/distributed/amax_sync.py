"""Checking that amax synchronisation did its job: every rank holds identical scaling states.

The synchronisation itself is :class:`lowbit_amp.scaling.manager.ScalingManager`: once per optimizer step it stacks every
delayed-scaling state's pending amax and runs ONE ``MAX`` all-reduce (``comm.sync_amax``, on by default) before rolling
the histories, so this module adds no second mechanism. What it adds is the check users (and the tests) need after a
resume, an engine change or a custom process group: gather each rank's scales and report the first mismatch.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit_amp.scaling.state import ScalingState

__all__ = ["check_scales_synchronized", "scaling_vector"]


def scaling_vector(model: nn.Module) -> torch.Tensor:
    """All delayed-scaling states' ``scale`` and ``amax_history`` concatenated (float32, module order)."""
    parts = []
    for module in model.modules():
        if isinstance(module, ScalingState):
            parts += [module.scale.detach().float().reshape(1), module.amax_history.detach().float().reshape(-1)]
    return torch.cat(parts) if parts else torch.zeros(0)


def check_scales_synchronized(model: nn.Module, group: object | None = None) -> None:
    """Raise ``RuntimeError`` naming the first rank whose scaling states differ (bitwise) from rank 0's. Collective."""
    import torch.distributed as dist

    mine = scaling_vector(model)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    for rank, other in enumerate(gathered):
        if not torch.equal(other.view(torch.int32), gathered[0].view(torch.int32)):
            diff = int((other != gathered[0]).sum())
            raise RuntimeError(
                f"Scaling states differ between rank 0 and rank {rank} ({diff} values): amax synchronisation is off "
                "(comm.sync_amax=False) or the ranks stepped a different number of times. Enable comm.sync_amax or "
                "load the same checkpoint on every rank."
            )
