"""GPU-only: the fused Triton casts produce the reference's bytes, scales and state updates, and a LowBitLinear step
with the kernels equals one without them bit for bit. Skipped without CUDA (the CPU runs the reference itself)."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch

from lowbit_amp.capability import fp8_gemm_supported
from lowbit_amp.config import LinearConfig, ScalingConfig
from lowbit_amp.kernels.dispatch import fused_cast_unavailable
from lowbit_amp.nn.linear import LowBitLinear
from lowbit_amp.quant.operand import quantize_operand
from lowbit_amp.scaling.manager import ScalingManager
from lowbit_amp.scaling.state import ScalingState

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")

SHAPES = [(16, 16), (37, 100), (128, 256), (1000, 333), (4096, 1024), (5, 3)]


def _state(algo: str, fmt: str, margin: int = 0, warm_scale: float | None = None) -> ScalingState:
    cfg = ScalingConfig(algo=algo, margin=margin, static_scale=3.0) if algo == "static" else \
        ScalingConfig(algo=algo, margin=margin)
    state = ScalingState(cfg, fmt).cuda()
    if warm_scale is not None:
        state.scale.fill_(warm_scale)
        state.pending_amax.fill_(0.25)
        state.has_history.fill_(True)
        state._warm = True
    return state


def _data(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # Six decades of magnitude per column: hits subnormals, saturation and round-to-even ties of both formats.
    x = torch.randn(shape, device="cuda", generator=gen) * torch.logspace(-3, 3, shape[1], device="cuda")
    return x.to(dtype)


def _check(x: torch.Tensor, state: ScalingState) -> None:
    ref_state = copy.deepcopy(state)
    ref_state._warm = state._warm
    assert fused_cast_unavailable(x, state) is None
    lp, lp_t, scale, scale_inv, amax = _fused(x, state)
    ref_lp, ref_scale = quantize_operand(x, ref_state)
    # The recorded amax comes back for a sibling layer sharing this cast (lowbit_amp/nn/shared_input_cast.py).
    if state.delayed:
        assert torch.equal(amax, x.float().abs().amax()), (amax, x.float().abs().amax())
    else:
        assert amax is None
    assert torch.equal(lp.view(torch.uint8), ref_lp.view(torch.uint8))
    assert torch.equal(lp_t.view(torch.uint8), ref_lp.t().contiguous().view(torch.uint8))
    assert torch.equal(scale, ref_scale.float())
    assert torch.equal(scale_inv, ref_scale.float().reciprocal())
    for name in ("scale", "pending_amax", "nonfinite_count", "amax_history"):
        assert torch.equal(getattr(state, name), getattr(ref_state, name)), name


def _fused(x: torch.Tensor, state: ScalingState):  # type: ignore[no-untyped-def]
    from lowbit_amp.kernels.fp8_cast import fused_quantize

    return fused_quantize(x, state, True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("mode", ["current", "delayed_cold", "delayed_warm", "static", "current_margin2"])
def test_fused_cast_is_bitwise_the_reference(shape, dtype, fmt, mode) -> None:  # type: ignore[no-untyped-def]
    x = _data(shape, dtype, seed=zlib.crc32(repr((shape, dtype, fmt, mode)).encode()))  # per-case, reproducible
    if mode == "current":
        state = _state("current", fmt)
    elif mode == "current_margin2":
        state = _state("current", fmt, margin=2)
    elif mode == "delayed_cold":
        state = _state("delayed", fmt)
    elif mode == "delayed_warm":
        state = _state("delayed", fmt, warm_scale=float(_state("current", fmt).fmt.max) / float(x.abs().amax()) * 0.5)
    else:
        state = _state("static", fmt)
    _check(x, state)
    if mode == "delayed_warm":  # again: the scratch word must have been reset by the last program
        _check(_data(shape, dtype, seed=7), state)


@pytest.mark.parametrize("mode", ["current", "delayed_warm"])
def test_edge_values_zero_inf_nan_and_strides(mode: str) -> None:
    def fresh() -> ScalingState:
        return _state("current", "e4m3") if mode == "current" else _state("delayed", "e4m3", warm_scale=2.0)

    _check(torch.zeros(64, 48, device="cuda", dtype=torch.bfloat16), fresh())  # amax 0: scale falls back
    x = _data((96, 80), torch.bfloat16, 3)
    x[5, 7] = float("inf")
    _check(x, fresh())  # inf: non-finite amax -> fallback scale, counted, saturates to max
    base = _data((80, 96), torch.bfloat16, 4)
    _check(base.t(), fresh())  # a transposed (non-contiguous) view
    y = _data((96, 80), torch.float32, 5)
    y[1, 2] = float("nan")
    state = fresh()
    ref_state = copy.deepcopy(state)
    ref_state._warm = state._warm
    lp, _, scale, _, _ = _fused(y, state)
    ref_lp, ref_scale = quantize_operand(y, ref_state)
    finite = ~torch.isnan(ref_lp.float())
    assert torch.equal(torch.isnan(lp.float()), ~finite)
    assert torch.equal(lp.view(torch.uint8)[finite], ref_lp.view(torch.uint8)[finite])
    assert torch.equal(scale, ref_scale.float())
    for name in ("pending_amax", "nonfinite_count"):
        assert torch.equal(getattr(state, name), getattr(ref_state, name)), name


@pytest.mark.skipif(not fp8_gemm_supported("cuda")[0], reason="FP8 GEMMs need compute capability 8.9+")
@pytest.mark.parametrize(("m", "k", "n"), [(256, 512, 384), (100, 64, 48)])
def test_layer_with_kernels_equals_layer_without(m: int, k: int, n: int) -> None:
    """Three training steps (delayed scaling warms up after the first): outputs, grads and states are identical."""
    torch.manual_seed(0)
    base = LowBitLinear(k, n, bias=True, device="cuda", dtype=torch.bfloat16, config=LinearConfig(fused_cast=True))
    runs = {}
    for fused in (True, False):
        layer = copy.deepcopy(base)
        layer.lb_config = LinearConfig(fused_cast=fused)
        manager = ScalingManager(layer)
        opt = torch.optim.SGD(layer.parameters(), lr=0.01)
        outs = []
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(3):
            x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            y = layer(x)
            y.float().square().mean().backward()
            outs += [y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
            opt.step()
            opt.zero_grad(set_to_none=True)
            manager.update()
        outs += [b.clone() for b in layer.buffers()]
        runs[fused] = outs
    for got, want in zip(runs[True], runs[False]):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------ the custom op (compiled graphs' path)
@pytest.mark.parametrize("shape", [(16, 16), (1000, 333), (4096, 1024)], ids=str)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("mode", ["current", "delayed_cold", "delayed_warm", "static"])
def test_custom_op_path_is_bitwise_the_reference(shape, fmt, mode) -> None:  # type: ignore[no-untyped-def]
    """``lowbit_amp::fp8_cast`` (its in-place state fold included) gives the reference's bytes and state updates too."""
    from lowbit_amp.kernels.fp8_cast_op import traceable_fused_quantize

    x = _data(shape, torch.bfloat16, seed=zlib.crc32(repr((shape, fmt, mode, "op")).encode()))
    warm = float(_state("current", fmt).fmt.max) / float(x.abs().amax()) * 0.5
    state = {"current": lambda: _state("current", fmt), "delayed_cold": lambda: _state("delayed", fmt),
             "delayed_warm": lambda: _state("delayed", fmt, warm_scale=warm),
             "static": lambda: _state("static", fmt)}[mode]()
    ref_state = copy.deepcopy(state)
    ref_state._warm = state._warm
    lp, lp_t, scale, scale_inv, amax = traceable_fused_quantize(x, state, True)
    assert (amax is None) == (not state.delayed)
    if amax is not None:
        assert torch.equal(amax, x.float().abs().amax())
    ref_lp, ref_scale = quantize_operand(x, ref_state)
    assert torch.equal(lp.view(torch.uint8), ref_lp.view(torch.uint8))
    assert torch.equal(lp_t.view(torch.uint8), ref_lp.t().contiguous().view(torch.uint8))
    assert torch.equal(scale, ref_scale.float()) and torch.equal(scale_inv, ref_scale.float().reciprocal())
    for name in ("scale", "pending_amax", "nonfinite_count"):
        assert torch.equal(getattr(state, name), getattr(ref_state, name)), name


