"""Delayed / current / static scaling: history, edge cases, batching, checkpointing, and no host sync once warm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit_amp.config import ScalingConfig
from lowbit_amp.formats import E4M3, E5M2
from lowbit_amp.quant.operand import quantize_operand
from lowbit_amp.scaling.manager import ScalingManager
from lowbit_amp.scaling.state import ScalingState


def holder(*states: ScalingState) -> nn.Module:
    m = nn.Module()
    for i, s in enumerate(states):
        m.add_module(f"s{i}", s)
    return m


def test_first_step_falls_back_to_current_scaling() -> None:
    state = ScalingState(ScalingConfig(), E4M3)
    x = torch.full((4, 4), 2.0)
    _, scale = quantize_operand(x, state)
    assert scale.item() == pytest.approx(448.0 / 2.0)
    assert state.pending_amax.item() == 2.0


def test_delayed_scale_uses_history_max_and_lags_one_step() -> None:
    state = ScalingState(ScalingConfig(history_len=3), E4M3)
    mgr = ScalingManager(holder(state))
    for amax in (1.0, 4.0, 2.0):
        quantize_operand(torch.full((2, 2), amax), state)
        mgr.update()
    assert state.amax_history.tolist() == [2.0, 4.0, 1.0]
    assert state.scale.item() == pytest.approx(448.0 / 4.0)
    # the cast this step uses the stored scale, not the current tensor's amax
    _, scale = quantize_operand(torch.full((2, 2), 100.0), state)
    assert scale.item() == pytest.approx(448.0 / 4.0)
    mgr.update()
    assert state.amax_history.tolist() == [100.0, 2.0, 4.0]  # ring: oldest (1.0) dropped
    assert state.scale.item() == pytest.approx(448.0 / 100.0)


def test_most_recent_and_margin_and_pow2() -> None:
    cfg = ScalingConfig(history_len=4, amax_compute="most_recent", margin=1, power_of_2=True)
    state = ScalingState(cfg, E5M2)
    mgr = ScalingManager(holder(state))
    for amax in (8.0, 3.0):
        quantize_operand(torch.full((3,), amax).reshape(1, 3), state)
        mgr.update()
    exact = 57344.0 / (3.0 * 2)
    expected = 2.0 ** math.floor(math.log2(exact))
    assert state.scale.item() == expected


def test_nonfinite_amax_never_enters_the_history() -> None:
    state = ScalingState(ScalingConfig(history_len=4), E4M3)
    mgr = ScalingManager(holder(state))
    quantize_operand(torch.full((2, 2), 3.0), state)
    mgr.update()
    scale_before = state.scale.clone()
    for bad in (math.inf, math.nan):
        x = torch.ones(2, 2)
        x[0, 0] = bad
        quantize_operand(x, state)
        mgr.update()
    assert torch.isfinite(state.amax_history).all()
    assert state.nonfinite_count.item() == 2
    assert torch.equal(state.scale, scale_before)


def test_all_zero_tensor_keeps_previous_scale() -> None:
    state = ScalingState(ScalingConfig(), E4M3)
    mgr = ScalingManager(holder(state))
    quantize_operand(torch.full((2, 2), 7.0), state)
    mgr.update()
    before = state.scale.clone()
    lp, scale = quantize_operand(torch.zeros(2, 2), state)
    mgr.update()
    assert torch.equal(state.scale, before) and torch.equal(scale, before)
    assert lp.float().abs().sum() == 0


def test_unused_state_keeps_its_history() -> None:
    used, unused = ScalingState(ScalingConfig(), E4M3), ScalingState(ScalingConfig(), E4M3)
    mgr = ScalingManager(holder(used, unused))
    quantize_operand(torch.ones(2, 2), used)
    mgr.update()
    assert unused.scale.item() == 1.0 and not bool(unused.has_history) and not unused._warm
    assert used._warm


def test_current_and_static_do_not_record() -> None:
    cur = ScalingState(ScalingConfig(algo="current"), E4M3)
    _, s = quantize_operand(torch.full((2, 2), 4.0), cur)
    assert s.item() == pytest.approx(112.0) and cur.pending_amax.item() == 0.0
    static = ScalingState(ScalingConfig(algo="static", static_scale=8.0), E4M3)
    _, s = quantize_operand(torch.full((2, 2), 4.0), static)
    assert s.item() == 8.0


def test_batched_update_matches_one_by_one() -> None:
    gen = torch.Generator().manual_seed(0)
    cfgs = [ScalingConfig(history_len=5), ScalingConfig(history_len=5, margin=2), ScalingConfig(history_len=3)]
    states_a = [ScalingState(c, f) for c in cfgs for f in (E4M3, E5M2)]
    states_b = [ScalingState(c, f) for c in cfgs for f in (E4M3, E5M2)]
    mgr_a = ScalingManager(holder(*states_a))
    mgrs_b = [ScalingManager(holder(s)) for s in states_b]
    for _ in range(7):
        for a, b in zip(states_a, states_b):
            x = torch.randn(8, 8, generator=gen) * torch.rand((), generator=gen) * 10
            quantize_operand(x, a)
            quantize_operand(x, b)
        mgr_a.update()
        for m in mgrs_b:
            m.update()
    for a, b in zip(states_a, states_b):
        assert torch.equal(a.amax_history, b.amax_history) and torch.equal(a.scale, b.scale)


def test_no_host_sync_once_warm(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ScalingState(ScalingConfig(), E4M3)
    mgr = ScalingManager(holder(state))
    quantize_operand(torch.ones(4, 4), state)
    mgr.update()
    assert state._warm

    def forbidden(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("host sync on the hot path")

    for name in ("item", "tolist", "cpu", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(3):
        quantize_operand(torch.ones(4, 4) * 3, state)
        mgr.update()


def test_state_dict_round_trip_restores_scales_and_warmth() -> None:
    state = ScalingState(ScalingConfig(history_len=4), E4M3)
    mgr = ScalingManager(holder(state))
    for a in (1.0, 5.0):
        quantize_operand(torch.full((2, 2), a), state)
        mgr.update()
    fresh = ScalingState(ScalingConfig(history_len=4), E4M3)
    fresh.load_state_dict(state.state_dict())
    assert fresh._warm
    for name, buf in state.state_dict().items():
        assert torch.equal(buf, fresh.state_dict()[name]), name
    _, s1 = quantize_operand(torch.full((2, 2), 9.0), state)
    _, s2 = quantize_operand(torch.full((2, 2), 9.0), fresh)
    assert torch.equal(s1, s2)


def test_amax_reducer_is_applied_once_for_all_states() -> None:
    states = [ScalingState(ScalingConfig(), E4M3) for _ in range(5)]
    mgr = ScalingManager(holder(*states))
    for s in states:
        quantize_operand(torch.ones(2, 2), s)
    calls = []

    def fake_all_reduce(t: torch.Tensor) -> None:  # another rank saw 10x larger amaxes
        calls.append(t.shape)
        t.mul_(10)

    mgr.update(reducer=fake_all_reduce)
    assert calls == [torch.Size([5])]
    assert all(s.amax_history[0].item() == 10.0 for s in states)
