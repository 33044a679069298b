"""state_dict / load_state_dict: codes + scales saved, bit-identical resume, conversion across formats and levels."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lowbit_amp.config import ConfigError, LinearConfig
from lowbit_amp.grads import to_fp8_weight_grad
from lowbit_amp.optim import LowBitAdamW, LowBitSGD

SHAPES = [(7, 13), (16, 16), (130,)]
O3_LIKE = {"exp_avg": "e4m3", "exp_avg_sq": "e4m3_expand", "master_weights": "bf16_sr", "block_size": 32}


def _model(dtype: torch.dtype) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter((0.05 * torch.randn(s, generator=gen)).to(dtype)) for s in SHAPES]


def _grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        p.grad = to_fp8_weight_grad(g, p, LinearConfig(weight_grad="e4m3")) if p.dim() == 2 else g.to(p.dtype)


def _roundtrip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype, storage", [
    (torch.bfloat16, O3_LIKE),
    (torch.float32, {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "fp16"}),
    (torch.bfloat16, {"exp_avg": "bf16", "exp_avg_sq": "fp32", "master_weights": "fp32"}),
])
def test_resume_is_bit_exact(dtype: torch.dtype, storage: dict) -> None:
    params = _model(dtype)
    opt = LowBitAdamW(params, lr=1e-2, **storage)
    for step in range(3):
        _grads(params, step)
        opt.step()
    saved_opt = _roundtrip(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    state = opt.state[params[0]]
    stored = next(iter(state["exp_avg"].values()))  # codes (or value) as saved: the low-bit dtype itself
    assert stored.dtype == {"e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16}[storage["exp_avg"]]
    for step in range(3, 6):
        _grads(params, step)
        opt.step()
    resumed = [nn.Parameter(p.clone()) for p in saved_params]
    opt2 = LowBitAdamW(resumed, lr=1e-2, **storage)
    opt2.load_state_dict(saved_opt)
    for step in range(3, 6):
        _grads(resumed, step)
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(params, resumed):
        sa, sb = opt.state[a], opt2.state[b]
        for key in ("exp_avg", "exp_avg_sq", "master"):
            assert sa[key].keys() == sb[key].keys()
            for part in sa[key]:
                a_bytes, b_bytes = (t.reshape(-1).view(torch.uint8) for t in (sa[key][part], sb[key][part]))
                assert torch.equal(a_bytes, b_bytes), (key, part)


def test_converts_torch_adamw_and_other_level_checkpoints() -> None:
    params = _model(torch.float32)
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(3):
        _grads(params, step)
        for p in params:
            p.grad = p.grad.dequantize() if hasattr(p.grad, "dequantize") else p.grad
        torch_opt.step()
    o2 = LowBitAdamW(params, lr=1e-2)  # FP32 states (O2)
    o2.load_state_dict(torch_opt.state_dict())
    for p in params:
        s_torch, s_o2 = torch_opt.state[p], o2.state[p]
        assert torch.equal(s_o2["exp_avg"]["value"].reshape(-1)[: p.numel()], s_torch["exp_avg"].reshape(-1))
        assert s_o2["step"].item() == 3
    o3 = LowBitAdamW(params, lr=1e-2, **O3_LIKE)
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))  # O2 -> O3: decoded, re-encoded
    for p in params:
        m = o3.exp_avg_codec.decode(o3.state[p]["exp_avg"]).reshape(-1)[: p.numel()]
        ref = torch_opt.state[p]["exp_avg"].reshape(-1)
        assert (m - ref).norm() / ref.norm() < 0.05
    back = LowBitAdamW(params, lr=1e-2)
    back.load_state_dict(o3.state_dict())  # O3 -> O2 converts too
    assert back.state[params[0]]["exp_avg"]["value"].dtype == torch.float32


def test_incompatible_checkpoint_fails_clearly() -> None:
    params = _model(torch.float32)
    sgd = LowBitSGD(params, lr=0.1, momentum=0.9)
    _grads(params, 0)
    sgd.step()
    with pytest.raises(ConfigError, match="same kind"):
        LowBitAdamW(params).load_state_dict(sgd.state_dict())
    torch_sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    torch_sgd.step()
    with pytest.raises(ConfigError, match="exp_avg"):
        LowBitAdamW(params).load_state_dict(torch_sgd.state_dict())
    with pytest.raises(ValueError, match="parameter group"):
        LowBitAdamW([params[0]]).load_state_dict(LowBitAdamW(params).state_dict())
