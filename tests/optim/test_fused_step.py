"""The fused Triton Adam/AdamW step (lowbit_amp/kernels/adam_triton.py) against the reference update (optim/update.py).

Reference = the same optimizer with ``compile=False`` (the eager per-parameter update) on the same device, same
parameters, same FP8 gradients, several steps. What is compared, and the stated tolerances:

* parameters: ≥ 99% of elements bit-identical, every element within 1 ulp of the tensor's largest weight. The
  stochastic-rounding stream is the reference's own hash, so a difference can only come from an FP32 weight that
  differs before rounding — by default the bias corrections: libdevice's ``powf`` (flush-to-zero build, as Triton links
  it) differs from ATen's by an ulp, and ``1 - beta2^t`` cancels, so the update differs by ~3e-5 relative and
  0.4–0.7% of bf16 weights round the other way (measured on H200, 2026-12-01). With
  ``FUSED_TORCH_BIAS_CORRECTION`` (the reference's own torch ops) the step is bit-identical: tested below;
* stored moment bytes (codes): ≥ 99% bit-identical (measured: m 100%; v 100% for fp32/fp16, 99.935% for
  ``e4m3_expand`` whose ``|v|^k`` uses the hardware exp2/log2 by default), decoded moments within one code step
  (``rtol = 2^-mantissa`` of the stored format, ``atol = 1e-3 * max|ref|``), per-block scales/k within ``rtol 1e-5``
  (``1e-4`` for the expanded v with the approximate pow; measured 2.5e-6);
* step counters equal; a step with a non-finite gradient changes no byte anywhere in either path.

GPU tests run on CUDA (skip without). CPU tests run the same kernel under Triton's interpreter in a subprocess
(``TRITON_INTERPRET=1`` must be set before Triton is imported; a subprocess keeps it out of other tests): there
``log``/``pow`` are float32 ``log``/``exp2∘log2`` (no libdevice in the interpreter), and FP8 codes are encoded and
decoded by the kernel's integer bit arithmetic (the interpreter's own FP8 casts round wrongly; on GPU the kernel uses
the hardware conversions, which are exact / round-to-nearest-even like torch's).
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

from lowbit_amp.config import LinearConfig
from lowbit_amp.grads import to_fp8_weight_grad
from lowbit_amp.optim import LowBitAdam, LowBitAdamW
from lowbit_amp.optim.state_codec import get_codec

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and Triton")
# the interpreter runs are the CPU machines' check; where a GPU is present the GPU tests check the compiled kernel
interp = pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="needs Triton's CPU interpreter and no GPU")

# multiples of 16 and not; numel not a multiple of the block size; a tensor smaller than one block; several blocks
SHAPES = [(64, 48), (33, 17), (5, 300), (128,), (7,), (3, 130)]
M_FORMATS = ("fp32", "bf16", "e4m3")
V_FORMATS = ("fp32", "fp16", "e4m3_expand")
MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float8_e4m3fn: 3}


def run_pair(device: str, storage: dict, *, shapes=SHAPES, steps: int = 3, dtype=torch.bfloat16, grad: str = "e4m3",
             cls=LowBitAdamW, nan_step: int | None = None, extra: dict | None = None, seed: int = 0,
             groups: bool = False, persistent_grads: bool = False, halve_lr_at: int | None = None,
             rebind_at: int | None = None) -> dict:
    """Run fused and reference optimizers side by side; return comparison metrics (JSON-able).

    ``persistent_grads``: after the first step each FP8 gradient is rewritten in place (same addresses, as the caching
    allocator usually gives every backward), which lets the fused optimizer re-launch the previous step's tables
    (``relaunches`` counts it). ``halve_lr_at``: an LR-scheduler-like change of every group's lr before that step.
    ``rebind_at``: every parameter's storage is replaced (``p.data = p.data.clone()``) before that step."""
    import lowbit_amp.optim.update as U

    extra = extra or {}
    runs = []
    for fused in (True, False):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        params = [nn.Parameter((0.05 * torch.randn(s, generator=gen)).to(device=device, dtype=dtype)) for s in shapes]
        spec = [{"params": params[:1]}, {"params": params[1:], "lr": 3e-3, "weight_decay": 0.0}] if groups else params
        opt = cls(spec, lr=1e-2, weight_decay=0.1, compile=None if fused else False, **storage, **extra)
        snapshots = []
        for i in range(steps):
            if i == halve_lr_at:
                for group in opt.param_groups:
                    group["lr"] *= 0.5
            if i == rebind_at:
                for p in params:
                    p.data = p.data.clone()
            for p in params:
                g = torch.randn(p.shape, generator=gen).to(device) * (0.1 if i % 2 else 1e-3)
                if i == nan_step and p is params[0]:
                    g[0] = float("nan")
                if grad in ("e4m3", "e5m2"):
                    new = to_fp8_weight_grad(g, p, LinearConfig(weight_grad=grad))
                    if persistent_grads and p.grad is not None:
                        for old_part, new_part in zip(p.grad.codes_and_scale(), new.codes_and_scale()):
                            old_part.copy_(new_part)
                    else:
                        p.grad = new
                else:  # "plain": an ordinary gradient in the parameter's dtype
                    p.grad = g.to(dtype)
            before = [p.detach().clone() for p in params]
            opt.step()
            snapshots.append([torch.equal(b, p.detach()) for b, p in zip(before, params)])
        served = sum(1 for _ in params) - sum(U._FUSED_STEPS[opt].fallbacks.values()) if fused else 0
        relaunches = U._FUSED_STEPS[opt].relaunches if fused else 0
        runs.append((params, opt, snapshots, served, relaunches))
    (pf, of, sf, served, relaunches), (pr, orf, sr, _, _) = runs
    out: dict = {"served": served, "n": len(shapes), "unchanged_fused": sf, "unchanged_ref": sr, "relaunches": relaunches,
                 "param_equal": [], "param_ulps": [], "codes_equal": [], "decoded_ok": [], "parts_rel": [],
                 "steps_equal": True}
    for a, b in zip(pf, pr):
        a, b = a.detach(), b.detach()
        out["param_equal"].append((a == b).float().mean().item())
        # in ulps of the tensor's largest weight: both paths round (almost) the same FP32 weight onto the grid, so a
        # disagreement is one grid step at that weight's magnitude; per-element ulps would blow up where an update
        # cancels the weight to ~0 (there a 3e-5 relative difference of the update is many ulps of the result)
        ulp = 2.0 ** -MANTISSA[dtype] * b.float().abs().max()
        out["param_ulps"].append(((a.float() - b.float()).abs() / ulp).max().item())
    for pa, pb in zip(pf, pr):
        sa, sb = of.state[pa], orf.state[pb]
        out["steps_equal"] &= bool(torch.equal(sa["step"], sb["step"]))
        for moment in ("exp_avg", "exp_avg_sq"):
            name = storage.get(moment, "fp32")
            x, y = sa[moment], sb[moment]
            big = "value" if "value" in x else "codes"
            cx, cy = x[big], y[big]
            if cx.element_size() == 1:
                cx, cy = cx.view(torch.uint8), cy.view(torch.uint8)
            out["codes_equal"].append(((cx == cy).float().mean().item(), moment))
            dx, dy = get_codec(name).decode(x), get_codec(name).decode(y)
            rtol = 2.0 ** -MANTISSA[x[big].dtype] if name != "e4m3_expand" else 2.0 ** -2
            atol = 1e-3 * dy.abs().max().item() + 1e-30
            out["decoded_ok"].append(bool(torch.allclose(dx, dy, rtol=rtol, atol=atol)))
            for part in ("scale", "k"):
                if part in x:
                    rel = ((x[part] - y[part]).abs() / y[part].abs()).max().item()
                    out["parts_rel"].append((rel, moment, part))
        for part in sa["master"]:
            out["param_equal"].append((sa["master"][part] == sb["master"][part]).float().mean().item())
    return out


