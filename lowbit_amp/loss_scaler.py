"""apex-style dynamic loss scaling: ``with amp.scale_loss(loss, optimizer) as scaled: scaled.backward()``.

Needed for fp16 models (fp16's narrow range underflows small gradients) and available for any recipe. On exit the
context unscales the gradients in place and checks them: if any is inf/NaN, every gradient of the optimizer's params is
set to ``None`` — torch optimizers skip parameters without a gradient, so the following ``optimizer.step()`` leaves
weights and optimizer state untouched — and the scale backs off; after ``growth_interval`` clean steps it grows.
The check costs one host sync per step (as apex's and torch.amp's GradScaler's do).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lowbit_amp.config import LossScalingConfig


def normalize_floor_schedule(schedule: object) -> tuple[tuple[int, float], ...]:
    """Validate ``[[step, floor], ...]`` (steps strictly increasing, floors > 0) into a tuple of ``(int, float)``."""
    if schedule is None:
        return ()
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, (list, tuple)):
        raise ValueError(f"expected a list of [step, floor] pairs, e.g. [[0, 1.0], [10000, 128.0]], got {schedule!r}")
    pairs: list[tuple[int, float]] = []
    for item in schedule:
        if isinstance(item, (str, bytes)) or not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"each entry must be a [step, floor] pair, got {item!r}")
        step, floor = item
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not float(floor) > 0:
            raise ValueError(f"floor must be a positive number, got {floor!r}")
        if pairs and step <= pairs[-1][0]:
            raise ValueError(f"steps must be strictly increasing, got {step} after {pairs[-1][0]}")
        pairs.append((int(step), float(floor)))
    return tuple(pairs)


def scale_floor(config: LossScalingConfig, step: int) -> float:
    """The lowest scale allowed at optimizer step ``step``: the last schedule floor reached, never below ``min_scale``."""
    floor = config.min_scale
    for start, value in config.floor_schedule:
        if step < start:
            break
        floor = max(config.min_scale, value)
    return floor


class DynamicLossScaler:
    """Holds the loss scale and its growth tracker; ``state_dict`` round-trips them.

    With ``config.floor_schedule`` (enhanced loss scaling, arXiv 1905.12334) the scale never backs off below the floor
    reached at the current step (``steps`` counts every update, skipped or not), and is raised to it when the floor
    rises. Steps whose gradients overflow are still skipped: the floor only limits how far the scale falls.
    """

    def __init__(self, config: LossScalingConfig | None = None) -> None:
        self.config = config or LossScalingConfig(mode="dynamic")
        self.scale = float(self.config.init_scale)
        self.clean_steps = 0
        self.skipped_steps = 0
        self.steps = 0

    def unscale_and_check(self, params: list[torch.nn.Parameter]) -> bool:
        """Divide grads by the scale; True when every gradient is finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        inv = 1.0 / self.scale
        finite = torch.ones((), dtype=torch.bool, device=grads[0].device)
        for grad in grads:
            grad.mul_(inv)
            finite = finite & torch.isfinite(grad).all().to(finite.device)
        return bool(finite)

    def update(self, finite: bool) -> None:
        cfg = self.config
        if cfg.mode != "dynamic":
            return
        self.steps += 1
        floor = scale_floor(cfg, self.steps)
        if not finite:
            self.scale = max(self.scale * cfg.backoff_factor, floor)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= cfg.growth_interval:
            self.scale = min(self.scale * cfg.growth_factor, cfg.max_scale)
            self.clean_steps = 0
        self.scale = max(self.scale, floor)

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps,
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.steps = int(state.get("steps", 0))  # checkpoints from before the floor schedule lack it


def loss_scaler_of(optimizer: torch.optim.Optimizer) -> DynamicLossScaler:
    """The scaler ``amp.initialize`` attached to ``optimizer`` (one is created on first use otherwise)."""
    scaler = getattr(optimizer, "lowbit_loss_scaler", None)
    if scaler is None:
        scaler = DynamicLossScaler()
        optimizer.lowbit_loss_scaler = scaler  # type: ignore[attr-defined]
    return scaler


@contextlib.contextmanager
def scale_loss(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Yield ``loss * scale``; after the caller's ``backward()``, unscale, check, and skip the step on inf/NaN."""
    scaler = loss_scaler_of(optimizer)
    if scaler.config.mode == "none":
        yield loss
        return
    yield loss * scaler.scale
    params = [p for group in optimizer.param_groups for p in group["params"]]
    finite = scaler.unscale_and_check(params)
    if not finite:
        for p in params:
            p.grad = None
    scaler.update(finite)
