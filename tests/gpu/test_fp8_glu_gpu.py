"""GPU-only: the fused gated-unit backward of FP8 activation storage (``activations.glu: fused``;
lowbit_amp/kernels/glu_backward.py) on CUDA — the Triton kernel against the reference ops from the same FP8 codes,
and the transient memory of a SwiGLU MLP's backward with and without it. SiLU passed on an H200 on 2026-12-01, the
GELU variants in a later run that day (so all three are in ``fp8_glu.GPU_VERIFIED``); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit_amp.recipes.fp8_activations as fa
from lowbit_amp.quant.metrics import sqnr_db
from lowbit_amp.recipes import fp8_glu
from lowbit_amp.recipes.fp8_glu import _decode_f32, _kernel_serves, glu_backward_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("numel", [37, 1000, 1 << 20])
def test_kernel_matches_reference_on_cuda(dtype, numel, act, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lowbit_amp.kernels.glu_backward import glu_backward_packed

    gen = torch.Generator(device="cuda").manual_seed(numel)
    a, b, g = ((torch.randn(numel, device="cuda", generator=gen) * 3).to(dtype) for _ in range(3))
    pa, pb = fa.quantize_groups(a, 16), fa.quantize_groups(b, 16)
    monkeypatch.setattr(fp8_glu, "GPU_VERIFIED", frozenset({"silu", "gelu", "gelu_tanh"}))  # test them all
    assert _kernel_serves(g, pa, pb, act)
    ref = glu_backward_reference(g, _decode_f32(pa), _decode_f32(pb), act=act)
    got = glu_backward_packed(g, pa, pb, act=act)
    mag = g.float().abs() * (_decode_f32(pa).abs() + _decode_f32(pb).abs())
    for r, k in zip(ref, got):  # hardware exp/erf vs torch's: the interpreter test's tolerance
        ulp = (torch.finfo(dtype).eps * r.float().abs() + 2.0**-21 * mag).clamp_min(torch.finfo(dtype).tiny)
        assert ((k.float() - r.float()).abs() <= ulp).all(), (act, dtype, numel)
        assert sqnr_db(k.double(), r.double()) > 50


@cuda
def test_mlp_backward_peak_is_lower_and_gradients_agree() -> None:
    """A SwiGLU MLP of the anchor's width at 4096 tokens: the backward's peak above what the forward left allocated,
    fused vs separate, and the input gradient of both against the bf16 autograd one."""
    torch.manual_seed(0)
    dim, ffn, tokens = 4096, 14336, 4096
    w1, w3, w2 = ((torch.randn(o, i, device="cuda", dtype=torch.bfloat16) / i**0.5).requires_grad_()  # leaves: kept
                  for o, i in ((ffn, dim), (ffn, dim), (dim, ffn)))
    x0 = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)

    def run(glu: str | None):  # type: ignore[no-untyped-def]
        x = x0.clone().requires_grad_()
        for w in (w1, w3, w2):
            w.grad = None
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if glu is None:
            y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
        else:
            with fa.fp8_activation_storage(min_numel=0, glu=glu):
                y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
        torch.cuda.synchronize()
        forward_peak = torch.cuda.max_memory_allocated() - start
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y.backward(dy)
        torch.cuda.synchronize()
        return x.grad.double(), torch.cuda.max_memory_allocated() - before, before - start, forward_peak

    exact, *_ = run(None)
    sep, peak_sep, held_sep, fwd_sep = run("separate")
    fused, peak_fused, held_fused, fwd_fused = run("fused")
    assert sqnr_db(fused, exact) >= 24.0 and sqnr_db(sep, exact) >= 24.0
    elem = tokens * ffn
    # separate decodes silu(a) and b (2 B/element each in bf16) before the product's backward; fused decodes nothing
    assert peak_fused <= peak_sep - 3 * elem, (peak_fused, peak_sep)
    assert held_fused <= held_sep - elem, (held_fused, held_sep)  # silu(a) no longer saved (~1.06 B/element)
    assert fwd_fused <= fwd_sep, (fwd_fused, fwd_sep)  # a is not kept alive in the model dtype until the product
