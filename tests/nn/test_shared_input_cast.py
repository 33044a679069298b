"""Sibling layers fed the same tensor share its FP8 cast (lowbit_amp/nn/shared_input_cast.py).

The claim to hold: sharing changes no number. Layers always fed the same tensor have the same amax history, so the
shared cast is the cast each would have made; over several optimizer steps (delayed scaling warming up, then in use)
the outputs, every gradient and every scaling buffer equal the unshared run bit for bit. And it only shares when it
may: not after an in-place change of the input, not across different input configs, not when the cast lacks the
transpose a layer needs; the slot is empty after every forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit_amp as amp
from lowbit_amp.nn import shared_input_cast
from lowbit_amp.quant import operand
from lowbit_amp.scaling.state import ScalingState


class SwiGLU(nn.Module):
    """``w2(silu(w1(h)) * w3(h))``: w1 and w3 are fed the same tensor, w2 another. ``bump``: change ``h`` in place
    between w1 and w3 (sharing must not happen then)."""

    def __init__(self, dim: int = 48, ffn: int = 80, bump: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.bump = bump

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a = F.silu(self.w1(h))
        if self.bump:
            h.mul_(2.0)
        return x + self.w2(a * self.w3(h))


def _setup(share: bool, bump: bool = False, **overrides: object) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SwiGLU(bump=bump)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flat = {"modules.min_gemm_size": 0, "linear.share_input_cast": share, **overrides}
    return amp.initialize(model, opt, opt_level="O1", overrides=flat)


def _count_casts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = operand.cast_operand

    def counting(x2d, state, want_transpose, use_kernel=True):  # type: ignore[no-untyped-def]
        calls.append(x2d.shape[-1])
        return real(x2d, state, want_transpose, use_kernel)

    monkeypatch.setattr(shared_input_cast, "cast_operand", counting)
    return calls


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> list[torch.Tensor]:
    outs = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 7, 48, generator=gen)  # 14 rows: not a multiple of 16
        y = model(x)
        y.square().mean().backward()
        outs.append(y.detach())
        outs.extend(p.grad.clone() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return outs


def _states(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, ScalingState) for b in m.buffers()]


def test_shared_cast_changes_no_number_over_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_casts(monkeypatch)
    shared, opt_s = _setup(share=True)
    out_shared = _train(shared, opt_s)
    shared_calls = len(calls)
    calls.clear()
    plain, opt_p = _setup(share=False)
    out_plain = _train(plain, opt_p)
    # Per forward: the plain model casts h twice (w1, w3) and the w2 input once; the shared one casts h once.
    assert (shared_calls, len(calls)) == (4 * 2, 4 * 3)
    assert all(s._warm for s in shared.modules() if isinstance(s, ScalingState) and s.delayed)
    for a, b in zip(out_shared, out_plain, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_states(shared), _states(plain), strict=True):
        assert torch.equal(a, b)  # w3's history advanced from the recorded amax exactly as if it had cast
    assert shared_input_cast._SLOT == []  # emptied by the model's forward hook


def test_no_sharing_after_an_in_place_change_of_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_casts(monkeypatch)
    shared, opt_s = _setup(share=True, bump=True)
    out_shared = _train(shared, opt_s, steps=2)
    assert len(calls) == 2 * 3  # h's version changed between w1 and w3: w3 casts the new values itself
    plain, opt_p = _setup(share=False, bump=True)
    for a, b in zip(out_shared, _train(plain, opt_p, steps=2), strict=True):
        assert torch.equal(a, b)


def test_no_sharing_across_different_input_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_casts(monkeypatch)
    override = [{"pattern": r"w3$", "linear": {"input": {"scaling": {"margin": 1}}}}]
    model, opt = _setup(share=True, **{"modules.overrides": override})
    _train(model, opt, steps=1)
    assert len(calls) == 3


def test_no_sharing_when_the_cast_lacks_a_transpose_the_layer_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_casts(monkeypatch)
    model, opt = _setup(share=True)
    model.w1.weight.requires_grad_(False)  # w1's cast makes no xᵀ (no weight gradient); w3 needs one
    _train(model, opt, steps=1)
    assert len(calls) == 3
    calls.clear()
    model.w1.weight.requires_grad_(True)
    model.w3.weight.requires_grad_(False)  # w1's cast has the transpose, w3 needs none: shared
    _train(model, opt, steps=1)
    assert len(calls) == 2


def test_slot_is_emptied_when_the_forward_raises() -> None:
    model, _ = _setup(share=True)
    model.w2.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 7, 48))
    assert shared_input_cast._SLOT == []


def test_layers_not_set_up_by_initialize_never_share(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit_amp.config import LinearConfig
    from lowbit_amp.nn.linear import LowBitLinear

    calls = _count_casts(monkeypatch)
    a, b = LowBitLinear(48, 32, config=LinearConfig()), LowBitLinear(48, 32, config=LinearConfig())
    x = torch.randn(5, 48)
    a(x), b(x)
    assert len(calls) == 2 and shared_input_cast._SLOT == []


def test_compiled_model_shares_the_cast_in_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo traces the slot (an ``is`` test between traced tensors, resolved while tracing): fullgraph, two casts
    traced instead of three, and the compiled forward gives eager's numbers and state updates (aot_eager: the same
    ops, no Inductor re-association)."""
    torch._dynamo.reset()
    model, _ = _setup(share=True)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 7, 48)
    calls = _count_casts(monkeypatch)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y_comp = compiled(x)
    assert len(graphs) == 1 and len(calls) == 2  # traced: h once (w1, w3), then w2's input
    y_eager = eager(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    for a, b in zip(_states(model), _states(eager), strict=True):
        assert torch.equal(a, b)
    assert shared_input_cast._SLOT == []
    torch._dynamo.reset()


def test_compiled_model_without_grad_does_not_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under compile the version counter is not readable; with grad off (where changing ``h`` in place between the
    siblings is legal PyTorch) the graph casts each input itself and matches eager, ``bump`` included."""
    torch._dynamo.reset()
    model, _ = _setup(share=True, bump=True)
    eager = copy.deepcopy(model)
    calls = _count_casts(monkeypatch)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        y_comp = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        assert len(calls) == 3
        torch.testing.assert_close(y_comp, eager(x), rtol=0, atol=0)
    torch._dynamo.reset()


def test_slot_is_emptied_by_each_block_that_calls_the_layers() -> None:
    """A block's cast does not outlive the block: blocks compiled one by one (``torch.compile(block)``) start with an
    empty slot — no cast kept alive as a graph output between them — and give eager's numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(SwiGLU(), SwiGLU(), SwiGLU())
    model = amp.initialize(model, opt_level="O1", overrides={"modules.min_gemm_size": 0})
    eager = copy.deepcopy(model)
    seen: list[int] = []
    for block in model:
        block.register_forward_pre_hook(lambda *_: seen.append(len(shared_input_cast._SLOT)))
    for i, block in enumerate(model):
        model[i] = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 7, 48)
    for _ in range(2):
        torch.testing.assert_close(model(x), eager(x), rtol=0, atol=0)
    assert seen == [0] * 6
    h = torch.randn(2, 7, 48)
    eager[0](h)
    assert shared_input_cast._SLOT == []  # a block called on its own empties it too
    torch._dynamo.reset()


def test_inference_mode_runs_and_does_not_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference tensors have no version counter (reading it raises): no sharing there, the same outputs."""
    calls = _count_casts(monkeypatch)
    shared, _ = _setup(share=True)
    plain, _ = _setup(share=False)
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        y_shared, y_plain = shared(x), plain(x)
    assert len(calls) == 6 and torch.equal(y_shared, y_plain)
