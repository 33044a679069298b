"""LowBitLinear under ``torch.compile``: no graph breaks inside the layer, delayed scaling included, same numbers as eager.

Why this matters: Transformer Engine's delayed-scaling recipe refuses to run under ``torch.compile``; ours keeps the
amax history in buffers (updated in-graph by ``record`` and outside it by the manager), and the per-version weight cache
(Python-side state) is bypassed while compiling, so Dynamo captures forward and backward as one graph each.
CPU compile needs a C++ compiler for Inductor; the graph-capture checks run without one.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from lowbit_amp.config import LinearConfig
from lowbit_amp.nn.linear import LowBitLinear
from lowbit_amp.scaling.manager import ScalingManager
from lowbit_amp.scaling.state import ScalingState


def _warm_model(layers: int = 2) -> tuple[nn.Module, ScalingManager]:
    """FP8 layers (O1 defaults: delayed input/grad scaling, current weight scaling), past their first update."""
    torch.manual_seed(0)
    cfg = LinearConfig()
    assert cfg.input.scaling.algo == "delayed" and cfg.grad_output.scaling.algo == "delayed"
    mods: list[nn.Module] = [LowBitLinear(48, 64, config=cfg)]
    if layers == 2:
        mods += [nn.GELU(), LowBitLinear(64, 48, bias=False, config=cfg)]
    model = nn.Sequential(*mods)
    manager = ScalingManager(model)
    model(torch.randn(3, 5, 48)).square().mean().backward()
    manager.update()
    assert all(s._warm for s in manager.states), "delayed states must be warm so the delayed (not JIT) path is traced"
    model.zero_grad(set_to_none=True)
    return model, manager


def test_dynamo_captures_the_layer_in_one_graph() -> None:
    model, _ = _warm_model()
    explanation = torch._dynamo.explain(model)(torch.randn(3, 5, 48, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


_HAS_CXX = shutil.which("g++") is not None or shutil.which("gcc") is not None
BACKENDS = [
    # aot_eager: Dynamo + AOTAutograd capture forward and backward (buffer mutations included) with no C++ build.
    pytest.param("aot_eager", 2, id="aot_eager-2layers"),
    # inductor: what users run; one layer keeps the CPU C++ build to ~15 s.
    pytest.param("inductor", 1, id="inductor-1layer", marks=pytest.mark.skipif(
        not _HAS_CXX, reason="Inductor on CPU needs a C++ compiler (g++/gcc) on PATH")),
]


@pytest.mark.parametrize(("backend", "layers"), BACKENDS)
def test_fullgraph_compiled_step_matches_eager_with_delayed_scaling(backend: str, layers: int) -> None:
    torch._dynamo.reset()
    model, _ = _warm_model(layers)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(3, 5, 48)
    x_eager = x.clone().requires_grad_()
    x_comp = x.clone().requires_grad_()
    y_eager = eager(x_eager)
    y_comp = compiled(x_comp)
    y_eager.square().mean().backward()
    y_comp.square().mean().backward()
    # Same FP8 casts and GEMMs; Inductor may reorder FP32 sums in the emulated GEMMs, so allow float32 rounding.
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-4, atol=1e-5)
    for p_comp, p_eager in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p_comp.grad, p_eager.grad, rtol=1e-4, atol=1e-5)
    # Delayed scaling recorded this step's amaxes inside the compiled forward AND backward graphs.
    states_comp = [m for m in model.modules() if isinstance(m, ScalingState) and m.delayed]
    states_eager = [m for m in eager.modules() if isinstance(m, ScalingState) and m.delayed]
    assert len(states_comp) == 3 * layers  # input, weight (delayed by default since 2026-12-01) and grad_output
    for s_comp, s_eager in zip(states_comp, states_eager):
        assert s_eager.pending_amax.item() > 0
        assert torch.equal(s_comp.pending_amax, s_eager.pending_amax)
        assert torch.equal(s_comp.scale, s_eager.scale)


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not _HAS_CXX, reason="Inductor on CPU needs a C++ compiler")),
])
def test_compiled_graph_folds_amaxes_through_the_cast_op(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path CUDA takes under ``torch.compile``: every cast through ``lowbit_amp::fp8_cast``, whose schema declares
    the state's ``pending_amax`` / ``nonfinite_count`` as mutated and whose kernel folds the amax into them. On CPU the
    op gets a reference implementation for this test only (same formula as the kernel: scale = min(1/amax · target,
    MAX_SCALE), saturating cast, max/add fold), so the graph plumbing — functionalisation of the in-place fold in the
    forward *and* backward graphs, and Inductor's re-inplacing onto the buffers — is checked without a GPU: outputs,
    gradients and every delayed state equal eager's reference path."""
    from lowbit_amp.kernels import dispatch
    from lowbit_amp.quant.cast import MAX_SCALE

    def reference_cast(x, scale, scratch, pending, nonfinite, out_dtype, fmt_max, target, current, record,  # type: ignore[no-untyped-def]
                       want_transpose):
        calls.append(bool(record))
        xf = x.float()
        amax = xf.abs().amax()
        if current:
            usable = (amax > 0) & torch.isfinite(amax)
            used = torch.where(usable, torch.clamp(amax.reciprocal() * target, max=MAX_SCALE), 1.0)
        else:
            used = scale.float()
        lp = torch.clamp(xf * used, -fmt_max, fmt_max).to(out_dtype)
        lp_t = lp.t().contiguous() if want_transpose else lp.new_empty((0,))
        scale_out = torch.zeros(8)
        scale_out[0], scale_out[4] = used, used.reciprocal()
        if record:
            scale_out[1] = amax  # the kernel's slot for a sibling sharing the cast
            finite = torch.isfinite(amax)
            pending.copy_(torch.maximum(pending, torch.where(finite, amax, 0.0)))
            nonfinite.add_((~finite).long())
        return lp, lp_t, scale_out

    calls: list[bool] = []
    lib = torch.library.Library("lowbit_amp", "IMPL")
    try:
        lib.impl("fp8_cast", reference_cast, "CPU")
        torch._dynamo.reset()
        model, _ = _warm_model(2)
        eager = copy.deepcopy(model)
        for a, b in zip(model.modules(), eager.modules()):
            if isinstance(a, ScalingState):
                b._warm = a._warm

        def route(x, state, rounding="nearest", enabled=True):  # type: ignore[no-untyped-def]
            # the op while tracing; eager keeps the CPU reference path
            return None if torch.compiler.is_compiling() else "eager CPU reference"

        monkeypatch.setattr(dispatch, "fused_cast_unavailable", route)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        x = torch.randn(3, 5, 48)
        x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager, y_comp = eager(x_eager), compiled(x_comp)
        y_eager.square().mean().backward()
        y_comp.square().mean().backward()
        # 2 layers x (x, W forward; dy backward), every state delayed: six recording calls of the op
        assert calls.count(True) == 6, calls
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-4, atol=1e-5)
        states = [(a, b) for a, b in zip(model.modules(), eager.modules()) if isinstance(a, ScalingState) and a.delayed]
        assert len(states) == 6
        for s_comp, s_eager in states:
            assert s_eager.pending_amax.item() > 0
            assert torch.equal(s_comp.pending_amax, s_eager.pending_amax)
            assert torch.equal(s_comp.nonfinite_count, s_eager.nonfinite_count)
    finally:
        lib._destroy()
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not _HAS_CXX, reason="Inductor on CPU needs a C++ compiler")),
])
@pytest.mark.parametrize("preset", ["int8", "configs/int8_block.yaml"])
def test_int8_layers_compile_in_one_graph_and_match_eager(backend: str, preset: str) -> None:
    """INT8 layers under ``torch.compile(fullgraph=True)`` on CPU (the reference kernels): no graph break — the
    per-step weight cache, keyed by ``data_ptr``, broke the graph at every layer until it was bypassed while compiling
    — and the same outputs, gradients and fallback fractions as eager. (On CUDA the Triton INT8 launchers are not
    traceable yet; see docs/limitations.md.) Inductor by default drops the bf16 rounding of the reference's hp fallback
    operands (``x.to(bf16).float()`` fused into one fp32 value): ``emulate_precision_casts`` keeps eager's bits."""
    import warnings

    import torch._inductor.config as inductor_config

    import lowbit_amp as amp

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = amp.initialize(model, opt_level=preset)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 64, 256)
    x[0, :20, 130:200] *= 80.0  # an outlier tile: the fallback path is traced too
    x_e, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with inductor_config.patch(emulate_precision_casts=True):
        y_c = compiled(x_c)
        y_e = eager(x_e)
        torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-4)
        y_c.square().mean().backward()
        y_e.square().mean().backward()
    torch.testing.assert_close(x_c.grad, x_e.grad, rtol=1e-4, atol=1e-5)
    for p_c, p_e in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5)
    fractions = [(a.fallback_fraction, b.fallback_fraction) for a, b in zip(model.modules(), eager.modules())
                 if hasattr(a, "fallback_fraction")]
    assert fractions and float(fractions[0][1]) > 0
    for f_c, f_e in fractions:
        assert torch.equal(f_c, f_e)
    torch._dynamo.reset()


def test_int8_row_layers_compile_through_the_int8_ops() -> None:
    """The row layout's quantizer and GEMM appear in the compiled forward and backward graphs as the opaque
    ``lowbit_amp::int8_quantize_rows`` / ``int8_row_mm`` ops (lowbit_amp/int8/compiled_ops.py): what lets CUDA's Triton
    launchers, which Dynamo cannot trace, sit inside a graph."""
    import warnings

    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    import lowbit_amp as amp

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = amp.initialize(model, opt_level="int8")
    graphs: list[str] = []

    def keep(gm, _inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(torch.randn(4, 64, 256, requires_grad=True)).square().mean().backward()
    assert len(graphs) == 2
    for code in graphs:  # forward: x and W per layer; backward: dy, Wᵀ, xᵀ, dyᵀ per layer
        assert "lowbit_amp.int8_quantize_rows" in code and "lowbit_amp.int8_row_mm" in code
    torch._dynamo.reset()
