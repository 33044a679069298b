"""FP8-saved attention (lowbit_amp/recipes/fp8_attention.py, ``activations.attention: fp8``): gradients against a
float64 reference, what it keeps alive, when it declines, and training parity on the tiny GPT.

Floors (measured on CPU, torch 2.13, 2026-12-01):

* gradients of q, k, v through causal attention, fp32 inputs, q/k/v recomputed from their FP8 copies vs float64 exact:
  dq 26.0-26.6, dk 25.5-26.7, dv 30.6-32.0 dB over 3 seeds x 2 shapes (exact fp32 attention: 129.8-134.6 dB)
                                                     -> floor 24 dB, the recipe's gradient floor (test_fp8_activations)
* the forward output is the exact one (bit-identical to plain SDPA)
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import lowbit_amp as amp
from lowbit_amp.config import ConfigError
from lowbit_amp.models import TinyGPT
from lowbit_amp.parity import PARITY_CONFIG
from lowbit_amp.quant.metrics import sqnr_db
from lowbit_amp.recipes.fp8_activations import fp8_activation_storage, storage_of
from lowbit_amp.recipes.fp8_attention import qkv_eligible

GRAD_FLOOR_DB = 24.0  # measured >= 25.5


def _attention_grads(q, k, v, dy, fp8: bool):  # type: ignore[no-untyped-def]
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    qi, ki, vi = q * 1.0, k * 1.0, v * 1.0  # non-leaves, as inside a model
    if fp8:
        with fp8_activation_storage(min_numel=0, attention="fp8") as storage:
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
        assert storage.stats.packed_tensors == 3, storage.stats
    else:
        out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
    out.backward(dy)
    return out.detach(), [q.grad, k.grad, v.grad]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 4, 64, 32), (1, 3, 37, 48)])
def test_gradients_vs_float64(seed: int, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(4))
    out_ref, ref = _attention_grads(q, k, v, dy, fp8=False)
    out_fp8, got = _attention_grads(q.float(), k.float(), v.float(), dy.float(), fp8=True)
    out_plain, _ = _attention_grads(q.float(), k.float(), v.float(), dy.float(), fp8=False)
    assert torch.equal(out_fp8, out_plain)  # the forward is untouched
    sqnr = [sqnr_db(r, g) for r, g in zip(ref, got)]
    assert min(sqnr) >= GRAD_FLOOR_DB, sqnr


def test_keeps_neither_output_nor_full_precision_inputs() -> None:
    """After forward, the high-precision q/k/v buffer is not referenced by the graph (only FP8 copies are)."""
    x = torch.randn(2, 64, 3 * 32, requires_grad=True)
    with fp8_activation_storage(min_numel=0, attention="fp8"):
        qkv = x * 2.0  # the buffer q, k, v view (a model's fused qkv projection output)
        alive = weakref.ref(qkv)
        q, k, v = qkv.view(2, 64, 3, 4, 8).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        loss = out.float().square().sum()
    del qkv, q, k, v
    gc.collect()
    assert alive() is None  # freed: nothing saved it
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_declines_dropout_grad_masks_and_no_grad() -> None:
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    mask = torch.zeros(16, 16, requires_grad=True)
    assert qkv_eligible((q, q, q), {}, 0)
    assert not qkv_eligible((q, q, q), {"dropout_p": 0.1}, 0)
    assert not qkv_eligible((q, q, q, None, 0.1), {}, 0)
    assert not qkv_eligible((q, q, q), {"attn_mask": mask}, 0)
    assert not qkv_eligible((q, q, q), {}, q.numel() + 1)  # below min_numel: exact
    with torch.no_grad():
        assert not qkv_eligible((q, q, q), {}, 0)
    with fp8_activation_storage(min_numel=0, attention="fp8") as storage:
        F.scaled_dot_product_attention(q * 1.0, q * 1.0, q * 1.0, dropout_p=0.5)
    assert storage.stats.packed_tensors == 0 and storage.stats.kept_reasons.get("exact region", 0) >= 1


def test_unknown_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="attention='int4'"):
        fp8_activation_storage(attention="int4")
    with pytest.raises(ConfigError, match="attention"):
        amp.initialize(TinyGPT(PARITY_CONFIG), opt_level="O1", activations={"storage": "fp8", "attention": "int4"})
    with pytest.raises(ConfigError, match="activations.storage: fp8"):  # the option alone would silently do nothing
        amp.initialize(TinyGPT(PARITY_CONFIG), opt_level="O1", activations={"attention": "fp8"})


def test_tiny_gpt_trains_within_2_percent_of_o0() -> None:
    """The parity recipe (tests/test_convergence.py). Measured (120 steps): see docs/recipes.md."""
    from lowbit_amp.parity import parity_run

    base = parity_run("O0")
    run = parity_run("O1", overrides={"activations.storage": "fp8", "activations.min_numel": 4096,
                                      "activations.attention": "fp8"})
    stats = storage_of(run.model).stats
    assert stats.packed_tensors > 0
    assert run.gap_to(base) <= 0.02, (run.val_loss, base.val_loss, run.train_last10, base.train_last10)
