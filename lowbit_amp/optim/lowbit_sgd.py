"""``LowBitSGD``: ``torch.optim.SGD``'s signature on the low-bit optimizer; the momentum buffer uses the ``exp_avg``
format (``fp32``/``bf16``/``e4m3``). ``momentum=0`` keeps no buffer, as torch does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowbit_amp.optim.lowbit_optimizer import LowBitOptimizer

__all__ = ["LowBitSGD"]


class LowBitSGD(LowBitOptimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **storage: Any,
    ) -> None:
        if float(lr) < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay, "nesterov": nesterov,
                        "maximize": maximize, "foreach": foreach, "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults, rule="sgd", **storage)
