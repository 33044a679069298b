"""The tiny-GPT parity recipe: one short, fixed training run per opt level, the yardstick of the quality tests.

Why a module: the CPU quality tests (tests/test_convergence.py, the FP8-activation recipe's test) and the seed studies
(tools/v_codec_seeds.py) must train *exactly* the same way for their numbers to be comparable across files and
sessions — one definition instead of three copies. TinyGPT 2×64 (SwiGLU, 64-byte context) on the first MiB of the
stdlib byte corpus, AdamW lr 3e-3 / weight decay 0.01, batch 16, no schedule; the result is the mean train loss of the
last 10 steps (less noisy than one step) and the loss on 4 fixed held-out batches of 32 (the same for every level and
seed). ``seed`` sets the initial weights and the training batches. The CLI (:mod:`lowbit_amp.train_loop`) is the
larger, configurable run; this one is small enough for CI.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

import lowbit_amp as amp
from lowbit_amp.data import BatchSampler, load_stdlib_corpus
from lowbit_amp.data.stdlib_text import ByteCorpus
from lowbit_amp.models import TinyGPT, TinyGPTConfig

__all__ = ["PARITY_CONFIG", "ParityResult", "parity_run"]

PARITY_CONFIG = TinyGPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, mlp="swiglu")


@dataclass
class ParityResult:
    train_last10: float
    val_loss: float
    losses: list[float]
    model: torch.nn.Module

    def gap_to(self, base: "ParityResult") -> float:
        """The larger of the relative |val| and |last-10 train| loss differences to ``base`` (0.02 = 2%)."""
        return max(abs(self.val_loss - base.val_loss) / base.val_loss,
                   abs(self.train_last10 - base.train_last10) / base.train_last10)


@functools.lru_cache(maxsize=None)
def _corpus() -> ByteCorpus:
    return load_stdlib_corpus(max_bytes=1 << 20)


def parity_run(level: str, *, seed: int = 0, steps: int = 120, overrides: dict[str, Any] | None = None,
               lr: float = 3e-3) -> ParityResult:
    """Train the recipe at ``level`` (plus dotted-key ``overrides`` for ``amp.initialize``) and score it. ``lr``: for
    recipes that change the parametrisation (unit scaling's N(0, 1) weights want a larger step)."""
    config = amp.resolve_config(level, dict(overrides or {}))
    torch.manual_seed(seed)
    data = _corpus()
    model = TinyGPT(dataclasses.replace(PARITY_CONFIG, unit_scaled_loss=config.unit_scaling.enabled), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model, opt = amp.initialize(model, opt, opt_level=config)
    sampler = BatchSampler(data.train, 16, PARITY_CONFIG.block_size, torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        x, y = sampler.sample()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    val = BatchSampler(data.val, 32, PARITY_CONFIG.block_size, torch.Generator().manual_seed(1))
    with torch.no_grad():
        val_loss = sum(model(*val.sample())[1].item() for _ in range(4)) / 4
    return ParityResult(sum(losses[-10:]) / 10, val_loss, losses, model)
