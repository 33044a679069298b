"""Which casts the fused kernels serve (CPU-runnable: the decision logic, not the kernels)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lowbit_amp.config import LinearConfig, ScalingConfig
from lowbit_amp.kernels import dispatch
from lowbit_amp.kernels.dispatch import fused_cast_unavailable
from lowbit_amp.nn.linear import LowBitLinear
from lowbit_amp.quant.operand import quantize_operand, quantize_operand_t
from lowbit_amp.scaling.state import ScalingState


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device, to reach the checks after the device check without a GPU."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def _fake_cuda(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(_FakeCuda)


def test_cpu_tensors_run_the_reference() -> None:
    state = ScalingState(ScalingConfig(), "e4m3")
    reason = fused_cast_unavailable(torch.randn(4, 4), state)
    assert reason is not None and "CUDA-only" in reason


def test_config_switch_wins() -> None:
    state = ScalingState(ScalingConfig(), "e4m3")
    assert "fused_cast=False" in fused_cast_unavailable(_fake_cuda(torch.randn(4, 4)), state, enabled=False)


@pytest.mark.parametrize(
    ("kwargs", "fmt", "shape", "dtype", "rounding", "expect"),
    [
        ({}, "e4m3", (8, 16), torch.bfloat16, "nearest", None),
        ({"algo": "current"}, "e5m2", (3, 5), torch.float32, "nearest", None),
        ({"algo": "static", "static_scale": 2.0}, "e4m3", (8, 16), torch.float16, "nearest", None),
        ({"algo": "current", "granularity": "row"}, "e4m3", (8, 16), torch.bfloat16, "nearest", "tensorwise only"),
        ({}, "int8", (8, 16), torch.bfloat16, "nearest", "E4M3/E5M2 only"),
        ({"power_of_2": True}, "e4m3", (8, 16), torch.bfloat16, "nearest", "power-of-2"),
        ({}, "e4m3", (8, 16), torch.bfloat16, "stochastic", "nearest only"),
        ({}, "e4m3", (0, 16), torch.bfloat16, "nearest", "non-empty 2-D"),
        ({}, "e4m3", (2, 8, 16), torch.bfloat16, "nearest", "non-empty 2-D"),
        ({}, "e4m3", (8, 16), torch.float64, "nearest", "bf16/fp16/fp32"),
    ],
)
def test_decision_table(kwargs, fmt, shape, dtype, rounding, expect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(dispatch, "_TRITON_IMPORTABLE", True)
    state = ScalingState(ScalingConfig(**kwargs), fmt)
    reason = fused_cast_unavailable(_fake_cuda(torch.zeros(shape, dtype=dtype)), state, rounding=rounding)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


def test_missing_triton_is_a_reason_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_TRITON_IMPORTABLE", False)
    state = ScalingState(ScalingConfig(), "e4m3")
    assert "triton" in fused_cast_unavailable(_fake_cuda(torch.zeros(8, 16)), state)


def test_under_compile_the_kernel_serves_as_a_custom_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled graphs call the same kernel through ``lowbit_amp::fp8_cast`` (the eager launcher is not traceable)."""
    from lowbit_amp.quant import operand

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(dispatch, "_TRITON_IMPORTABLE", True)
    state = ScalingState(ScalingConfig(), "e4m3")
    x = _fake_cuda(torch.zeros(8, 16, dtype=torch.bfloat16))
    assert fused_cast_unavailable(x, state) is None
    calls: list[bool] = []
    made = tuple(torch.zeros(1) for _ in range(5))
    monkeypatch.setattr(operand, "traceable_fused_quantize", lambda x2d, st, want_t: calls.append(want_t) or made)
    assert quantize_operand_t(x, state, True) == made[:4] and calls == [True]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert "lowbit_amp::fp8_cast" in str(torch.ops.lowbit_amp.fp8_cast.default._schema)


@pytest.mark.parametrize("shape", [(37, 100), (16, 32)])
def test_reference_path_of_quantize_operand_t(shape: tuple[int, int]) -> None:
    """On CPU: the same bytes and state updates as quantize_operand, plus the contiguous transpose."""
    x = torch.randn(shape) * 5
    s1, s2 = ScalingState(ScalingConfig(), "e5m2"), ScalingState(ScalingConfig(), "e5m2")
    lp, lp_t, scale, scale_inv = quantize_operand_t(x, s1, want_transpose=True)
    ref_lp, ref_scale = quantize_operand(x, s2)
    assert torch.equal(lp.view(torch.uint8), ref_lp.view(torch.uint8))
    assert lp_t.is_contiguous() and torch.equal(lp_t.view(torch.uint8), ref_lp.view(torch.uint8).t())
    assert torch.equal(scale, ref_scale) and scale_inv is None
    assert torch.equal(s1.pending_amax, s2.pending_amax) and s1.pending_amax.item() > 0
    assert quantize_operand_t(x, s1, want_transpose=False)[1] is None


def test_weight_cache_holds_the_transpose_made_in_the_same_cast() -> None:
    layer = LowBitLinear(32, 48, config=LinearConfig())
    w_lp, _ = layer.quantized_weight(with_transpose=True)
    w_t = layer.quantized_weight_t(w_lp)
    assert w_t.shape == (32, 48) and torch.equal(w_t.view(torch.uint8), w_lp.view(torch.uint8).t())
    assert layer.quantized_weight_t(w_lp) is w_t  # made once per weight version
    assert layer.quantized_weight_scale_inv(w_lp) is None  # the reference path leaves the reciprocal to the GEMM


def test_import_does_not_import_triton() -> None:
    code = "import sys, lowbit_amp, lowbit_amp.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
