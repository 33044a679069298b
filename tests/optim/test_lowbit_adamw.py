"""The low-bit optimizer against torch.optim.AdamW / Adam / SGD over 10 steps on random data.

FP32 states: within 1e-5 absolute of torch. 8-bit recipes: the deviation from torch's trajectory, relative to how far
torch moved the weights, stays under each recipe's stated tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lowbit_amp.config import ConfigError, LinearConfig
from lowbit_amp.grads import to_fp8_weight_grad
from lowbit_amp.optim import LowBitAdam, LowBitAdamW, LowBitSGD

SHAPES = [(7, 13), (33,), (16, 16), (3, 130)]


def _params(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    return [nn.Parameter((0.05 * torch.randn(s, generator=gen)).to(dtype)) for s in SHAPES]


def track(make_ref: Callable, make_lowbit: Callable, gen: torch.Generator, steps: int = 10,
          fp8_grads: bool = False) -> tuple[float, float]:
    """``(max |w_lowbit - w_torch|, max |w_torch - w_0|)`` after ``steps`` steps on the same gradients."""
    ref = _params(gen)
    low = [nn.Parameter(p.detach().clone()) for p in ref]
    start = [p.detach().clone() for p in ref]
    opt_ref, opt_low = make_ref(ref), make_lowbit(low)
    for _ in range(steps):
        for p, q in zip(ref, low):
            g = torch.randn(p.shape, generator=gen) * 0.1
            if fp8_grads:
                q.grad = to_fp8_weight_grad(g, q, LinearConfig(weight_grad="e4m3"))
                p.grad = q.grad.dequantize()  # torch sees exactly the values the FP8 gradient holds
            else:
                p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_low.step()
    dev = max((p - q).abs().max().item() for p, q in zip(ref, low))
    moved = max((p - s).abs().max().item() for p, s in zip(ref, start))
    return dev, moved


@pytest.mark.parametrize("fp8_grads", [False, True])
@pytest.mark.parametrize("make_ref, make_low", [
    (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), lambda p: LowBitAdamW(p, lr=1e-2, weight_decay=0.1)),
    (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1), lambda p: LowBitAdam(p, lr=1e-2, weight_decay=0.1)),
    (lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), maximize=True),
     lambda p: LowBitAdamW(p, lr=1e-2, betas=(0.8, 0.95), maximize=True)),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
     lambda p: LowBitSGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1),
     lambda p: LowBitSGD(p, lr=0.1, momentum=0.9, dampening=0.1)),
    (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: LowBitSGD(p, lr=0.1)),
], ids=["adamw", "adam", "adamw-maximize", "sgd-nesterov", "sgd-dampening", "sgd-plain"])
def test_fp32_states_track_torch(make_ref: Callable, make_low: Callable, fp8_grads: bool,
                                 gen: torch.Generator) -> None:
    dev, moved = track(make_ref, make_low, gen, fp8_grads=fp8_grads)
    assert moved > 1e-2 and dev < 1e-5, (dev, moved)


# (exp_avg, exp_avg_sq, master, tolerance relative to the distance torch moved the weights)
RECIPES = [
    ("bf16", "fp32", "none", 0.02),
    ("e4m3", "fp32", "fp32", 0.10),
    ("fp32", "fp16", "fp32", 0.01),
    ("fp32", "e4m3_expand", "fp32", 0.10),
    ("e4m3", "fp16", "fp16", 0.10),
    ("e4m3", "e4m3_expand", "bf16_sr", 0.15),
    ("e4m3", "fp16", "bf16_sr", 0.15),
]


@pytest.mark.parametrize("exp_avg, exp_avg_sq, master, tol", RECIPES)
def test_low_bit_recipes_stay_close(exp_avg: str, exp_avg_sq: str, master: str, tol: float,
                                    gen: torch.Generator) -> None:
    dev, moved = track(lambda p: torch.optim.AdamW(p, lr=1e-2),
                       lambda p: LowBitAdamW(p, lr=1e-2, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                                             master_weights=master, block_size=32), gen)
    assert dev / moved < tol, (dev / moved, dev, moved)


def test_sgd_e4m3_momentum(gen: torch.Generator) -> None:
    dev, moved = track(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                       lambda p: LowBitSGD(p, lr=0.1, momentum=0.9, exp_avg="e4m3"), gen)
    assert dev / moved < 0.1


def test_bf16_params_with_master_and_tensor_lr(gen: torch.Generator) -> None:
    """bf16 model weights: FP32 master tracks torch's FP32 AdamW; a tensor lr (schedulers) works without syncs."""
    ref = [nn.Parameter(p.detach().to(torch.bfloat16).float()) for p in _params(gen)]  # same start point
    low = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2)
    opt_low = LowBitAdamW(low, lr=torch.tensor(1e-2), master_weights="fp32")
    for _ in range(10):
        for p, q in zip(ref, low):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.to(torch.bfloat16)
            p.grad = q.grad.float()
        opt_ref.step()
        opt_low.step()
    for p, q in zip(ref, low):
        master = opt_low.state[q]["master"]["value"].reshape(-1)[: p.numel()].view_as(p)
        assert (master - p).abs().max().item() < 1e-5
        assert torch.equal(q.detach(), master.to(torch.bfloat16))


