"""``build_optimizer``: what ``amp.initialize`` calls at O2/O3 to rebuild the user's optimizer as the low-bit one.

The user's param groups are reused key for key (same dicts' contents, same Parameter objects, same hyper-parameters,
``param_names`` included) and so are the optimizer's ``defaults``; only the class changes. State the user's optimizer
already holds (resuming, or a warm-up at O0) is converted into the low-bit formats. Supported: ``torch.optim.Adam``,
``torch.optim.AdamW``, ``torch.optim.SGD`` (exact classes: a subclass may change ``step``), or a low-bit optimizer
(rebuilt with the new formats). Anything else raises :class:`~lowbit_amp.config.ConfigError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit_amp.config import ConfigError, LowBitConfig
from lowbit_amp.optim.lowbit_optimizer import LowBitOptimizer

__all__ = ["SUPPORTED", "build_optimizer"]

SUPPORTED = "torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD"


def _rule_of(optimizer: torch.optim.Optimizer) -> tuple[str, bool]:
    """``(rule, decoupled weight decay by default)``."""
    if isinstance(optimizer, LowBitOptimizer):
        return optimizer.rule, optimizer.decoupled_default
    kind = type(optimizer)
    if kind is torch.optim.AdamW:
        return "adam", True
    if kind is torch.optim.Adam:
        return "adam", False
    if kind is torch.optim.SGD:
        return "sgd", False
    raise ConfigError(
        f"amp.initialize at this opt level rebuilds the optimizer to read 8-bit gradients/states, but it cannot "
        f"rebuild {kind.__module__}.{kind.__qualname__}. Supported: {SUPPORTED}. Use one of them, or opt_level "
        "'O1' (which keeps your optimizer), or set linear.weight_grad='hp' and optimizer.enabled=false.")


def build_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, config: LowBitConfig) -> LowBitOptimizer:
    """The low-bit optimizer for ``config.optimizer`` over ``optimizer``'s param groups (see module docstring).

    With ``optimizer.enabled`` false (8-bit gradients only) the states stay FP32 and there is no master copy: the
    math is the user's optimizer's, reading FP8 gradients without widening them in memory.
    """
    rule, decoupled = _rule_of(optimizer)
    cfg = config.optimizer
    if cfg.enabled:
        storage: dict[str, Any] = {"exp_avg": cfg.exp_avg, "exp_avg_sq": cfg.exp_avg_sq,
                                       "master_weights": cfg.master_weights, "block_size": cfg.block_size}
    else:
        storage = {"exp_avg": "fp32", "exp_avg_sq": "fp32", "master_weights": "none", "block_size": cfg.block_size}
    groups = [dict(group, params=list(group["params"])) for group in optimizer.param_groups]
    saved = optimizer.state_dict() if len(optimizer.state) else None
    try:
        low_bit = LowBitOptimizer(groups, dict(optimizer.defaults), rule=rule, decoupled_default=decoupled, **storage)
    except ValueError as err:
        raise ConfigError(f"optimizer config: {err}") from None
    for group in low_bit.param_groups:
        low_bit._check_group(group)
    if saved is not None:
        low_bit.load_state_dict(saved)
    return low_bit
