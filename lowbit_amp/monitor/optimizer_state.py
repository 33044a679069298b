"""Zero fractions of an optimizer's state tensors, probed generically (no knowledge of the optimizer's class).

Why: an 8-bit moment that is mostly zero has underflowed (a plain-E4M3 second moment flushes small ``v`` to zero, and
``m/√v`` then explodes or dies). Any tensor in ``optimizer.state[p]`` — nested in dicts, lists or tuples — is counted;
tensors of fewer than two elements (``step`` counters, scalar scales) are skipped. FP8 and integer code tensors are
marked ``low_bit`` so the report can single them out.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

LOW_BIT_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8}
for _name in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        LOW_BIT_DTYPES.add(getattr(torch, _name))


def _tensors(value: Any, key: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield key, value
    elif isinstance(value, dict):
        for sub, item in value.items():
            yield from _tensors(item, f"{key}.{sub}" if key else str(sub))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{key}[{i}]")


def optimizer_state_stats(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> list[dict[str, Any]]:
    """One entry per state tensor: parameter name, state key, dtype, numel, zero fraction, ``low_bit`` flag."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    rows: list[dict[str, Any]] = []
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            state = optimizer.state.get(param)
            if not state:
                continue
            pname = names.get(id(param), f"group{group_index}.param{param_index}")
            for key, tensor in _tensors(dict(state), ""):
                if tensor.numel() < 2:
                    continue
                zeros = (tensor.detach().float() == 0).sum()
                rows.append({
                    "param": pname,
                    "state": key,
                    "dtype": str(tensor.dtype).replace("torch.", ""),
                    "numel": tensor.numel(),
                    "zero_fraction": float(zeros) / tensor.numel(),
                    "low_bit": tensor.dtype in LOW_BIT_DTYPES,
                })
    return rows
