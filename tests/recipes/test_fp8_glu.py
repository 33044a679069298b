"""The fused SwiGLU of FP8 activation storage (lowbit_amp/recipes/fp8_glu.py, ``activations.glu: fused``):
gradients against float64, what it saves, when the pattern match declines, the reference backward's formula, the
Triton kernel in the interpreter, and training parity on the tiny GPT.

Floors (measured on CPU, torch 2.13, 2026-12-01; x (rows, 256) -> a = x W1^T, b = x W3^T, h = silu(a) * b):

* forward output: bit-identical to the unfused storage path (it multiplies the same tensors);
* dx vs float64, bf16/fp16/fp32 models, rows 64 and 37 (ffn 512 and 200): fused 30.4-30.7 dB, unfused 31.2-31.5 dB
  (grad_b uses silu(a) recomputed from an FP8 ``a``, whose error is ``silu'(a) * a`` times E4M3's relative error —
  up to 1.28x that of an FP8-stored ``silu(a)`` for a > 0, less for a < 0; 0.8 dB apart)
                                                               -> floor 24 dB, the recipe's gradient floor
* the reference backward from exact inputs vs the float64 formula: one rounding to the dtype (2^-8 bf16, 2^-11 fp16,
  2^-24 fp32, relative) plus fp32 arithmetic error (2^-21 of the terms' magnitudes)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import lowbit_amp as amp
from lowbit_amp.config import ConfigError
from lowbit_amp.models import TinyGPT
from lowbit_amp.parity import PARITY_CONFIG
from lowbit_amp.quant.metrics import sqnr_db
from lowbit_amp.recipes.fp8_activations import fp8_activation_storage, storage_of
from lowbit_amp.recipes.fp8_glu import glu_backward_reference

GRAD_FLOOR_DB = 24.0  # measured >= 30.4


ACTS = ("silu", "gelu", "gelu_tanh")


def _act_fn(act: str):  # type: ignore[no-untyped-def]
    if act == "silu":
        return F.silu
    return lambda t: F.gelu(t, approximate="none" if act == "gelu" else "tanh")


def _act_module(act: str) -> torch.nn.Module:
    """What Hugging Face models call: ``nn.SiLU()`` (LlamaMLP's act_fn) or ``nn.GELU(approximate=...)`` (GeGLU)."""
    return torch.nn.SiLU() if act == "silu" else torch.nn.GELU(approximate="none" if act == "gelu" else "tanh")


def _mlp(x64, w1, w3, g, dtype, glu, order="sb", storage=True, act="silu"):  # type: ignore[no-untyped-def]
    x = x64.to(dtype).clone().requires_grad_()
    w1d, w3d = w1.to(dtype).clone().requires_grad_(), w3.to(dtype).clone().requires_grad_()
    fn = _act_fn(act)
    if storage:
        with fp8_activation_storage(min_numel=0, glu=glu) as st:
            a, b = x @ w1d.t(), x @ w3d.t()
            if order == "module":
                h = _act_module(act)(a) * b
            else:
                h = fn(a) * b if order == "sb" else (b * fn(a) if order == "bs" else torch.mul(fn(a), b))
    else:
        st = None
        a, b = x @ w1d.t(), x @ w3d.t()
        h = fn(a) * b
    h.backward(g.to(dtype))
    return h.detach(), x.grad.double(), w1d.grad.double(), w3d.grad.double(), st


def _data(rows: int, ffn: int, seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 256, generator=gen, dtype=torch.float64)
    w1 = torch.randn(ffn, 256, generator=gen, dtype=torch.float64) / 16
    w3 = torch.randn(ffn, 256, generator=gen, dtype=torch.float64) / 16
    g = torch.randn(rows, ffn, generator=gen, dtype=torch.float64)
    return x, w1, w3, g


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,ffn", [(64, 512), (37, 200)])
def test_gradients_vs_float64_and_forward_unchanged(dtype, rows, ffn, act) -> None:  # type: ignore[no-untyped-def]
    x, w1, w3, g = _data(rows, ffn)
    _, ref_dx, ref_dw1, ref_dw3, _ = _mlp(x, w1, w3, g, torch.float64, "separate", storage=False, act=act)
    h_sep, *_, st_sep = _mlp(x, w1, w3, g, dtype, "separate", act=act)
    h, dx, dw1, dw3, st = _mlp(x, w1, w3, g, dtype, "fused", act=act)
    assert torch.equal(h, h_sep)
    for got, ref in ((dx, ref_dx), (dw1, ref_dw1), (dw3, ref_dw3)):
        assert sqnr_db(got, ref) >= GRAD_FLOOR_DB
    assert st.stats.glu_fused == 1 and st_sep.stats.glu_fused == 0
    # silu(a) is no longer saved: one packed tensor fewer (x, a, b instead of x, a, silu(a), b)
    assert st.stats.packed_tensors == st_sep.stats.packed_tensors - 1
    assert st.stats.packed_bytes_out < st_sep.stats.packed_bytes_out


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("order", ["bs", "mul", "module"])
def test_operand_order_and_torch_mul_match(order: str, act: str) -> None:
    x, w1, w3, g = _data(16, 128)
    *_, st = _mlp(x, w1, w3, g, torch.float32, "fused", order=order, act=act)
    assert st.stats.glu_fused == 1


def test_declines_what_it_cannot_fuse_exactly_and_its_gradients_stay_right() -> None:
    gen = torch.Generator().manual_seed(5)
    a0, b0 = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)

    def run(glu: str):  # type: ignore[no-untyped-def]
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        ai, bi = a * 1.0, b * 1.0  # non-leaves, as inside a model
        with fp8_activation_storage(min_numel=0, glu=glu) as st:
            s = F.silu(ai)
            s.add_(0.5)  # modified in place after SiLU: its recorded input no longer explains it
            outs = [s * bi, F.silu(ai) * bi[:1], F.silu(ai) * 2.0]  # in-place, broadcasting, not a tensor
            with torch.no_grad():
                outs.append(F.silu(ai) * bi)  # no grad
            outs.append(F.silu(ai, inplace=False) * bi)  # kwargs: still a plain out-of-place SiLU -> fused
            outs.append(F.silu(ai) * b0)  # b needs no gradient -> fused, only grad_a computed
        sum(o.sum() for o in outs if o.requires_grad).backward()
        return st.stats.glu_fused, torch.cat([a.grad.reshape(-1), b.grad.reshape(-1)])

    fused_count, fused = run("fused")
    separate_count, separate = run("separate")
    assert (fused_count, separate_count) == (2, 0)
    assert sqnr_db(fused, separate) >= GRAD_FLOOR_DB


