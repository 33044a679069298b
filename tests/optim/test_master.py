"""Master weights: stochastic rounding on write-back is unbiased; its counter-based noise is uniform and reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit_amp.formats import BF16
from lowbit_amp.optim.master import MasterWeights, hash_uniform
from lowbit_amp.quant.cast import round_stochastic


def test_hash_noise_is_uniform_and_deterministic() -> None:
    step = torch.tensor(7.0)
    u = hash_uniform(1 << 16, step, salt=3, device=torch.device("cpu"))
    assert torch.equal(u, hash_uniform(1 << 16, step, salt=3, device=torch.device("cpu")))
    assert not torch.equal(u, hash_uniform(1 << 16, step + 1, salt=3, device=torch.device("cpu")))
    assert not torch.equal(u, hash_uniform(1 << 16, step, salt=4, device=torch.device("cpu")))
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    hist = torch.histc(u, bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.0  # chi-square, 15 dof: p ~ 1e-4
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.02  # neighbours uncorrelated


@pytest.mark.parametrize("value", [1.0 + 2**-10, 0.0123, -3.3e-3])
def test_bf16_stochastic_rounding_unbiased_within_3_sigma(value: float) -> None:
    """Over many draws (one per step), the mean of the rounded values equals the FP32 value within 3 sigma."""
    draws = 20000
    y = torch.full((draws,), value, dtype=torch.float32)
    noise = hash_uniform(draws, torch.tensor(1.0), 11, torch.device("cpu"))  # the optimizer's noise source
    rounded = round_stochastic(y, BF16, noise=noise)
    low = y.to(torch.bfloat16).float()
    lo, hi = torch.minimum(low, rounded).min().item(), torch.maximum(low, rounded).max().item()
    assert set(rounded.unique().tolist()) <= {lo, hi}  # only the two neighbouring bf16 values
    p_up = (abs(value) - min(abs(lo), abs(hi))) / abs(hi - lo)
    sigma = abs(hi - lo) * math.sqrt(p_up * (1 - p_up) / draws)
    assert abs(rounded.double().mean().item() - value) < 3 * sigma


def test_bf16_sr_master_moves_weights_by_sub_ulp_updates() -> None:
    """Updates 1/16 of a bf16 ulp: round-to-nearest never moves the weight, SR moves it by the right amount on average."""
    master = MasterWeights("bf16_sr")
    w = torch.ones(4096, 1, dtype=torch.bfloat16)
    ulp = 2.0**-7
    for step in range(64):
        target = w.float() + ulp / 16
        _, w = master.write(target, torch.bfloat16, torch.tensor(float(step)), salt=5)
    assert (torch.ones(4096, 1, dtype=torch.bfloat16).float() + ulp / 16).to(torch.bfloat16).eq(1).all()  # RN stalls
    mean_move = (w.float() - 1).mean().item()
    assert abs(mean_move - 64 * ulp / 16) < 0.1 * 64 * ulp / 16


def test_fp16_master_with_scale_keeps_tiny_weights() -> None:
    master = MasterWeights("fp16")
    w = torch.tensor([[1e-7, 3e-9, -2e-8, 5e-6]])
    parts = master.init(w, torch.float32)
    assert parts["codes"].dtype == torch.float16
    back = master.read(parts, w)
    assert torch.allclose(back, w, rtol=2**-10)  # unscaled fp16 would flush 3e-9 to zero
