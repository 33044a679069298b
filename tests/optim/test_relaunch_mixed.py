"""The fused step's re-launch path (``LowBitOptimizer._replayed`` + ``FusedAdamStep.relaunch``) on a model that mixes
FP8 weight gradients (``nn.Linear`` at O3) with plain bf16 gradients (biases, LayerNorm), through ``amp.initialize``.

Why: every real model has plain gradients next to its FP8 ones; before they were handled the re-launch never applied.
A re-launched step must be bit-identical to the full (table-rebuilding) fused step, because both run the same kernel on
the same tables; any difference means a table row points somewhere stale. So two identical models/optimizers are
stepped side by side on the same inputs, one with re-launching on and one with it off (``FUSED_RELAUNCH``), and
every parameter and state byte is compared after each step, through: plain gradients reallocated by
``zero_grad(set_to_none=True)`` (with the old gradients held alive and then poisoned with NaN, so a stale pointer
cannot go unnoticed), gradients kept by ``set_to_none=False``, an lr change from an LR scheduler, non-finite plain and
FP8 gradients (skipped steps), and the changes that must take the full step (a gradient's kind changing, a parameter
without a gradient). The counters say which path each step took: ``relaunches`` and ``patched_rows`` (rows whose
gradient addresses were re-pointed), checked against the addresses the test itself observes.

The kernel runs under Triton's CPU interpreter in a subprocess (``TRITON_INTERPRET=1`` before Triton loads), as in
tests/optim/test_fused_step.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

HAS_TRITON = importlib.util.find_spec("triton") is not None
interp = pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                            reason="needs Triton's CPU interpreter and no GPU")
gpu = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and Triton")

# step -> (what happens before/at the step, whether the re-launch path must serve it)
SCHEDULE = [
    ("first", False),            # initialises state: full step, records the replay
    ("realloc_held", True),      # set_to_none=True, old grads alive then NaN-poisoned: every row re-pointed
    ("keep", True),              # zero_grad(set_to_none=False): plain grads stay where they were
    ("keep", True),
    ("lr", True),                # scheduler halves lr: hyper vector updated in place, its address holds
    ("nan_plain", True),         # NaN in a LayerNorm gradient (in place): skipped, nothing changes
    ("nan_fp8", True),           # NaN scale of an FP8 gradient: skipped
    ("realloc", True),           # set_to_none=True (the allocator may or may not reuse the addresses)
    ("kind_change", False),      # an FP8 gradient replaced by a plain one: another kernel group -> full step
    ("kind_back", False),        # and back: full step again
    ("realloc", True),
    ("one_none", False),         # a parameter without a gradient: full step
    ("realloc", False),          # it has one again: the table lacks its row -> full step
    ("keep", True),
]
# nonfinite='error': the NaN step raises from inside the re-launch check, after it collected the rows to re-point; the
# retried step (same gradients, NaN removed in place) must still re-point them, against the addresses the tables hold
SCHEDULE_ERROR = [
    ("first", False),
    ("keep", True),
    ("raise_nan", None),         # set_to_none=True with the old grads held then poisoned, a NaN: FloatingPointError
    ("retry", True),             # no new backward: every row differs from the tables' (step 1's) addresses
    ("keep", True),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 32, bias=True),
                         nn.LayerNorm(32)).to(torch.bfloat16)


def _pointers(model: nn.Module, ones: torch.Tensor | None) -> list:
    """Per parameter with a gradient, the two addresses the kernel's table holds for it (codes, scale)."""
    from lowbit_amp.grads.fp8_grad import Fp8Grad

    out = []
    for p in model.parameters():
        if p.grad is None:
            continue
        if type(p.grad) is Fp8Grad:
            codes, scale = p.grad.codes_and_scale()
            out.append((id(p), "fp8", codes.data_ptr(), scale.data_ptr()))
        else:
            out.append((id(p), "plain", p.grad.data_ptr(), ones.data_ptr() if ones is not None else 0))
    return out


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1).view(torch.uint8).clone() if t.element_size() == 1 else t.detach().clone()

    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        state = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "master"):
            out += [raw(t) for _, t in sorted(state.get(name, {}).items())]
        out += [raw(state[k]) for k in ("step",) if k in state]
    return out


