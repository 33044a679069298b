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