def test_nonfinite_step_is_skipped_without_touching_state(gen: torch.Generator) -> None:
    params = _params(gen)
    opt = LowBitAdamW(params, lr=1e-2, exp_avg="e4m3", exp_avg_sq="e4m3_expand", master_weights="fp16")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = ([p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]]["exp_avg"].items()},
              opt.state[params[0]]["step"].clone())
    params[0].grad = to_fp8_weight_grad(torch.full(SHAPES[0], float("nan")), params[0], LinearConfig(weight_grad="e4m3"))
    params[1].grad[0] = float("inf")
    opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before[0], params))
    assert all(torch.equal(before[1][k], v) for k, v in opt.state[params[0]]["exp_avg"].items())
    assert torch.equal(before[2], opt.state[params[0]]["step"]) and opt.skipped_steps.item() == 1
    strict = LowBitAdamW(params, lr=1e-2, nonfinite="error")
    with pytest.raises(FloatingPointError, match="inf/NaN"):
        strict.step()


def test_bad_inputs(gen: torch.Generator) -> None:
    params = _params(gen)
    with pytest.raises(ValueError, match="valid formats"):
        LowBitAdamW(params, exp_avg_sq="e4m3")  # a plain-E4M3 second moment is refused on purpose
    with pytest.raises(ValueError, match="master_weights"):
        LowBitAdamW(params, master_weights="fp8")
    with pytest.raises(ValueError, match="block_size"):
        LowBitAdamW(params, block_size=0)
    with pytest.raises(ValueError, match="betas"):
        LowBitAdamW(params, betas=(1.0, 0.9))
    opt = LowBitAdamW(params, amsgrad=True)
    params[0].grad = torch.zeros(SHAPES[0])
    with pytest.raises(ConfigError, match="amsgrad"):
        opt.step()
    sparse = nn.Parameter(torch.zeros(4, 3))
    sparse.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(ConfigError, match="sparse"):
        LowBitAdamW([sparse]).step()


def test_hyper_parameter_tensor_is_updated_in_place() -> None:
    """An LR scheduler's change reaches the device vector in place: same tensor (its address sits in the fused
    kernel's cached pointer table, which a re-launched step reuses), new values."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = LowBitAdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    group = opt.param_groups[0]
    first = opt._hyper(group, p.device)
    assert first.tolist() == pytest.approx([1e-3, 0.9, 0.95, 1e-8, 0.1])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(4, 4)
    opt.step()
    scheduler.step()
    second = opt._hyper(group, p.device)
    assert second is first and second[0].item() == pytest.approx(5e-4)


def test_fp32_parameter_is_its_own_bf16_sr_master(gen: torch.Generator) -> None:
    """An fp32 parameter holds the bf16 grid exactly, so ``bf16_sr`` keeps no copy for it (2 B/param less than before)
    and steps it exactly as the same weights stored in bf16: same stochastic-rounding stream, same values. A state
    saved with the old copy loads, drops it, and keeps stepping identically."""
    start = [p.detach().to(torch.bfloat16) for p in _params(gen)]
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        params = [nn.Parameter(w.to(dtype, copy=True)) for w in start]
        opt = LowBitAdamW(params, lr=1e-2, exp_avg="e4m3", exp_avg_sq="fp16", master_weights="bf16_sr")
        grads = torch.Generator().manual_seed(3)
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads).to(torch.bfloat16).to(dtype)  # the same values
            opt.step()
            if step == 2 and dtype == torch.float32:  # the pre-change layout: a bf16 copy beside the fp32 weights
                saved = opt.state_dict()
                for index, p in enumerate(params):
                    blocks = opt.state[p]["exp_avg"]["codes"].shape
                    flat = torch.nn.functional.pad(p.detach().reshape(-1), (0, blocks.numel() - p.numel()))
                    saved["state"][index]["master"] = {"value": flat.view(blocks).to(torch.bfloat16)}
                opt.load_state_dict(saved)
                assert all(opt.state[p]["master"] == {} for p in params)
        runs[dtype] = (params, opt)
    for a, b in zip(runs[torch.bfloat16][0], runs[torch.float32][0]):
        assert torch.equal(a.detach().float(), b.detach())
    opt32 = runs[torch.float32][1]
    assert all(opt32.state[p]["master"] == {} for p in runs[torch.float32][0])
