"""FSDP2 (fully_shard on gloo, 2 ranks) at O1–O3: losses fall, O1 matches one process on the concatenated batch,
scales stay synchronised, and a full checkpoint saved under world size 2 loads under world size 1."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401  (explicit import: fully_shard lives here)
from torch.distributed.fsdp import fully_shard

import lowbit_amp as amp
from lowbit_amp.distributed import check_scales_synchronized
from lowbit_amp.distributed.fsdp import full_state_dict, fully_shard_lowbit, load_full_state_dict, prepare_optimizer
from tests.distributed._launch import run_ranks
from tests.distributed._models import batch, make_model

STEPS, LR, WORLD = 5, 0.5, 2
LEVELS = ("O1", "O2", "O3")


def _worker(rank: int, world: int) -> dict:
    out: dict = {}
    for level in LEVELS:
        try:
            _train_level(rank, world, level, out)
        except Exception as err:  # recorded so O1's checks still run; the O2/O3 test reports it
            out[f"{level}_error"] = f"{type(err).__name__}: {err}"
            dist.barrier()
    dist.barrier()
    return out


def _train_level(rank: int, world: int, level: str, out: dict) -> None:
    model = amp.initialize(make_model(), opt_level=level)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for block in model.blocks:
            fully_shard_lowbit(block, root=model)
        fully_shard_lowbit(model)
    out[f"{level}_warned_fp8_ag"] = any("weight_all_gather" in str(w.message) for w in caught)
    opt = prepare_optimizer(model, torch.optim.SGD(model.parameters(), lr=LR))
    losses = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = loss.detach().clone()
        dist.all_reduce(loss_t)
        losses.append(float(loss_t) / world)
    out[level] = losses
    check_scales_synchronized(model)
    state = full_state_dict(model)
    if level == "O1":
        out["state"] = state
        out["sharded_state"] = model.state_dict()


def _single_process_o1() -> tuple[list[float], torch.nn.Module]:
    model = amp.initialize(make_model(), opt_level="O1")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.register_step_post_hook(lambda *_: amp.step_scaling(model))
    losses = []
    for step in range(STEPS):
        parts = [batch(step, r) for r in range(WORLD)]
        _, loss = model(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, model


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, WORLD)


def _check_level(results: list[dict], level: str) -> None:
    assert f"{level}_error" not in results[0], results[0].get(f"{level}_error")
    losses = results[0][level]
    assert losses == results[1][level], "every rank must see the same global loss"
    assert losses[-1] < losses[0] - 0.05, f"{level} under FSDP2 did not learn: {losses}"


@pytest.mark.xfail(strict=True, reason="LowBitOptimizer.step mixes DTensor and plain tensors under FSDP2 "
                   "(lowbit_amp/optim, owned by the O2/O3 issue; see docs/distributed.md)")
@pytest.mark.parametrize("level", ["O2", "O3"])
def test_fsdp2_8bit_optimizer_levels(results: list[dict], level: str) -> None:
    _check_level(results, level)
    assert results[0]["O3_warned_fp8_ag"]


def test_fsdp2_o1_and_checkpoint_across_world_sizes(results: list[dict]) -> None:
    _check_level(results, "O1")
    assert not results[0]["O1_warned_fp8_ag"]
    reference, single = _single_process_o1()
    gap = max(abs(a - b) for a, b in zip(results[0]["O1"], reference))
    # same tolerance argument as the DDP test (step-0 current scaling depends on the batch split)
    assert gap < 1e-3, f"FSDP2 O1 deviates from the single-process run by {gap:.2e}"
    # saved under world size 2 (full state), loaded under world size 1: the same weights as the sharded run ended with
    fresh = amp.initialize(make_model(seed=1), opt_level="O1")
    load_full_state_dict(fresh, results[0]["state"])
    for name, tensor in results[0]["state"].items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    final_weight_gap = max((fresh.state_dict()[k] - v).abs().max().item()
                           for k, v in single.state_dict().items() if k.endswith("weight"))
    assert final_weight_gap < 1e-2
    with pytest.raises(ValueError, match="sharded DTensor"):
        load_full_state_dict(amp.initialize(make_model(), opt_level="O1"), results[0]["sharded_state"])
