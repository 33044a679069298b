"""Quality parity: the tiny byte-level GPT trained at each opt level ends within 2% of O0's loss (CPU).

Same seed, same init, same batches for every level; the metric is the mean loss over the last 10 steps (less noisy
than one step) plus a fixed held-out validation batch set.
"""

from __future__ import annotations

import functools

import pytest

from lowbit_amp.parity import parity_run


@functools.lru_cache(maxsize=None)
def run(level: str) -> tuple[float, float, list[float]]:
    """The shared parity recipe (lowbit_amp/parity.py) at seed 0: (mean of the last 10 train losses, held-out loss,
    losses)."""
    result = parity_run(level)
    return result.train_last10, result.val_loss, result.losses


def test_o0_learns() -> None:
    train, val, losses = run("O0")
    assert losses[0] > 5.0 and train < 3.3 and val < 3.6, (losses[0], train, val)


@pytest.mark.parametrize("level", ["O1", "O2", "O3", "int8"])
def test_level_within_2_percent_of_o0(level: str) -> None:
    base_train, base_val, _ = run("O0")
    train, val, losses = run(level)
    assert abs(train - base_train) / base_train <= 0.02, (level, train, base_train)
    assert abs(val - base_val) / base_val <= 0.02, (level, val, base_val)
