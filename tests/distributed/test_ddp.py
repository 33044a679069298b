"""DDP with the FP8 comm hook on 2 gloo ranks vs one process on the concatenated batch; amax sync; checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lowbit_amp as amp
from lowbit_amp.distributed import Fp8HookState, check_scales_synchronized, wrap_ddp
from lowbit_amp.distributed.amax_sync import scaling_vector
from tests.distributed._launch import run_ranks
from tests.distributed._models import batch, make_model

STEPS, ACCUM, LR, WORLD = 6, 2, 0.5, 2


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches, ddp=None) -> list[float]:
    losses = []
    for step in range(STEPS):
        total = 0.0
        parts = micro_batches(step)
        for i, (x, y) in enumerate(parts):
            last = i == len(parts) - 1
            ctx = ddp.no_sync() if (ddp is not None and not last) else torch.enable_grad()
            with ctx:
                _, loss = (ddp or model)(x, y)
                (loss / len(parts)).backward()
            total += float(loss.detach()) / len(parts)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def _rank_batches(rank: int, world: int):
    return lambda step: [batch(step, world * i + rank) for i in range(ACCUM)]


def _worker(rank: int, world: int) -> dict:
    out = {}
    for reduce in ("hp", "fp8"):
        model = amp.initialize(make_model(), opt_level="O1", comm={"grad_reduce": reduce})
        ddp = wrap_ddp(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        opt.register_step_post_hook(lambda *_: amp.step_scaling(model))
        out[reduce] = _train(model, opt, _rank_batches(rank, world), ddp)
        hook_state = ddp.lowbit_comm_hook_state
        out[f"{reduce}_hooked"] = isinstance(hook_state, Fp8HookState) and hook_state.calls > 0
        check_scales_synchronized(model)  # raises if any rank's scales differ
        out[f"{reduce}_scales"] = scaling_vector(model)
        out[f"{reduce}_params"] = [p.detach().clone() for p in model.parameters()]
    # without sync the scales must differ (proves the check and the sync are not vacuous)
    model = amp.initialize(make_model(), opt_level="O1", comm={"sync_amax": False})
    ddp = wrap_ddp(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.register_step_post_hook(lambda *_: amp.step_scaling(model))
    _train(model, opt, _rank_batches(rank, world), ddp)
    try:
        check_scales_synchronized(model)
        out["unsynced_detected"] = False
    except RuntimeError as err:
        out["unsynced_detected"] = "differ" in str(err)
    dist.barrier()
    return out


def _single_process(world: int) -> list[float]:
    model = amp.initialize(make_model(), opt_level="O1")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.register_step_post_hook(lambda *_: amp.step_scaling(model))

    def concatenated(step: int):
        parts = [batch(step, world * i + r) for i in range(ACCUM) for r in range(world)]
        return [(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))]

    return _train(model, opt, concatenated)


def test_ddp_fp8_hook_matches_single_process() -> None:
    results = run_ranks(_worker, WORLD)
    reference = torch.tensor(_single_process(WORLD))
    # each rank logs its own half of the batch; the global loss is their mean
    # Tolerances: step 0 already differs by ~6e-5 because the first forward uses current scaling (no history yet),
    # whose amax depends on how the batch is split; FP8 on the wire adds ~1e-3 relative gradient noise (measured max
    # gap 2.8e-4 hp, 7.2e-4 fp8 over 6 steps on losses ~5.5).
    for reduce, tol in (("hp", 1e-3), ("fp8", 2e-3)):
        ddp_losses = torch.tensor([results[r][reduce] for r in range(WORLD)]).mean(0)
        gap = (ddp_losses - reference).abs().max().item()
        assert gap < tol, f"{reduce}: DDP loss trajectory deviates by {gap:.2e} from the single-process run"
        assert ddp_losses[-1] < ddp_losses[0] - 0.05, f"{reduce}: loss did not decrease: {ddp_losses.tolist()}"
        # replicas identical, scales identical across ranks
        for a, b in zip(results[0][f"{reduce}_params"], results[1][f"{reduce}_params"]):
            assert torch.equal(a, b)
        assert torch.equal(results[0][f"{reduce}_scales"], results[1][f"{reduce}_scales"])
    assert results[0]["fp8_hooked"] and not results[0]["hp_hooked"]
    assert results[0]["unsynced_detected"], "with sync_amax=False the ranks' scales should differ and be reported"


# ------------------------------------------------------------------------------------------------ O3 + FP8 reduction
O3_STEPS, O3_LR = 30, 3e-3


def _o3_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """examples/deepspeed_zero.py's batch: 4 rows counting up by 3 from a random start (the report's reproducer)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = (torch.randint(0, 200, (4, 1), generator=gen) + torch.arange(33) * 3) % 256
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _o3_worker(rank: int, world: int, exp_avg_sq: str) -> dict:
    from lowbit_amp.levels import resolve_config
    from lowbit_amp.models.tiny_gpt import TinyGPT, TinyGPTConfig

    out = {}
    for reduce in ("hp", "fp8"):
        model = TinyGPT(TinyGPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64), seed=0)
        config = resolve_config("O3", {"comm": {"grad_reduce": reduce}, "optimizer": {"exp_avg_sq": exp_avg_sq}})
        model, opt = amp.initialize(model, torch.optim.AdamW(model.parameters(), lr=O3_LR), opt_level=config)
        ddp = wrap_ddp(model)
        losses = []
        for step in range(O3_STEPS):
            _, loss = ddp(*_o3_batch(step, rank))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
        out[reduce] = losses
        out[f"{reduce}_hooked"] = ddp.lowbit_comm_hook_state is not None
    return out


@pytest.mark.parametrize("exp_avg_sq", [
    "e4m3_expand",  # failed (gap 3.15) before the codec normalised by the block max before the power
    "fp16",
])
def test_o3_fp8_reduction_tracks_hp_reduction(exp_avg_sq: str) -> None:
    """O3 (AdamW 3e-3, FP8 m, bf16 SR master) with the FP8 DDP hook vs DDP's hp all-reduce, 30 steps on 2 ranks.

    Tolerance 0.05 on every step's loss: measured max gap over 30 steps (losses 5.56 -> 1.92) 0.004 with fp16 v and
    0.006 with the e4m3_expand codec since it normalises before the power; the old codec (block_max**k underflowing
    fp32) gave 3.15 (5.35 vs 2.20 at step 29).
    """
    results = run_ranks(_o3_worker, WORLD, exp_avg_sq)
    hp, fp8 = torch.tensor(results[0]["hp"]), torch.tensor(results[0]["fp8"])
    assert results[0]["fp8_hooked"] and not results[0]["hp_hooked"]
    assert hp[-5:].mean() < hp[:5].mean() - 1.5, f"hp run did not learn: {hp.tolist()}"
    gap = (fp8 - hp).abs()
    assert float(gap.max()) < 0.05, f"FP8 reduction leaves the hp run at step {int(gap.argmax())}: {gap.max():.3f}"