def run_schedule(schedule: list, nonfinite: str = "skip", device: str = "cpu") -> list[dict]:
    """Both runs (re-launch on / off) step by step; returns per-step observations (JSON-able)."""
    import lowbit_amp as amp
    import lowbit_amp.optim.update as U
    from lowbit_amp.grads.fp8_grad import Fp8Grad

    dev = torch.device(device)
    U.FUSED_ON_CPU_INTERPRETER = dev.type == "cpu"
    overrides = {"modules.min_gemm_size": 0} if dev.type == "cuda" else {}  # tiny layers, as the CLI does
    runs = []
    for _ in range(2):
        model = _model().to(dev)
        dev = next(model.parameters()).device  # "cuda" -> "cuda:0": the key the optimizer's ones are stored under
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
        model, opt = amp.initialize(model, base, opt_level="O3", overrides=overrides)
        opt.nonfinite = nonfinite
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        runs.append({"model": model, "opt": opt, "sched": sched, "last_ptrs": None})
    gen = torch.Generator().manual_seed(1)
    steps = []
    for kind, _ in schedule:
        x = torch.randn(16, 48, generator=gen).to(device=dev, dtype=torch.bfloat16)
        y = torch.randn(16, 32, generator=gen).to(dev)
        record: dict = {"kind": kind}
        for name, run, relaunch_on in (("a", runs[0], True), ("b", runs[1], False)):
            model, opt = run["model"], run["opt"]
            params = list(model.parameters())
            linear_w, ln_w, ln_bias = params[0], params[2], params[3]
            held = []
            if kind == "retry":
                ln_w.grad[3] = 0.0
            elif kind in ("realloc_held", "raise_nan", "realloc", "first", "kind_back", "one_none"):
                if kind in ("realloc_held", "raise_nan"):
                    held = [p.grad for p in params if p.grad is not None]
                opt.zero_grad(set_to_none=True)
            else:
                opt.zero_grad(set_to_none=False)
            if kind == "lr":
                run["sched"].step()
            if kind != "retry":
                out = model(x)
                loss = (out.float() - y).pow(2).mean()
                with amp.scale_loss(loss, opt) as scaled:
                    scaled.backward()
            for old in held:  # a table still pointing at these would now read NaN
                if type(old) is Fp8Grad:
                    codes, scale = old.codes_and_scale()
                    codes.view(torch.uint8).fill_(0x7F)
                    scale.fill_(float("nan"))
                else:
                    old.fill_(float("nan"))
            if kind in ("nan_plain", "raise_nan"):
                ln_w.grad[3] = float("nan")
            elif kind == "nan_fp8":
                linear_w.grad.codes_and_scale()[1].fill_(float("nan"))
            elif kind == "kind_change":
                linear_w.grad = linear_w.grad.dequantize(torch.bfloat16)
            elif kind == "one_none":
                ln_bias.grad = None
            fused = U._FUSED_STEPS.get(opt)
            ones = opt.__dict__.get("_ones_cache", {}).get(dev)
            ptrs = _pointers(model, ones)
            last = run["last_ptrs"]
            changed = (sum(1 for a, b in zip(ptrs, last) if a != b)
                       if last is not None and [p[:2] for p in ptrs] == [p[:2] for p in last] else None)
            before = _snapshot(model, opt)
            relaunches0 = fused.relaunches if fused else 0
            patched0 = fused.patched_rows if fused else 0
            U.FUSED_RELAUNCH = relaunch_on
            raised = False
            try:
                opt.step()
            except FloatingPointError:
                raised = True
            finally:
                U.FUSED_RELAUNCH = True
            fused = U._FUSED_STEPS[opt]
            after = _snapshot(model, opt)
            if not raised:  # the addresses the tables now hold
                run["last_ptrs"] = _pointers(model, opt.__dict__["_ones_cache"][dev])
            run["after"] = after
            record[name] = {
                "relaunched": fused.relaunches - relaunches0, "patched": fused.patched_rows - patched0,
                "changed_rows": changed, "unchanged": all(torch.equal(u, v) for u, v in zip(before, after)),
                "fallbacks": dict(fused.fallbacks), "skipped": int(opt.skipped_steps),
                "rows": len(ptrs), "lr": opt.param_groups[0]["lr"], "raised": raised,
            }
            del held
        a_after, b_after = runs[0]["after"], runs[1]["after"]
        record["identical"] = len(a_after) == len(b_after) and all(
            u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(a_after, b_after))
        record["finite"] = all(bool(torch.isfinite(t.float()).all()) for t in a_after if t.dtype != torch.uint8)
        steps.append(record)
    return steps


def _interpret() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return _interpret()