def check(out: dict, *, gpu_device: bool, expand: bool) -> None:
    import lowbit_amp.optim.update as U

    assert out["served"] == out["n"], out
    assert out["steps_equal"]
    assert out["unchanged_fused"] == out["unchanged_ref"]
    assert min(out["param_equal"]) >= 0.99, out["param_equal"]
    assert max(out["param_ulps"]) <= 1.0, out["param_ulps"]
    assert min(f for f, _ in out["codes_equal"]) >= 0.99, out["codes_equal"]
    assert all(out["decoded_ok"]), out
    for rel, moment, part in out["parts_rel"]:
        loose = moment == "exp_avg_sq" and expand and (not gpu_device or not U.FUSED_EXACT_POW)
        assert rel <= (1e-4 if loose else 1e-5), (rel, moment, part)


COMBOS = [(m, v) for m in M_FORMATS for v in V_FORMATS]
_UNVERIFIED = pytest.mark.xfail(strict=True, reason=(
    "fused kernel differs from the reference beyond the bounds in this mode (H200, 2026-12-01); dispatch keeps it on "
    "the compiled path (optim/update.py FUSED_ALLOW_UNVERIFIED)"))


# ------------------------------------------------------------------------------------------------ GPU
@gpu
@pytest.mark.parametrize("m,v", COMBOS)
def test_gpu_every_moment_format_bf16_sr(m: str, v: str) -> None:
    out = run_pair("cuda", {"exp_avg": m, "exp_avg_sq": v, "master_weights": "bf16_sr"})
    check(out, gpu_device=True, expand=v == "e4m3_expand")


