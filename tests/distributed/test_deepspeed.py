"""DeepSpeed ZeRO 0/1/2/3 through the plugin on 2 gloo ranks (CPU accelerator) against DDP references.

One process launch runs every configuration (DeepSpeed's import and engine set-up dominate; the runs are ~0.1-3 s
each). Every DeepSpeed run states ``gradient_clipping: 1.0`` — DeepSpeed 0.19's *default* — and every DDP reference
clips to 1.0 after its all-reduce, so both sides do the same math. Tolerances, with what was measured (losses ~5.2-5.55,
5 steps; ``pytest -s`` prints the gaps) and the size of the bug each one guards against:

===============================  ===========  ==========  ===================================================
comparison                       measured     tolerance   what it catches (gap measured with the bug)
===============================  ===========  ==========  ===================================================
O1 ZeRO-0/1/2/3 vs DDP (SGD)     7e-5         5e-4        stale FP8 weight cache under ZeRO-1/2 (3.7e-3)
O1 ZeRO-0 FP8 reduce vs DDP FP8  1.0e-3       4e-3        clipping before the FP8 reduction (6e-2)
O2/O3 ZeRO-1/2 vs DDP (AdamW)    7.7e-4/1.2e-3 4e-3       Fp8Grad lost under ZeRO's grad.data rebinding (9.9e-3)
===============================  ===========  ==========  ===================================================

The O1 gap is float summation order. The FP8-reduce gap: both sides run the same FP8 all-reduce, but over different
flat layouts (DDP buckets vs one buffer in parameter order), so the per-chunk output scales differ. The O2/O3 gap:
DDP re-encodes the reduced gradient as FP8 when it copies the bucket back into the ``Fp8Grad``, ZeRO hands the
optimizer the fp32 reduced sum; 8-bit moment blocks span parameter boundaries in ZeRO's flat partitions.
"""

from __future__ import annotations

import importlib.util
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

STEPS, WORLD, CLIP = 5, 2, 1.0
TOL_O1, TOL_FP8_REDUCE, TOL_LOWBIT = 5e-4, 4e-3, 4e-3
# B per optimizer-held element at O3: e4m3 m (1.03) + fp16 v (2.03) + bf16 master copy (2) = 5.06 (+ counters);
# fp32 AdamW holds 8
O3_BYTES_MAX = 5.5

requires_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                        reason="deepspeed is not installed (pip install deepspeed)")

# (name, level, grad_reduce, optimizer); the DDP references
DDP_RUNS = (("O1", "hp", "sgd"), ("O1", "fp8", "sgd"), ("O2", "hp", "adamw"), ("O3", "hp", "adamw"))
# (stage, level, grad_reduce, optimizer); grad_reduce "hp" at O3 because FP8 reduction exists only at ZeRO-0
DS_RUNS = ((0, "O1", "hp", "sgd"), (1, "O1", "hp", "sgd"), (2, "O1", "hp", "sgd"), (3, "O1", "hp", "sgd"),
           (0, "O1", "fp8", "sgd"), (1, "O2", "hp", "adamw"), (2, "O2", "hp", "adamw"),
           (1, "O3", "hp", "adamw"), (2, "O3", "hp", "adamw"))


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def _ds_config(stage: int, level: str, reduce: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "lowbit_amp": {"enabled": True, "opt_level": level, "comm": {"grad_reduce": reduce}},
    }