def _check_common(steps: list[dict], schedule: list) -> None:
    assert len(steps) == len(schedule)
    for i, (step, (kind, relaunch)) in enumerate(zip(steps, schedule)):
        a, b = step["a"], step["b"]
        where = (i, kind, step)
        # (b) the re-launched run is bit-identical to the full fused step, every parameter and state byte
        assert step["identical"], where
        assert step["finite"], where
        assert a["fallbacks"] == {} and b["fallbacks"] == {}, where  # every parameter served by the fused kernel
        assert a["rows"] == 8 - (kind == "one_none"), where  # 2 FP8 weights + 6 plain (2 biases, 2 LayerNorms)
        assert b["relaunched"] == 0 and b["patched"] == 0, where  # never in the run that has it switched off
        assert a["skipped"] == b["skipped"] and a["lr"] == b["lr"] and a["raised"] == b["raised"], where
        if relaunch is None:  # raised before anything was launched
            assert a["raised"] and a["unchanged"] and a["relaunched"] == a["patched"] == 0, where
            continue
        # (a) the path taken: re-launch on the steady-state steps
        assert a["relaunched"] == int(relaunch), where
        # (c) exactly the rows whose gradient addresses moved are re-pointed (none on a full step)
        assert a["patched"] == (a["changed_rows"] if relaunch else 0), where


@interp
def test_interpreter_relaunch_mixed_fp8_and_plain_gradients_o3(interpreted: dict) -> None:
    steps = interpreted["skip"]
    _check_common(steps, SCHEDULE)
    by_kind = {kind: [s for s, (k, _) in zip(steps, SCHEDULE) if k == kind] for kind, _ in SCHEDULE}
    # old gradients held alive: every row moved (and was then poisoned: a stale row would have read NaN)
    assert by_kind["realloc_held"][0]["a"]["patched"] == 8
    # set_to_none=False keeps the plain gradients in place: at most the two FP8 rows moved (Fp8Grad's += re-encodes)
    assert all(s["a"]["patched"] <= 2 for s in by_kind["keep"]), by_kind["keep"]
    for kind in ("nan_plain", "nan_fp8"):  # skipped in both runs: no byte changed, the counter advanced
        s = by_kind[kind][0]
        assert s["a"]["unchanged"] and s["b"]["unchanged"], s
    assert steps[6]["a"]["skipped"] == 2
    assert steps[4]["a"]["lr"] == 5e-3 and not steps[4]["a"]["unchanged"]


@interp
def test_interpreter_relaunch_after_nonfinite_error_repoints_rows(interpreted: dict) -> None:
    steps = interpreted["error"]
    _check_common(steps, SCHEDULE_ERROR)
    assert steps[3]["a"]["patched"] == 8 and not steps[3]["a"]["unchanged"], steps[3]


@gpu
def test_gpu_relaunch_mixed_fp8_and_plain_gradients_o3() -> None:
    """The same schedules on the GPU (the compiled kernel; the caching allocator's addresses)."""
    steps = run_schedule(SCHEDULE, device="cuda")
    _check_common(steps, SCHEDULE)
    assert steps[1]["a"]["patched"] == 8 and steps[5]["a"]["unchanged"] and steps[6]["a"]["unchanged"]
    steps = run_schedule(SCHEDULE_ERROR, "error", device="cuda")
    _check_common(steps, SCHEDULE_ERROR)
    assert steps[3]["a"]["patched"] == 8


def test_plain_gradient_scale_is_one_persistent_tensor() -> None:
    """The scale a plain gradient is read with is one tensor per device for the optimizer's life: its address is in
    the fused kernel's cached table, and a per-step tensor would be freed under a re-launched table."""
    from lowbit_amp.optim import LowBitAdamW

    p = nn.Parameter(torch.randn(8, 16).to(torch.bfloat16))
    opt = LowBitAdamW([p], lr=1e-3, exp_avg="e4m3", exp_avg_sq="e4m3_expand", master_weights="bf16_sr")
    seen = []
    for _ in range(3):
        p.grad = torch.randn(8, 16).to(torch.bfloat16)
        opt.step()
        seen.append(opt._ones()[p.device])
    assert all(t is seen[0] for t in seen) and seen[0].item() == 1.0


if __name__ == "__main__":  # subprocess entry: TRITON_INTERPRET=1 is set
    import lowbit_amp.optim.update as _U

    _U.FUSED_ON_CPU_INTERPRETER = True
    print(json.dumps({"skip": run_schedule(SCHEDULE), "error": run_schedule(SCHEDULE_ERROR, "error")}))
