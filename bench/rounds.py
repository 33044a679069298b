"""Ratios from interleaved rounds: the protocol behind every speed ratio that sits near a target.

Why: on the H200 the bf16 baselines run at the GPU's power cap and their time moves by more between runs (0.71-0.85
ms for the 16384x4096x4096 GEMM, 41.9-44.6 ms for the compiled anchor step) than the gaps to issue 5's and 6's
targets. Timing each variant once, one after the other, lets each see a different clock; timing them in alternating
rounds and taking the ratio *within* each round cancels the common drift. The summary is the median of the per-round
ratios and their range, never a ratio of medians. Used by bench_all.py (``E2E_ROUNDS``) and bench_int8.py
(``--rounds``); pure Python so tests/test_bench_rounds.py checks it on CPU.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence


def per_round_ratios(log: Sequence[Mapping[str, float]], name: str, baseline: str) -> list[float]:
    """``baseline time / name time`` in each round (> 1: ``name`` is faster)."""
    for i, row in enumerate(log):
        if name not in row or baseline not in row:
            raise KeyError(f"round {i} has no time for {name!r} or its baseline {baseline!r}: {sorted(row)}")
        if not row[name] > 0 or not row[baseline] > 0:
            raise ValueError(f"round {i}: times must be positive, got {name}={row[name]} {baseline}={row[baseline]}")
    return [row[baseline] / row[name] for row in log]


def summarize(log: Sequence[Mapping[str, float]], names: Sequence[str],
              baseline_of: Callable[[str], str | None]) -> dict[str, dict]:
    """Per name: the median time, and (where ``baseline_of(name)`` is a timed name) the median, min and max of its
    per-round ratios to that baseline. A name whose baseline is itself gets ratio 1."""
    if not log:
        raise ValueError("no rounds to summarize")
    out: dict[str, dict] = {}
    for name in names:
        entry: dict = {"ms_median": statistics.median(row[name] for row in log)}
        base = baseline_of(name)
        if base is not None and base in log[0]:
            ratios = per_round_ratios(log, name, base)
            entry.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        out[name] = entry
    return out
