"""``LowBitAdamW`` / ``LowBitAdam``: torch's signatures (same defaults, same param-group keys) on the low-bit optimizer.

The extra keyword arguments choose the storage: ``exp_avg`` (``fp32``/``bf16``/``e4m3``), ``exp_avg_sq``
(``fp32``/``fp16``/``e4m3_expand``), ``master_weights`` (``none``/``fp32``/``fp16``/``bf16_sr``), ``block_size``,
``compile`` (None = on CUDA) and ``nonfinite`` (``skip``/``error``). With all-FP32 states and no master it computes
what ``torch.optim.AdamW`` computes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowbit_amp.optim.lowbit_optimizer import LowBitOptimizer

__all__ = ["LowBitAdam", "LowBitAdamW"]


class LowBitAdamW(LowBitOptimizer):
    _decoupled = True
    _default_weight_decay = 1e-2

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool | None = None,
        **storage: Any,
    ) -> None:
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}: each must be in [0, 1).")
        defaults = {
            "lr": lr, "betas": betas, "eps": eps,
            "weight_decay": self._default_weight_decay if weight_decay is None else weight_decay,
            "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach, "capturable": capturable,
            "differentiable": differentiable, "fused": fused,
            "decoupled_weight_decay": self._decoupled if decoupled_weight_decay is None else decoupled_weight_decay,
        }
        super().__init__(params, defaults, rule="adam", decoupled_default=self._decoupled, **storage)


class LowBitAdam(LowBitAdamW):
    """Adam with L2 weight decay added to the gradient (``torch.optim.Adam``'s default)."""

    _decoupled = False
    _default_weight_decay = 0.0