def _has_fp8(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if isinstance(value, dict):
        return any(_has_fp8(v) for v in value.values())
    return False


def _ddp(rank: int, level: str, reduce: str, kind: str) -> dict:
    model = make_model()
    model, opt = amp.initialize(model, _optimizer(kind, model.parameters()), opt_level=level,
                                comm={"grad_reduce": reduce})
    ddp = wrap_ddp(model)
    losses = []
    for step in range(STEPS):
        _, loss = ddp(*batch(step, rank))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # after the reduction, as DeepSpeed's default
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    out = {"losses": losses, "numel": sum(p.numel() for p in model.parameters())}
    if hasattr(opt, "state_bytes"):
        out["state_bytes"] = opt.state_bytes()
    return out


def _deepspeed(rank: int, stage: int, level: str, reduce: str, kind: str) -> dict:
    from lowbit_amp.integrations.deepspeed_plugin import initialize
    from lowbit_amp.nn.linear import LowBitLinear

    model = make_model()
    engine, ds_opt, _, _ = initialize(model=model, optimizer=_optimizer(kind, model.parameters()),
                                      config=_ds_config(stage, level, reduce))
    losses = []
    for step in range(STEPS):
        _, loss = engine(*batch(step, rank))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    check_scales_synchronized(engine.module)
    inner = getattr(ds_opt, "optimizer", ds_opt)  # ZeRO-1/2 wrap the client optimizer; ZeRO-0 steps it directly
    held = [p for g in inner.param_groups for p in g["params"]]
    out = {"losses": losses, "status": engine.lowbit_amp, "inner": type(inner).__name__,
           "held_numel": sum(p.numel() for p in held), "held_dtypes": sorted({str(p.dtype) for p in held})}
    if hasattr(inner, "state_bytes"):
        out["state_bytes"] = inner.state_bytes()
        out["fp8_state"] = all(_has_fp8(inner.state[p]) for p in held if inner.state[p])
    # the step post-hook drops every FP8 weight cast (stale after a step); one more forward shows what it casts to
    with torch.no_grad():
        engine(*batch(STEPS, rank))
    caches = [m._weight_cache for m in engine.module.modules() if isinstance(m, LowBitLinear)]
    out["fp8_weight_cache"] = [c[1].dtype for c in caches if c is not None]
    out["fp8_cache_bytes"] = sum(c[1].numel() * c[1].element_size() for c in caches if c is not None)
    return out


def _worker(rank: int, world: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's engine wants the launcher's variables; the process group itself is already up (gloo).
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    from lowbit_amp.nn.linear import LowBitLinear

    out: dict = {("ddp",) + run: _ddp(rank, *run) for run in DDP_RUNS}
    for run in DS_RUNS:
        out[("ds",) + run] = _deepspeed(rank, *run)
    # What happens when the section goes to deepspeed.initialize itself: DeepSpeed accepts the unknown key silently.
    model = make_model()
    engine = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                  config=_ds_config(0, "O3", "hp"))[0]
    out["raw_deepspeed_swapped"] = any(isinstance(m, LowBitLinear) for m in engine.module.modules())
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, WORLD)


def _mean_losses(results: list[dict], key: tuple) -> torch.Tensor:
    return torch.tensor([results[r][key]["losses"] for r in range(WORLD)]).mean(0)


def _gap(results: list[dict], ds_key: tuple, ddp_key: tuple) -> float:
    gap = (_mean_losses(results, ds_key) - _mean_losses(results, ddp_key)).abs().max().item()
    print(f"{ds_key} vs {ddp_key}: max loss gap {gap:.2e}")
    return gap


@requires_deepspeed
@pytest.mark.parametrize("run", DS_RUNS, ids=lambda r: f"zero{r[0]}-{r[1]}-{r[2]}-{r[3]}")
def test_deepspeed_through_plugin_learns(results: list[dict], run: tuple) -> None:
    stage, level, reduce, _ = run
    losses = _mean_losses(results, ("ds",) + run)
    assert losses[-1] < losses[0] - 0.05, f"ZeRO-{stage} {level} did not learn: {losses.tolist()}"
    status = results[0][("ds",) + run]["status"]
    assert status.zero_stage == stage and status.fp8_gemms and status.fp8_grad_reduce == (reduce == "fp8")
    assert status.clip_after_reduce == (CLIP if reduce == "fp8" else 0.0)
    assert status.fp8_grads_widened == (stage > 0 and level in ("O2", "O3"))
    assert all(d == torch.float8_e4m3fn for r in results for d in r[("ds",) + run]["fp8_weight_cache"])
    assert results[0][("ds",) + run]["fp8_weight_cache"], "no LowBitLinear cast its weight to FP8"


@requires_deepspeed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_o1_matches_ddp(results: list[dict], stage: int) -> None:
    assert _gap(results, ("ds", stage, "O1", "hp", "sgd"), ("ddp", "O1", "hp", "sgd")) < TOL_O1