def test_silu_output_used_twice_keeps_both_gradients() -> None:
    x, w1, w3, g = _data(16, 128)

    def run(glu: str | None) -> torch.Tensor:
        a = (x.float() @ w1.float().t()).requires_grad_()
        b = (x.float() @ w3.float().t()).requires_grad_()
        if glu is None:
            s = F.silu(a)
            out = s * b + s
        else:
            with fp8_activation_storage(min_numel=0, glu=glu) as st:
                s = F.silu(a)
                out = s * b + s
            assert st.stats.glu_fused == (1 if glu == "fused" else 0)
        out.backward(g.float())
        return torch.cat([a.grad.reshape(-1), b.grad.reshape(-1)])

    exact = run(None)
    assert sqnr_db(run("fused"), exact) >= GRAD_FLOOR_DB
    assert sqnr_db(run("fused"), run("separate")) >= GRAD_FLOOR_DB


def test_second_backward_is_a_clear_error() -> None:
    a = torch.randn(8, 64, requires_grad=True) * 1.0
    b = torch.randn(8, 64, requires_grad=True) * 1.0
    with fp8_activation_storage(min_numel=0, glu="fused"):
        h = F.silu(a) * b
    h.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        h.sum().backward()


def _float64_parts(a: torch.Tensor, act: str):  # type: ignore[no-untyped-def]
    """In float64, accurate in the tails (erfc, sigmoid forms): ``act(a)``, ``act'(a)``, and the scales of the FP32
    computation's error — of ``act'`` (the magnitude of the terms it sums; it cancels where it crosses 0) and of
    ``act`` (GELU's ``(1 + erf)/2`` has an absolute FP32 error of 2^-24, like torch's own ``F.gelu``, so its error
    scales with ``|a|``, not with the tiny value in the far negative tail)."""
    if act == "silu":
        sig = torch.sigmoid(a)
        value = a * sig
        return value, sig * (1 + a * (1 - sig)), sig * (1 + a.abs() * (1 - sig)), value.abs()
    if act == "gelu":
        cdf = 0.5 * torch.erfc(-a / 2**0.5)
        pdf = torch.exp(-0.5 * a * a) / (2 * torch.pi) ** 0.5
        return a * cdf, cdf + a * pdf, 1 + (a * pdf).abs(), a.abs()
    k0, k1 = (2 / torch.pi) ** 0.5, 0.044715
    u = k0 * (a + k1 * a**3)
    half_one_plus_t = torch.sigmoid(2 * u)  # (1 + tanh u) / 2
    sech2 = 4 * torch.sigmoid(2 * u) * torch.sigmoid(-2 * u)  # 1 - tanh^2 u
    slope = 0.5 * a * sech2 * k0 * (1 + 3 * k1 * a * a)
    value = a * half_one_plus_t
    amplify = 1 + 2 * u.abs()  # exp(-2|u|) turns u's FP32 rounding (relative) into 2|u| times that in the result
    return value, half_one_plus_t + slope, (half_one_plus_t + slope.abs()) * amplify, value.abs() * amplify


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_reference_backward_is_the_float64_formula_rounded_once(dtype, act) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    g, a, b = (torch.randn(1001, generator=gen, dtype=torch.float64) * 4 for _ in range(3))
    a, b = a.float().double(), b.float().double()  # the inputs are FP32 decodings: exact in both
    ga, gb = glu_backward_reference(g.to(dtype), a.float(), b.float(), act=act)
    value, slope, terms, value_scale = _float64_parts(a, act)
    g_in = g.to(dtype).double()
    exp_ga, exp_gb = g_in * b * slope, g_in * value
    tol = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]
    # FP32 arithmetic error, bounded by a few fp32 ulps of the terms' magnitudes (act' cancels where it crosses 0)
    fp32_ga = 2.0**-21 * (g_in.abs() * b.abs() * terms)
    fp32_gb = 2.0**-21 * g_in.abs() * value_scale
    for got, exp, fp32_err in ((ga, exp_ga, fp32_ga), (gb, exp_gb, fp32_gb)):
        # + one rounding to the dtype: relative 2^-p, absolute below its smallest normal (fp16's subnormals)
        err = (got.double() - exp).abs() - tol * exp.abs() - fp32_err - torch.finfo(dtype).tiny
        assert err.max().item() <= 0, err.max().item()
    need_a_only = glu_backward_reference(g.to(dtype), a.float(), b.float(), need_b=False, act=act)
    assert need_a_only[1] is None and torch.equal(need_a_only[0], ga)