@gpu
@pytest.mark.parametrize("master,dtype", [
    ("none", torch.bfloat16),
    pytest.param("fp32", torch.bfloat16, marks=_UNVERIFIED), pytest.param("bf16_sr", torch.float32, marks=_UNVERIFIED),
    pytest.param("none", torch.float16, marks=_UNVERIFIED), pytest.param("fp32", torch.float32, marks=_UNVERIFIED)])
def test_gpu_master_modes_and_dtypes(master: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit_amp.optim.update as U

    monkeypatch.setattr(U, "FUSED_ALLOW_UNVERIFIED", True)  # measure the kernel itself, not the dispatch
    out = run_pair("cuda", {"exp_avg": "e4m3", "exp_avg_sq": "e4m3_expand", "master_weights": master}, dtype=dtype)
    check(out, gpu_device=True, expand=True)


@gpu
@pytest.mark.parametrize("grad,dtype", [("e5m2", torch.bfloat16), ("plain", torch.bfloat16),
                                        pytest.param("plain", torch.float32, marks=_UNVERIFIED),
                                        pytest.param("plain", torch.float16, marks=_UNVERIFIED)])
def test_gpu_gradient_kinds(grad: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit_amp.optim.update as U

    monkeypatch.setattr(U, "FUSED_ALLOW_UNVERIFIED", True)
    out = run_pair("cuda", {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "bf16_sr"}, grad=grad,
                   dtype=dtype)
    check(out, gpu_device=True, expand=False)


@gpu
@_UNVERIFIED
def test_gpu_adam_l2_maximize_block96_and_skip_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit_amp.optim.update as U

    monkeypatch.setattr(U, "FUSED_ALLOW_UNVERIFIED", True)
    storage = {"exp_avg": "e4m3", "exp_avg_sq": "e4m3_expand", "master_weights": "bf16_sr", "block_size": 96}
    out = run_pair("cuda", storage, cls=LowBitAdam, nan_step=1, steps=4, extra={"maximize": True})
    check(out, gpu_device=True, expand=True)
    assert out["unchanged_fused"][1] == [True] * out["n"]  # the NaN step wrote nothing


@gpu
@pytest.mark.parametrize("m,v", COMBOS)
def test_gpu_bit_identical_with_torch_bias_corrections(m: str, v: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the reference's torch ops for the bias corrections the fused step reproduces the eager one bit for bit
    (measured 100% for every combination; the approximate ``|v|^k`` of e4m3_expand flips 0.065% of v codes, which
    moves ≤ 0.04% of weights by ≤ 1 ulp)."""
    import lowbit_amp.optim.update as U

    monkeypatch.setattr(U, "FUSED_TORCH_BIAS_CORRECTION", True)
    out = run_pair("cuda", {"exp_avg": m, "exp_avg_sq": v, "master_weights": "bf16_sr"})
    check(out, gpu_device=True, expand=v == "e4m3_expand")
    if v == "e4m3_expand":
        assert min(out["param_equal"]) >= 0.999, out["param_equal"]
    else:
        assert min(out["param_equal"]) == 1.0 and min(f for f, _ in out["codes_equal"]) == 1.0, out


@gpu
def test_gpu_two_groups_in_one_launch() -> None:
    out = run_pair("cuda", {"exp_avg": "e4m3", "exp_avg_sq": "e4m3_expand", "master_weights": "bf16_sr"}, groups=True)
    check(out, gpu_device=True, expand=True)


@gpu
def test_gpu_stochastic_rounding_is_unbiased() -> None:
    """Updates of 1/16 bf16-ulp: round-to-nearest would never move the weight; SR moves it by the FP32 amount on
    average (E[w] tracks the exact trajectory within 5% of the distance travelled)."""
    p = nn.Parameter(torch.ones(1 << 16, device="cuda", dtype=torch.bfloat16))
    lr = 2.0**-7 / 16
    opt = LowBitAdamW([p], lr=lr, weight_decay=0.0, exp_avg="e4m3", exp_avg_sq="e4m3_expand", master_weights="bf16_sr")
    steps = 64
    for _ in range(steps):
        p.grad = to_fp8_weight_grad(torch.ones(p.shape, device="cuda"), p, LinearConfig(weight_grad="e4m3"))
        opt.step()
    moved = 1.0 - p.float().mean().item()
    assert abs(moved - steps * lr) <= 0.05 * steps * lr, (moved, steps * lr)


@gpu
def test_gpu_one_launch_for_many_parameters() -> None:
    """300 parameters of one group: the step launches one Adam kernel (plus the step-counter foreach add)."""
    params = [nn.Parameter(torch.randn(64, 32, device="cuda").to(torch.bfloat16)) for _ in range(300)]
    opt = LowBitAdamW(params, lr=1e-3, exp_avg="e4m3", exp_avg_sq="e4m3_expand", master_weights="bf16_sr")
    for _ in range(2):
        for p in params:
            p.grad = to_fp8_weight_grad(torch.randn(p.shape, device="cuda"), p, LinearConfig(weight_grad="e4m3"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("fused_adam_kernel" in n for n in names) == 1, names


# ------------------------------------------------------------------------------------------------ CPU interpreter
def _interpret(case: dict) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@interp
@pytest.mark.parametrize("m,v", COMBOS)
def test_interpreter_every_moment_format(m: str, v: str) -> None:
    out = _interpret({"storage": {"exp_avg": m, "exp_avg_sq": v, "master_weights": "bf16_sr"}})
    check(out, gpu_device=False, expand=v == "e4m3_expand")


@interp
def test_interpreter_masters_grads_adam_skip_block96() -> None:
    cases = [
        {"storage": {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "fp32"}, "dtype": "float32"},
        {"storage": {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "bf16_sr"}, "dtype": "float32"},
        {"storage": {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "bf16_sr"}, "dtype": "float16",
         "grad": "e5m2"},
        {"storage": {"exp_avg": "bf16", "exp_avg_sq": "fp16", "master_weights": "none"}, "grad": "plain"},
        {"storage": {"exp_avg": "fp32", "exp_avg_sq": "fp32", "master_weights": "none"}, "grad": "plain",
         "dtype": "float32"},
        {"storage": {"exp_avg": "e4m3", "exp_avg_sq": "e4m3_expand", "master_weights": "bf16_sr", "block_size": 96},
         "adam": True, "nan_step": 1, "steps": 3, "maximize": True},
        {"storage": {"exp_avg": "e4m3", "exp_avg_sq": "e4m3_expand", "master_weights": "bf16_sr"}, "groups": True},
    ]
    for case in cases:
        out = _interpret(case)
        print(case, out["param_ulps"], out["param_equal"])
        check(out, gpu_device=False, expand=case["storage"]["exp_avg_sq"] == "e4m3_expand")
        if "nan_step" in case:
            assert out["unchanged_fused"][1] == [True] * out["n"]


REPLAY_CASE = {"storage": {"exp_avg": "e4m3", "exp_avg_sq": "fp16", "master_weights": "bf16_sr"}, "groups": True,
               "persistent_grads": True, "steps": 7, "halve_lr_at": 3, "nan_step": 4, "rebind_at": 5}


def check_replay(out: dict) -> None:
    """Steps 2.. re-launch the cached tables (gradients rewritten in place, an lr change in between: the hyper tensor
    is updated in place, so its address holds) and still agree with the reference; the NaN step changes nothing; after
    the parameters' storages are replaced the full step runs again (the kernel must write the new storage)."""
    check(out, gpu_device=out.get("gpu", False), expand=False)
    assert out["relaunches"] >= 3, out["relaunches"]
    assert out["unchanged_fused"][4] == [True] * out["n"] and out["unchanged_ref"][4] == [True] * out["n"]


@interp
def test_interpreter_relaunch_with_persistent_gradients() -> None:
    check_replay(_interpret(REPLAY_CASE))


@gpu
def test_gpu_relaunch_with_persistent_gradients() -> None:
    out = run_pair("cuda", REPLAY_CASE["storage"], groups=True, persistent_grads=True, steps=7, halve_lr_at=3,
                   nan_step=4, rebind_at=5)
    check_replay({**out, "gpu": True})


def test_fallback_rules_are_reported() -> None:
    """What the kernel does not serve is named (no silent switch): SGD, fp16 master, CPU, subclasses."""
    from lowbit_amp.optim.master import MasterWeights
    from lowbit_amp.optim.update import UpdateSpec, fused_unavailable

    p = torch.zeros(4, 4, dtype=torch.bfloat16)
    codes = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    base = dict(exp_avg=get_codec("e4m3"), exp_avg_sq=get_codec("e4m3_expand"), param_dtype=torch.bfloat16,
                block_size=128)
    sgd = UpdateSpec(rule="sgd", master=MasterWeights("none"), **base)
    assert "Adam/AdamW only" in fused_unavailable(sgd, p, codes)
    assert "CUDA-only" in fused_unavailable(UpdateSpec(rule="adam", master=MasterWeights("bf16_sr"), **base), p, codes)
    if HAS_CUDA:
        q, c = p.cuda(), codes.cuda()
        assert "grid-wide" in fused_unavailable(UpdateSpec(rule="adam", master=MasterWeights("fp16"), **base), q, c)


def gpu_report() -> None:
    """Compact fused-vs-eager agreement table on the GPU, per format combination and for the two bias-correction
    sources (``python tests/optim/test_fused_step.py gpu-report``); the numbers docs/optimizer.md quotes."""
    import lowbit_amp.optim.update as U

    for torch_bc in (False, True):
        U.FUSED_TORCH_BIAS_CORRECTION = torch_bc
        for m, v in COMBOS:
            out = run_pair("cuda", {"exp_avg": m, "exp_avg_sq": v, "master_weights": "bf16_sr"})
            codes = " ".join(f"{name}={min(f for f, mo in out['codes_equal'] if mo == moment):.5f}"
                             for name, moment in (("m", "exp_avg"), ("v", "exp_avg_sq")))
            parts = max([r for r, _, _ in out["parts_rel"]] or [0.0])
            print(f"torch_bc={torch_bc} m={m:4s} v={v:11s} param_bit_identical={min(out['param_equal']):.5f} "
                  f"max_ulps={max(out['param_ulps']):.2f} codes_identical(min over params) {codes} "
                  f"scale_k_max_rel={parts:.1e} decoded_ok={all(out['decoded_ok'])}", flush=True)
    U.FUSED_TORCH_BIAS_CORRECTION = False


def _main(case: dict) -> None:  # subprocess entry of the interpreter tests
    import lowbit_amp.optim.update as U

    U.FUSED_ON_CPU_INTERPRETER = True
    extra = {"maximize": True} if case.get("maximize") else None
    out = run_pair("cpu", case["storage"], dtype=getattr(torch, case.get("dtype", "bfloat16")),
                   grad=case.get("grad", "e4m3"), cls=LowBitAdam if case.get("adam") else LowBitAdamW,
                   nan_step=case.get("nan_step"), steps=case.get("steps", 2), extra=extra,
                   shapes=[(33, 17), (5, 300), (7,)], groups=case.get("groups", False),
                   persistent_grads=case.get("persistent_grads", False), halve_lr_at=case.get("halve_lr_at"),
                   rebind_at=case.get("rebind_at"))
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "gpu-report":
        gpu_report()
    else:
        import lowbit_amp.optim.update as _U

        _U.FUSED_ALLOW_UNVERIFIED = True  # the interpreter checks the kernel's logic in every mode (all agree there)
        _main(json.loads(sys.argv[1]))