@requires_deepspeed
def test_zero_0_fp8_reduction_matches_ddp_fp8_hook(results: list[dict]) -> None:
    """Same FP8 all-reduce as the DDP comm hook, and clipping after it (the old ~6e-2 drift: DeepSpeed clipped each
    rank's un-reduced gradient before the optimizer pre-hook reduced it)."""
    assert _gap(results, ("ds", 0, "O1", "fp8", "sgd"), ("ddp", "O1", "fp8", "sgd")) < TOL_FP8_REDUCE


@requires_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("level", ["O2", "O3"])
def test_lowbit_optimizer_under_zero_matches_ddp(results: list[dict], stage: int, level: str) -> None:
    key = ("ds", stage, level, "hp", "adamw")
    assert _gap(results, key, ("ddp", level, "hp", "adamw")) < TOL_LOWBIT
    per_rank = [results[r][key] for r in range(WORLD)]
    total = results[0][("ddp", level, "hp", "adamw")]["numel"]
    assert all(r["inner"] == "LowBitOptimizer" for r in per_rank)
    # ZeRO partitions: each rank's optimizer holds one flat fp32 slice, together the whole model
    assert sum(r["held_numel"] for r in per_rank) == total
    assert all(r["held_numel"] < total and r["held_dtypes"] == ["torch.float32"] for r in per_rank)
    ddp_bytes = results[0][("ddp", level, "hp", "adamw")]["state_bytes"] / total
    for r in per_rank:
        per_elem = r["state_bytes"] / r["held_numel"]
        print(f"ZeRO-{stage} {level}: {per_elem:.2f} B optimizer state per held element (DDP {ddp_bytes:.2f} B/param)")
        assert abs(per_elem - ddp_bytes) < 0.05 * ddp_bytes
        if level == "O3":
            assert r["fp8_state"] and per_elem < O3_BYTES_MAX


@requires_deepspeed
def test_zero_3_o1_fp8_gemms(results: list[dict]) -> None:
    """ZeRO-3 gathers each LowBitLinear's weight for its forward/backward; the FP8 cast runs on the gathered weight."""
    per_rank = [results[r][("ds", 3, "O1", "hp", "sgd")] for r in range(WORLD)]
    for r in per_rank:
        assert r["fp8_weight_cache"] and r["fp8_cache_bytes"] > 0
        print(f"ZeRO-3: FP8 weight copies held after a forward (freed at the step): {r['fp8_cache_bytes']} B per rank")


@requires_deepspeed
def test_section_passed_to_deepspeed_itself_is_ignored(results: list[dict]) -> None:
    """Why the plugin's initialize is the call to write: DeepSpeed accepts the unknown section and does nothing."""
    assert not results[0]["raw_deepspeed_swapped"]


def test_plugin_errors_without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit_amp.integrations.deepspeed_plugin import initialize

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without DeepSpeed looks like
    with pytest.raises(ImportError, match="pip install deepspeed"):
        initialize(model=make_model(), config={"lowbit_amp": {"enabled": True}})


@requires_deepspeed
def test_plugin_config_errors() -> None:
    from lowbit_amp.integrations.deepspeed_plugin import initialize, split_config

    rest, cfg = split_config({"zero_optimization": {"stage": 1}, "lowbit_amp": {"enabled": True, "opt_level": "O3"}})
    assert "lowbit_amp" not in rest and cfg.opt_level == "O3" and cfg.comm.grad_reduce == "fp8"
    assert split_config({"lowbit_amp": {"enabled": False}})[1] is None
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        split_config({"lowbit_amp": {"enabled": True, "comm": {"grad_reduse": "fp8"}}})
    with pytest.raises(ConfigError, match="client optimizer"):
        initialize(model=make_model(), config={"optimizer": {"type": "AdamW"}, "lowbit_amp": {"opt_level": "O3"}})
    model = make_model()
    with pytest.raises(ConfigError, match="fp32 engine path"):
        initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                   config={"bf16": {"enabled": True}, "lowbit_amp": {"opt_level": "O3"}})