def test_custom_op_passes_opcheck() -> None:
    """Schema, fake (meta) implementation and the real one agree (torch.library.opcheck)."""
    x = _data((96, 80), torch.bfloat16, 11)
    scale = torch.tensor(2.0, device="cuda")
    scratch = torch.zeros(2, dtype=torch.int32, device="cuda")  # a state's cast_scratch: left all-zero by the op
    amax = x.float().abs().max()
    for current, record, want_t in [(True, False, True), (False, True, True), (False, True, False), (True, True, True)]:
        for before in (0.0, 2 * float(amax)):  # the fold is a max into the state's pending amax
            pending = torch.tensor(before, device="cuda")
            nonfinite = torch.tensor(3, dtype=torch.int64, device="cuda")
            args = (x, scale, scratch, pending, nonfinite, torch.float8_e4m3fn, 448.0, 448.0, current, record, want_t)
            torch.library.opcheck(torch.ops.lowbit_amp.fp8_cast.default, args,
                                  test_utils=("test_schema", "test_faketensor"))
            assert not scratch.any(), "the op must leave the scratch words zeroed"
            pending.fill_(before)
            outs = torch.ops.lowbit_amp.fp8_cast.default(*args)
            assert len(outs) == 3
            expected = torch.maximum(amax, torch.tensor(before, device="cuda")) if record else before
            assert torch.equal(pending, torch.as_tensor(expected, device="cuda")), "pending: max(before, amax)"
            assert nonfinite.item() == 3, "nonfinite count unchanged by finite data"


