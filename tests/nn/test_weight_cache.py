"""``LowBitLinear.invalidate_weight_cache``: writes through ``weight.data`` bypass the cache key; the public call fixes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit_amp.config import LinearConfig
from lowbit_amp.nn import LowBitLinear, invalidate_weight_caches
from lowbit_amp.quant.metrics import sqnr_db


def test_data_write_needs_invalidate_and_invalidate_recasts() -> None:
    torch.manual_seed(0)
    layer = LowBitLinear(64, 32, config=LinearConfig())
    x = torch.randn(16, 64)
    with torch.no_grad():
        stale = layer(x)
        new_w = torch.randn_like(layer.weight) * 0.05
        layer.weight.data.copy_(new_w)  # what ZeRO/FSDP2-style engines do: bumps neither _version nor data_ptr
        # the pitfall the method exists for: the forward still runs on the FP8 cast of the old weight
        assert torch.equal(layer(x), stale)
        layer.invalidate_weight_cache()
        fresh = layer(x)
    ref = F.linear(x.double(), new_w.double(), layer.bias.double())
    # floor from tests/nn/test_linear.py (FP8 E4M3 forward, Gaussian data, measured ~29 dB): >= 27 dB
    assert sqnr_db(ref, fresh.double()) >= 27.0
    assert sqnr_db(ref, stale.double()) < 10.0  # the stale output really was the old weight's


def test_invalidate_weight_caches_covers_every_layer() -> None:
    model = nn.Sequential(LowBitLinear(16, 16, config=LinearConfig()), nn.ReLU(),
                          LowBitLinear(16, 8, config=LinearConfig(compute="int8")), nn.Linear(8, 4))
    model(torch.randn(4, 16))
    assert all(m._weight_cache is not None for m in model if isinstance(m, LowBitLinear))
    assert invalidate_weight_caches(model) == 2
    assert all(m._weight_cache is None for m in model if isinstance(m, LowBitLinear))


# ------------------------------------------------------------------------------------------ weight_cache: none
import dataclasses  # noqa: E402

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _grads(cfg: LinearConfig, m: int, k: int, n: int, dtype: torch.dtype, device: str):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=gen))
    layer = LowBitLinear.from_linear(lin.to(device), cfg)
    x = torch.randn(2, m, k, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(2, m, n, generator=gen).to(device, dtype)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    outs = []
    for _ in range(2):  # two micro-batches: the second forward reuses (step) or re-casts (none) the weight
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.backward(dy)
        outs.append(y.detach())
    wgrad = lin.weight.grad
    wgrad = wgrad.to_float() if hasattr(wgrad, "to_float") else wgrad  # O2+: an Fp8Grad
    return outs, x.grad, wgrad, lin.bias.grad, saved, layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 128, 96), (37, 100, 51), (5, 48, 32)])  # multiples of 16 and not
@pytest.mark.parametrize("weight_grad", ["hp", "e4m3"])
@pytest.mark.parametrize("w_algo", ["current", "delayed"])
def test_no_weight_cache_is_bit_identical_and_holds_no_fp8_weight(device, dtype, shape, weight_grad, w_algo) -> None:  # type: ignore[no-untyped-def]
    """Backward re-casts Wᵀ from the weight with forward's scale: an elementwise cast with one scale, so the same codes
    as transposing forward's W8 — outputs and all gradients equal the cached path's bit for bit, while no FP8 copy of
    the weight is cached on the layer or saved for backward."""
    base = LinearConfig(weight_grad=weight_grad)
    base = dataclasses.replace(base, weight=dataclasses.replace(
        base.weight, scaling=dataclasses.replace(base.weight.scaling, algo=w_algo)))
    m, k, n = shape
    step = _grads(base, m, k, n, dtype, device)
    none = _grads(dataclasses.replace(base, weight_cache="none"), m, k, n, dtype, device)
    for a, b in zip(step[0], none[0]):
        assert torch.equal(a, b)
    for a, b in zip(step[1:4], none[1:4]):
        assert torch.equal(a, b)
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    weight_shaped = [t for t in none[4] if t.dtype in fp8 and tuple(t.shape) in ((n, k), (k, n))]
    assert weight_shaped == [] and none[5]._weight_cache is None
    # the check can fail: the cached path does save an FP8 weight
    assert [t for t in step[4] if t.dtype in fp8 and tuple(t.shape) in ((n, k), (k, n))]


def test_weight_cache_rejects_unknown_values() -> None:
    from lowbit_amp.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="weight_cache"):
        config_from_dict({"linear": {"weight_cache": "sometimes"}})
