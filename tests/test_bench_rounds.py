"""bench/rounds.py, the interleaved-rounds protocol behind the speed ratios that sit near targets (issues 5, 6): the
ratio is taken within each round and then summarized, so a drift common to both variants cancels."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "rounds.py"
_SPEC = importlib.util.spec_from_file_location("bench_rounds", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
rounds = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rounds)


def test_common_drift_cancels_within_rounds() -> None:
    """The GPU slows by 20% over the run; both variants slow together: every per-round ratio is exactly 1.5, while
    the ratio of the two variants' medians would not be if the rounds were not paired."""
    log = [{"bf16": 0.75 * d, "int8": 0.5 * d} for d in (1.0, 1.05, 1.1, 1.15, 1.2)]
    out = rounds.summarize(log, ["bf16", "int8"], lambda name: "bf16")
    assert out["int8"]["ratio_median"] == pytest.approx(1.5)
    assert out["int8"]["ratio_min"] == pytest.approx(1.5) and out["int8"]["ratio_max"] == pytest.approx(1.5)
    assert out["bf16"]["ratio_median"] == 1.0
    assert out["int8"]["ms_median"] == pytest.approx(0.5 * 1.1)


def test_median_min_max_of_per_round_ratios() -> None:
    log = [{"b": 10.0, "x": 5.0}, {"b": 12.0, "x": 10.0}, {"b": 9.0, "x": 6.0}]  # ratios 2.0, 1.2, 1.5
    out = rounds.summarize(log, ["x"], lambda name: "b")["x"]
    assert (out["ratio_median"], out["ratio_min"], out["ratio_max"]) == pytest.approx((1.5, 1.2, 2.0))
    assert rounds.per_round_ratios(log, "x", "b") == pytest.approx([2.0, 1.2, 1.5])


def test_names_without_a_timed_baseline_get_times_only() -> None:
    log = [{"bf16_eager": 40.0, "lowbit_O1_compile": 30.0}]
    out = rounds.summarize(log, ["lowbit_O1_compile"], lambda name: "bf16_compile")
    assert "ratio_median" not in out["lowbit_O1_compile"] and out["lowbit_O1_compile"]["ms_median"] == 30.0


def test_bad_logs_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no rounds"):
        rounds.summarize([], ["x"], lambda name: "b")
    with pytest.raises(KeyError, match="round 1 has no time"):
        rounds.per_round_ratios([{"x": 1.0, "b": 1.0}, {"x": 1.0}], "x", "b")
    with pytest.raises(ValueError, match="times must be positive"):
        rounds.per_round_ratios([{"x": 0.0, "b": 1.0}], "x", "b")