@pytest.mark.skipif(not fp8_gemm_supported("cuda")[0], reason="FP8 GEMMs need compute capability 8.9+")
@pytest.mark.parametrize("via_triton_op", [False, True])
def test_compiled_layer_uses_the_kernel_and_matches_eager(via_triton_op: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor, fullgraph: the compiled O1 layer calls lowbit_amp::fp8_cast (no graph break) — or, with
    ``VIA_TRITON_OP``, Inductor launches the cast kernel itself (lowbit_amp::fp8_cast_t, a triton_op) — and gives
    eager's FP8 bytes: output equal, gradients equal up to Inductor's reordering of the bias-gradient sum, states
    equal."""
    from torch._inductor.utils import run_and_get_code

    from lowbit_amp.kernels import fp8_cast_op

    fp8_cast_op.set_via_triton_op(via_triton_op)
    monkeypatch.setattr(fp8_cast_op, "VIA_TRITON_OP", via_triton_op)  # restored after the test
    torch.manual_seed(0)
    torch._dynamo.reset()
    layers = [LowBitLinear(256, 384, bias=True, device="cuda", dtype=torch.bfloat16, config=LinearConfig()),
              LowBitLinear(384, 256, bias=False, device="cuda", dtype=torch.bfloat16, config=LinearConfig())]
    model = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1])
    manager = ScalingManager(model)
    x0 = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    model(x0).float().square().mean().backward()
    manager.update()
    model.zero_grad(set_to_none=True)
    eager = copy.deepcopy(model)
    for a, b in zip(model.modules(), eager.modules()):
        if isinstance(a, ScalingState):
            b._warm = a._warm
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    y_c, code = run_and_get_code(lambda: compiled(x))
    if via_triton_op:  # the generated code launches the kernel; the dispatcher op is gone
        assert any("_cast_kernel" in c for c in code), "the cast kernel is not launched by Inductor"
        assert not any("torch.ops.lowbit_amp.fp8_cast.default" in c for c in code)
    else:
        assert any("lowbit_amp.fp8_cast" in c or "lowbit_amp::fp8_cast" in c for c in code), "kernel not in the graph"
    y_e = eager(x)
    assert torch.equal(y_c, y_e)
    y_c.float().square().mean().backward()
    y_e.float().square().mean().backward()
    for p_c, p_e in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-2, atol=1e-3)
    for a, b in zip(model.modules(), eager.modules()):
        if isinstance(a, ScalingState):
            assert torch.equal(a.pending_amax, b.pending_amax) and torch.equal(a.nonfinite_count, b.nonfinite_count)
