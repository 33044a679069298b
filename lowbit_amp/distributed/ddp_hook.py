"""A DistributedDataParallel communication hook that reduces gradient buckets with FP8 payloads.

DDP hands the hook each bucket as one flat buffer in the parameters' dtype; the hook all-reduces it with
:func:`~lowbit_amp.distributed.fp8_allreduce.fp8_all_reduce_` (one shared scale per *parameter* in the bucket, FP8 on
the wire, FP32 sum, FP8 result) and writes the dequantized mean back. So under DDP the 8-bit gradient path is the
wire format: autograd still produces high-precision gradients (DDP's reducer copies ``p.grad`` into its buckets), and
the bucket is what travels in FP8.

``no_sync()`` gradient accumulation works unchanged: inside ``no_sync`` DDP does not call the hook and gradients
accumulate locally in ``p.grad``; the first backward outside it calls the hook on the accumulated buckets.

Why synchronous: the hook runs its three collectives (amax MAX all-reduce, all_to_all, all_gather) back to back and
returns a completed future. On NCCL the calls only enqueue work on the communication stream, so backward keeps going;
on gloo (CPU) they block, which only costs overlap.

Use :func:`wrap_ddp` (builds DDP and registers the hook when ``config.comm.grad_reduce == 'fp8'``) or register by hand::

    ddp.register_comm_hook(Fp8HookState(group), fp8_allreduce_hook)
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations against the real classes.
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lowbit_amp.distributed.fp8_allreduce import fp8_all_reduce_

__all__ = ["Fp8HookState", "fp8_allreduce_hook", "wrap_ddp"]


@dataclass
class Fp8HookState:
    """Options of the hook. ``fmt``: wire format (``e4m3`` — lower L2 error; ``e5m2`` — fewer underflows, see
    docs/distributed.md); ``prescale``/``output_scaling`` as :func:`fp8_all_reduce_codes` (measured defaults)."""

    process_group: Optional[object] = None
    fmt: str = "e4m3"
    prescale: str = "post"
    output_scaling: str = "chunk"
    calls: int = 0


def _segments(bucket: Any) -> list[int]:
    """One segment (one shared scale) per gradient in the bucket; anything left over (padding) is its own segment."""
    sizes = [g.numel() for g in bucket.gradients()]
    rest = bucket.buffer().numel() - sum(sizes)
    if rest < 0:
        raise RuntimeError("DDP bucket is smaller than its gradients; please report this with your torch version.")
    return sizes + ([rest] if rest else [])


def fp8_allreduce_hook(state: Fp8HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: FP8 all-reduce (mean) of the bucket, in place."""
    buffer = bucket.buffer()
    fp8_all_reduce_(buffer, state.process_group, fmt=state.fmt, average=True, segments=_segments(bucket),
                    prescale=state.prescale, output_scaling=state.output_scaling)
    state.calls += 1
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future


def wrap_ddp(model: nn.Module, process_group: Optional[object] = None, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model, ...)`` with lowbit_amp's settings; registers the FP8 hook when the model's
    config (from ``amp.initialize``) has ``comm.grad_reduce == 'fp8'`` (the O3 preset).

    ``broadcast_buffers`` defaults to False: the scaling states are buffers, and DDP's per-forward broadcast from rank 0
    would overwrite each rank's pending amax between accumulation micro-batches. The scaling manager synchronises them
    itself (one MAX all-reduce per optimizer step), so every rank still ends up with identical scales.
    """
    from torch.nn.parallel import DistributedDataParallel

    from lowbit_amp.initialize import amp_state

    config = amp_state(model).config
    ddp_kwargs.setdefault("broadcast_buffers", False)
    ddp = DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)
    state = Fp8HookState(process_group) if config.comm.grad_reduce == "fp8" else None
    if state is not None:
        ddp.register_comm_hook(state, fp8_allreduce_hook)
    ddp.lowbit_comm_hook_state = state  # type: ignore[attr-defined]  # None: DDP's own (high-precision) all-reduce
    return ddp