def test_config_requires_fp8_storage_and_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="activations.storage: fp8"):
        amp.initialize(TinyGPT(PARITY_CONFIG), opt_level="O1", activations={"glu": "fused"})
    with pytest.raises(ValueError, match="glu='gelu'"):
        fp8_activation_storage(glu="gelu")


def test_low_memory_config_trains_the_tiny_gpt_within_2_percent_of_o3() -> None:
    """configs/O3_low_memory.yaml as shipped (fused SwiGLU, FP8 attention, FP8 activations, O3, no weight cache), with
    a lower ``min_numel`` so the tiny model's tensors qualify, on the parity recipe (tests/test_convergence.py), against
    O3 itself: what the memory recipes add (O3 vs O0 is test_convergence's). Measured (CPU, torch 2.13, 2026-12-01):
    val 2.5830 vs O3 2.5648 (+0.71%) and O0 2.5371 (+1.81%)."""
    from lowbit_amp.config_files import locate_config
    from lowbit_amp.parity import parity_run

    run = parity_run(locate_config("configs/O3_low_memory.yaml"), overrides={"activations.min_numel": 4096})
    stats = storage_of(run.model).stats
    assert stats.glu_fused == PARITY_CONFIG.n_layer  # one SwiGLU per block, every step
    assert run.gap_to(parity_run("O3")) <= 0.02


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_in_interpreter_matches_the_reference() -> None:
    """The Triton backward (lowbit_amp/kernels/glu_backward.py) under TRITON_INTERPRET=1 against the reference
    from the same FP8 codes: ragged sizes, group sizes 16/32, every output dtype, one-sided gradients, NaN input."""
    script = textwrap.dedent("""
        import torch
        import lowbit_amp.recipes.fp8_activations as fa
        from lowbit_amp.recipes.fp8_glu import _decode_f32, glu_backward_reference
        from lowbit_amp.kernels.glu_backward import glu_backward_packed

        gen = torch.Generator().manual_seed(0)
        checked = 0
        for act, dtype in [(act, dt) for act in ("silu", "gelu", "gelu_tanh")
                           for dt in (torch.bfloat16, torch.float16, torch.float32)]:
            for numel, gs in ((1000, 16), (4096, 32), (37, 16), (16 * 130, 16)):
                a, b, g = ((torch.randn(numel, generator=gen) * 3).to(dtype) for _ in range(3))
                pa, pb = fa.quantize_groups(a, gs), fa.quantize_groups(b, gs)
                ref = glu_backward_reference(g, _decode_f32(pa), _decode_f32(pb), act=act)
                got = glu_backward_packed(g, pa, pb, act=act)
                # exp/erf differ (numpy's vs torch's) by an fp32 ulp or two: within 1 ulp of the output dtype plus a
                # few fp32 ulps of the terms' magnitudes (act' cancels where it crosses 0: silu near a = -1.28, 7.6
                # ulps of |result| measured there; GELU near a = -0.75, 181 ulps of its tiny result)
                mag = g.float().abs() * (_decode_f32(pa).abs() + _decode_f32(pb).abs())
                for r, k in zip(ref, got):
                    ulp = (torch.finfo(dtype).eps * r.float().abs() + 2.0**-21 * mag).clamp_min(torch.finfo(dtype).tiny)
                    assert ((k.float() - r.float()).abs() <= ulp).all(), (act, dtype, numel, gs)
                only_b = glu_backward_packed(g, pa, pb, need_a=False, act=act)
                assert only_b[0] is None and torch.equal(only_b[1], got[1])
                checked += 1
        a = torch.randn(64); a[5] = float("nan")
        pa, pb = fa.quantize_groups(a, 16), fa.quantize_groups(torch.randn(64), 16)
        ga, gb = glu_backward_packed(torch.randn(64), pa, pb)
        assert ga.isnan().all() and gb.isnan().all()
        print("ok", checked)
    """)
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_checkpointed_regions_run_as_written() -> None:
    """Inside non-reentrant activation checkpointing the region's own saved-tensor hooks are innermost: the fused
    SwiGLU and FP8-saved attention must not run there (they changed what the recompute reproduces: CheckpointError)."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(7)
    w1, w3 = (torch.randn(64, 32, generator=gen).requires_grad_() for _ in range(2))
    x0 = torch.randn(16, 32, generator=gen)
    q0 = torch.randn(2, 2, 16, 8, generator=gen)

    def block(x, q):  # type: ignore[no-untyped-def]
        h = F.silu(x @ w1.t()) * (x @ w3.t())
        return h.sum() + F.scaled_dot_product_attention(q * 1.0, q * 1.0, q * 1.0).sum()

    grads = []
    for use_checkpoint in (True, False):
        x, q = x0.clone().requires_grad_(), q0.clone().requires_grad_()
        with fp8_activation_storage(min_numel=0, glu="fused", attention="fp8") as st:
            out = checkpoint(block, x, q, use_reentrant=False) if use_checkpoint else block(x, q)
        out.backward()
        assert st.stats.glu_fused == (0 if use_checkpoint else 1)
        grads.append(torch.cat([x.grad.reshape(-1), q.grad.reshape(-1)]))
    assert sqnr_db(grads[1], grads[0]) >= GRAD_FLOOR_DB  # checkpointed = exact; fused/FP8 within the recipe's floor
