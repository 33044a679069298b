"""DeepSpeed ZeRO 0/1/2 through the plugin on 2 gloo ranks (CPU accelerator): losses fall and match DDP."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

import lowbit_amp as amp
from lowbit_amp.config import ConfigError
from lowbit_amp.distributed import check_scales_synchronized, wrap_ddp
from tests.distributed._launch import run_ranks
from tests.distributed._models import batch, make_model

STEPS, LR, WORLD = 5, 0.5, 2
TOL_ZERO = 2e-2  # measured ZeRO-1/2 vs DDP gaps are printed by -s; see docs/distributed.md
RUNS = (("O1", 0, "fp8"), ("O1", 1, "hp"), ("O1", 2, "hp"))


def _ds_config(level: str, stage: int, reduce: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "lowbit_amp": {"enabled": True, "opt_level": level, "comm": {"grad_reduce": reduce}},
    }


def _worker(rank: int, world: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's engine wants the launcher's variables; the process group itself is already up (gloo).
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    from lowbit_amp.integrations.deepspeed_plugin import initialize

    out: dict = {}
    for reduce in ("hp", "fp8"):
        model = amp.initialize(make_model(), opt_level="O1", comm={"grad_reduce": reduce})
        ddp = wrap_ddp(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        opt.register_step_post_hook(lambda *_: amp.step_scaling(model))
        losses = []
        for step in range(STEPS):
            _, loss = ddp(*batch(step, rank))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        out[("ddp", reduce)] = losses
    for level, stage, reduce in RUNS:
        model = make_model()
        engine, _, _, _ = initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                     config=_ds_config(level, stage, reduce))
        losses = []
        for step in range(STEPS):
            _, loss = engine(*batch(step, rank))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        out[(level, stage)] = losses
        out[(level, stage, "status")] = engine.lowbit_amp
        check_scales_synchronized(engine.module)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, WORLD)


def _gap(results: list[dict], level: str, stage: int, reduce: str) -> tuple[float, torch.Tensor]:
    ddp = torch.tensor([results[r][("ddp", reduce)] for r in range(WORLD)]).mean(0)
    losses = torch.tensor([results[r][(level, stage)] for r in range(WORLD)]).mean(0)
    return (losses - ddp).abs().max().item(), losses


@pytest.mark.parametrize("level,stage,reduce", RUNS)
def test_deepspeed_through_plugin_learns(results: list[dict], level: str, stage: int, reduce: str) -> None:
    _, losses = _gap(results, level, stage, reduce)
    assert losses[-1] < losses[0] - 0.05, f"ZeRO-{stage} {level} did not learn: {losses.tolist()}"
    status = results[0][(level, stage, "status")]
    assert status.zero_stage == stage and status.fp8_gemms
    assert status.fp8_grad_reduce == (reduce == "fp8")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_match_ddp(results: list[dict], stage: int) -> None:
    gap, losses = _gap(results, "O1", stage, "hp")
    print(f"ZeRO-{stage} vs DDP gap {gap:.2e}")
    assert gap < TOL_ZERO, f"ZeRO-{stage} deviates from DDP by {gap:.2e}"


@pytest.mark.xfail(strict=True, reason="ZeRO-0 with FP8 reduction in an optimizer pre-hook drifts from DDP by ~6e-2 "
                   "after 5 steps even when the pre-hook reduces exactly in FP32: cause not found yet "
                   "(docs/distributed.md, known issues)")
def test_zero_0_fp8_matches_ddp(results: list[dict]) -> None:
    gap, _ = _gap(results, "O1", 0, "fp8")
    assert gap < TOL_ZERO


def test_plugin_errors_without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit_amp.integrations.deepspeed_plugin import initialize

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without DeepSpeed looks like
    with pytest.raises(ImportError, match="pip install deepspeed"):
        initialize(model=make_model(), config={"lowbit_amp": {"enabled": True}})


def test_plugin_config_errors() -> None:
    from lowbit_amp.integrations.deepspeed_plugin import initialize, split_config

    rest, cfg = split_config({"zero_optimization": {"stage": 1}, "lowbit_amp": {"enabled": True, "opt_level": "O3"}})
    assert "lowbit_amp" not in rest and cfg.opt_level == "O3" and cfg.comm.grad_reduce == "fp8"
    assert split_config({"lowbit_amp": {"enabled": False}})[1] is None
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        split_config({"lowbit_amp": {"enabled": True, "comm": {"grad_reduse": "fp8"}}})
    with pytest.raises(ConfigError, match="client optimizer"):
        initialize(model=make_model(), config={"optimizer": {"type": "AdamW"}, "lowbit_amp": {"opt_level": "O3"}})
