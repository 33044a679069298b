"""One object per model that advances every delayed-scaling state once per optimizer step.

Why batched: a model has three states per linear layer; updating them one by one costs ~5 kernel launches each
(hundreds per step). The manager stacks the states that share a config and updates them with a handful of launches,
and — when ``torch.distributed`` is initialised — synchronises all pending amaxes with ONE ``MAX`` all-reduce, so every
data-parallel rank computes identical scales. It runs outside the forward/backward (from an optimizer step post-hook),
so compiled regions never see it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn

from lowbit_amp.scaling.state import ScalingState, roll_histories

AmaxReducer = Callable[[torch.Tensor], None]


def default_amax_reducer(group: object | None = None) -> AmaxReducer | None:
    """A MAX all-reduce over ``group`` when torch.distributed runs with more than one rank, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None

    def reduce(amaxes: torch.Tensor) -> None:
        dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)

    return reduce


class ScalingManager:
    """Advances the delayed-scaling states of ``model`` (see module docstring)."""

    def __init__(self, model: nn.Module, sync_amax: bool = True, process_group: object | None = None) -> None:
        self.states: list[ScalingState] = [m for m in model.modules() if isinstance(m, ScalingState) and m.delayed]
        self.sync_amax = sync_amax
        self.process_group = process_group
        groups: dict[tuple, list[ScalingState]] = defaultdict(list)
        for state in self.states:
            groups[(state.config, state.fmt)].append(state)
        self._groups = list(groups.values())
        self.num_updates = 0

    @staticmethod
    def _buffers(states: Iterable[ScalingState], name: str) -> list[torch.Tensor]:
        return [getattr(s, name) for s in states]

    def update(self, reducer: AmaxReducer | None = None) -> None:
        """Fold each state's pending amax into its history and compute next step's scale; no host sync once warm."""
        if not self.states:
            return
        if reducer is None and self.sync_amax:
            reducer = default_amax_reducer(self.process_group)
        if reducer is not None:
            pending = torch.stack(self._buffers(self.states, "pending_amax"))
            reducer(pending)
            torch._foreach_copy_(self._buffers(self.states, "pending_amax"), list(pending.unbind(0)))
        with torch.no_grad():
            for states in self._groups:
                first = states[0]
                hist, scale, has = roll_histories(
                    torch.stack(self._buffers(states, "amax_history")),
                    torch.stack(self._buffers(states, "pending_amax")),
                    torch.stack(self._buffers(states, "scale")),
                    torch.stack(self._buffers(states, "has_history")),
                    first.config,
                    first.fmt,
                )
                torch._foreach_copy_(self._buffers(states, "amax_history"), list(hist.unbind(0)))
                torch._foreach_copy_(self._buffers(states, "scale"), list(scale.unbind(0)))
                torch._foreach_copy_(self._buffers(states, "has_history"), list(has.unbind(0)))
                torch._foreach_zero_(self._buffers(states, "pending_amax"))
        self.num_updates += 1
        if not all(s._warm for s in self.states):
            # One host sync per step only until every state has seen data (usually just after the first step).
            flags = torch.stack(self._buffers(self.states, "has_history")).cpu().tolist()
            for state, flag in zip(self.states, flags):
                state._warm = bool(flag)
