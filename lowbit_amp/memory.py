"""Memory numbers for one training step that mean the same thing on CPU and GPU.

Process RSS only grows, so it cannot tell two opt levels apart when they run in one process; and CPU tensors have no
allocator statistics. So the CLI reports what a level actually changes, counted exactly from the tensors:

* **training state** — parameters, their gradients and the optimizer's state tensors (distinct storages only), which
  O2/O3 shrink with 8-bit gradients and moments;
* **saved activations** — the tensors autograd keeps from forward for backward (through
  ``torch.autograd.graph.saved_tensors_hooks``, which sees everything ``ctx.save_for_backward`` stores), minus storages
  that belong to parameters; FP8 levels save the FP8 input instead of the high-precision one;
* **peak allocated** — on CUDA only, the caching allocator's peak for the run (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "tensor_bytes", "training_state_bytes"]


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    if hasattr(tensor, "storage_bytes"):  # lowbit_amp's wrapper subclasses (e.g. Fp8Grad): one object, own storage
        return (str(tensor.device), id(tensor))
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # wrapper tensor subclasses have no storage of their own
        return (str(tensor.device), id(tensor))


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes actually held: wrapper subclasses that declare one dtype but store another (``Fp8Grad``: FP8 codes and a
    scale behind an fp32 face) say so through ``storage_bytes()``."""
    if hasattr(tensor, "storage_bytes"):
        return int(tensor.storage_bytes())
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return tensor.numel() * tensor.element_size()


def _walk_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk_tensors(item)


def tensor_bytes(tensors: Iterable[torch.Tensor], exclude: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once), skipping ``exclude``."""
    seen = set(exclude or ())
    total = 0
    for tensor in tensors:
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += _nbytes(tensor)
    return total


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """``{"params": ..., "grads": ..., "optimizer": ...}`` in bytes, counted from live tensors."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    state = list(_walk_tensors(list(optimizer.state.values()))) if optimizer is not None else []
    return {"params": tensor_bytes(params), "grads": tensor_bytes(grads), "optimizer": tensor_bytes(state)}


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward while active (use as a context manager around a forward pass)."""

    def __init__(self, model: nn.Module) -> None:
        self._param_storages = {_storage_key(p) for p in model.parameters()}
        self._seen: set[tuple[str, int]] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._param_storages and key not in self._seen:
            self._seen.add(key)
            self.bytes += _nbytes(tensor)
        return tensor

    @contextlib.contextmanager
    def measure(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self
