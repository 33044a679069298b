"""build_optimizer / amp.initialize at O2 and O3: groups and hyper-parameters preserved, clear errors, training works."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit_amp as amp
from lowbit_amp.config import ConfigError
from lowbit_amp.grads import Fp8Grad
from lowbit_amp.levels import resolve_config
from lowbit_amp.optim import LowBitOptimizer, build_optimizer


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.AdamW([{"params": m[0].parameters(), "lr": 1e-3, "weight_decay": 0.0},
                                 {"params": list(m[2].parameters()) + list(m[4].parameters()), "betas": (0.8, 0.9)}],
                                lr=3e-4, eps=1e-6, weight_decay=0.05),
    lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(2e-3), weight_decay=1e-4, maximize=True),
    lambda m: torch.optim.SGD([{"params": m[0].parameters(), "momentum": 0.5}, {"params": m[2].parameters()}],
                              lr=0.1, momentum=0.9, nesterov=True),
], ids=["adamw-groups", "adam", "sgd-groups"])
def test_param_groups_and_hyper_parameters_preserved(make) -> None:  # type: ignore[no-untyped-def]
    model = mlp()
    user = make(model)
    before = [{k: v for k, v in g.items() if k != "params"} for g in user.param_groups]
    params_before = [list(g["params"]) for g in user.param_groups]
    new = build_optimizer(user, model, resolve_config("O3"))
    assert isinstance(new, LowBitOptimizer) and new.defaults == user.defaults
    assert [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups] == before
    assert all(a is b for ga, gb in zip(params_before, new.param_groups) for a, b in zip(ga, gb["params"]))


def test_unsupported_optimizers_fail_clearly() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match="Adagrad.*Supported: torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD"):
        amp.initialize(model, torch.optim.Adagrad(model.parameters()), "O2")
    with pytest.raises(ConfigError, match="amsgrad"):
        amp.initialize(mlp(), torch.optim.AdamW(mlp().parameters(), amsgrad=True), "O3")


def test_existing_torch_state_is_converted() -> None:
    model = mlp()
    user = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 32)).sum().backward()
    user.step()
    new = build_optimizer(user, model, resolve_config("O3"))
    assert all(new.state[p]["step"].item() == 1 for p in model.parameters())


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_initialize_trains_and_grads_are_one_byte(level: str) -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, opt = amp.initialize(model, opt, level)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen), torch.randn(64, 16, generator=gen)
    losses = []
    for _ in range(25):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if not losses:
            for layer in (model[0], model[2], model[4]):
                grad = layer.weight.grad
                assert isinstance(grad, Fp8Grad)
                codes, _scale = grad.codes_and_scale()
                assert codes.untyped_storage().nbytes() == layer.weight.numel()  # 1 byte per parameter
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]
