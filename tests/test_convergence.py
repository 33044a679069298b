"""Quality parity: the tiny byte-level GPT trained at each opt level ends within 2% of O0's loss (CPU).

Same seed, same init, same batches for every level; the metric is the mean loss over the last 10 steps (less noisy
than one step) plus a fixed held-out validation batch set.
"""

from __future__ import annotations

import functools

import pytest
import torch

import lowbit_amp as amp
from lowbit_amp.data import BatchSampler, load_stdlib_corpus
from lowbit_amp.models import TinyGPT, TinyGPTConfig

STEPS = 120
CFG = TinyGPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, mlp="swiglu")


@functools.lru_cache(maxsize=None)
def corpus():  # type: ignore[no-untyped-def]
    return load_stdlib_corpus(max_bytes=1 << 20)


@functools.lru_cache(maxsize=None)
def run(level: str) -> tuple[float, float, list[float]]:
    torch.manual_seed(0)
    data = corpus()
    model = TinyGPT(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model, opt = amp.initialize(model, opt, opt_level=level)
    sampler = BatchSampler(data.train, 16, CFG.block_size, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(STEPS):
        x, y = sampler.sample()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    val = BatchSampler(data.val, 32, CFG.block_size, torch.Generator().manual_seed(1))
    with torch.no_grad():
        val_loss = sum(model(*val.sample())[1].item() for _ in range(4)) / 4
    return sum(losses[-10:]) / 10, val_loss, losses


def test_o0_learns() -> None:
    train, val, losses = run("O0")
    assert losses[0] > 5.0 and train < 3.3 and val < 3.6, (losses[0], train, val)


@pytest.mark.parametrize("level", ["O1", "O2", "O3", "int8"])
def test_level_within_2_percent_of_o0(level: str) -> None:
    base_train, base_val, _ = run("O0")
    train, val, losses = run(level)
    assert abs(train - base_train) / base_train <= 0.02, (level, train, base_train)
    assert abs(val - base_val) / base_val <= 0.02, (level, val, base_val)
