"""The analysis half of bench/trace_gaps.py on a synthetic trace (the profiling half needs a GPU): busy time, span, idle
time, and which host op each idle gap waited for — the numbers docs/performance.md quotes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def trace_gaps():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("trace_gaps", BENCH / "trace_gaps.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _kernel(name: str, ts: float, dur: float, corr: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts: float, corr: int, tid: int = 1) -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
            "args": {"correlation": corr}}


def _op(name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_idle_gaps_are_measured_and_attributed(trace_gaps) -> None:  # type: ignore[no-untyped-def]
    events = [
        _op("aten::mm", 0, 10), _launch(1, 1),
        _op("lowbit_amp::fp8_cast", 100, 60), _op("aten::empty", 110, 5), _launch(140, 2),  # outer op launches
        _op("aten::add", 300, 5, tid=2), _launch(301, 3, tid=2),
        _kernel("gemm", 5, 100, 1),            # 5..105
        _kernel("cast", 150, 100, 2),          # idle 105..150: waited for fp8_cast's launch
        _kernel("add", 250, 50, 3),            # back to back
    ]
    report = trace_gaps.analyse("synthetic", events, steps=1)
    assert report["busy_ms_per_step"] == pytest.approx(0.25)
    assert report["span_ms_per_step"] == pytest.approx(0.295)
    assert report["idle_ms_per_step"] == pytest.approx(0.045)
    (gap,) = report["largest_gaps"]
    assert gap["gap_us"] == pytest.approx(45.0) and gap["after"] == "cast" and gap["before"] == "gemm"
    assert gap["launched_by"] == "lowbit_amp::fp8_cast"  # innermost op *containing* the launch (aten::empty ended)
    assert report["gap_us_by_launching_op"] == {"lowbit_amp::fp8_cast": 45.0}
