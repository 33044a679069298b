"""Enhanced loss scaling (arXiv 1905.12334): a floor schedule the dynamic scale never backs off below."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit_amp.config import ConfigError, LossScalingConfig, config_from_dict
from lowbit_amp.loss_scaler import DynamicLossScaler, scale_floor, scale_loss


def test_floor_schedule_bounds_backoff_and_raises_the_scale() -> None:
    cfg = LossScalingConfig(mode="dynamic", init_scale=2.0**10, growth_interval=1000, min_scale=1.0,
                            floor_schedule=[[0, 4.0], [5, 256.0]])
    scaler = DynamicLossScaler(cfg)
    for _ in range(4):  # overflow bursts: plain dynamic scaling would fall to 2**6
        scaler.update(finite=False)
    assert scaler.scale == 2.0**6 and scaler.skipped_steps == 4
    scaler.update(finite=True)  # step 5: the floor rises to 256 and lifts the scale with it
    assert scaler.scale == 256.0
    for _ in range(10):
        scaler.update(finite=False)
    assert scaler.scale == 256.0 and scaler.skipped_steps == 14  # overflowing steps are still skipped
    plain = DynamicLossScaler(LossScalingConfig(mode="dynamic", init_scale=2.0**10, growth_interval=1000))
    for _ in range(14):
        plain.update(finite=False)
    assert plain.scale == 1.0


def test_floor_lookup_and_state_dict_round_trip() -> None:
    cfg = LossScalingConfig(mode="dynamic", min_scale=2.0, floor_schedule=((10, 1.0), (20, 64.0)))
    assert [scale_floor(cfg, s) for s in (0, 9, 10, 19, 20, 10**6)] == [2.0, 2.0, 2.0, 2.0, 64.0, 64.0]
    scaler = DynamicLossScaler(cfg)
    for _ in range(3):
        scaler.update(True)
    restored = DynamicLossScaler(cfg)
    restored.load_state_dict(scaler.state_dict())
    assert restored.steps == 3
    legacy = {"scale": 8.0, "clean_steps": 1, "skipped_steps": 0}  # saved before the schedule existed
    restored.load_state_dict(legacy)
    assert restored.steps == 0


@pytest.mark.parametrize("bad,match", [
    ([[0, 1.0], [0, 2.0]], "strictly increasing"), ([[5, -1.0]], "positive"), ([5, 1.0], "pair"),
    ("0:1", "must be a list"), ([[1.5, 2.0]], "integer"),
])
def test_bad_schedules_are_config_errors(bad, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"loss_scaling": {"mode": "dynamic", "floor_schedule": bad}})


def test_yaml_form_and_scale_loss_skip() -> None:
    cfg = config_from_dict({"loss_scaling": {"mode": "dynamic", "init_scale": 8.0, "floor_schedule": [[0, 8.0]]}})
    assert cfg.loss_scaling.floor_schedule == ((0, 8.0),)
    hash(cfg)  # stays hashable (tuples, not lists)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.lowbit_loss_scaler = DynamicLossScaler(cfg.loss_scaling)  # type: ignore[attr-defined]
    before = model.weight.detach().clone()
    with scale_loss(model(torch.full((2, 4), float("inf"))).sum(), opt) as scaled:
        scaled.backward()
    opt.step()
    assert torch.equal(model.weight, before)  # the overflow step was skipped...
    assert opt.lowbit_loss_scaler.scale == 8.0  # ...and the scale stayed on its floor
