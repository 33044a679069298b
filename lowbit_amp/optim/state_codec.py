"""How one optimizer moment is stored: a codec turns FP32 values into stored *parts* (codes + scales) and back.

Every moment of a parameter with ``n`` elements is held as a ``(blocks, block_size)`` matrix (the flat parameter,
zero-padded to a whole number of blocks), so per-block scales are a ``(blocks, 1)`` column that broadcasts against it.
The casts are the core's :func:`~lowbit_amp.quant.cast.quantize`/``dequantize`` with tensorwise granularity — the
``(blocks, 1)`` scale broadcasts row by row, which is exactly per-block scaling without materialising an expanded scale.

=================  =============================  =======================================================  ==========
codec              parts                          why                                                      B/param
=================  =============================  =======================================================  ==========
``fp32``           value fp32                     reference; tracks torch.optim.AdamW                      4
``bf16``           value bf16 (nearest)           halves m with torch's own cast                           2
``fp16``           codes fp16, scale per block    v ≥ 0 spans many octaves; a per-block power-of-2 scale   2.03
                                                  puts each block's max near fp16's max, so tiny v never
                                                  become fp16 subnormals/zeros
``e4m3``           codes e4m3, scale per block    FP8 first moment (FP8-LM / COAT)                         1.03
``e4m3_expand``    codes e4m3, max, k per block   COAT's dynamic range expansion: ``f(x)=sign(x)(|x|/max)^k``  1.06
                                                  with k chosen so the block's max/min ratio fills E4M3's
                                                  normal range; codes = 448·f(x); inverted with
                                                  ``max·|y/448|^(1/k)`` (the part named "scale" holds max)
=================  =============================  =======================================================  ==========

A plain-E4M3 second moment is deliberately absent: its 2^17 range flushes most of a block's small v to zero, and a zero
v makes ``m/(√v+eps)`` explode (tests/optim/test_state_codec.py measures the fraction of v flushed to zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit_amp.formats import E4M3, FP16
from lowbit_amp.quant.cast import compute_scale, dequantize, quantize
from lowbit_amp.quant.granularity import amax

__all__ = ["CODECS", "StateCodec", "get_codec"]

# COAT expands into E4M3's *normal* range [2^-6, 448]: every code then keeps its 3 mantissa bits (mapping the block's
# minimum to the subnormal 2^-9 would leave it with none).
_E4M3_LOG_RANGE = math.log(E4M3.max / E4M3.min_normal)
_K_MAX = 8.0  # a block whose values are (nearly) equal has log-range ~0; cap k (a larger k buys nothing there)


def _expand_code_scale(device: torch.device) -> torch.Tensor:
    """Expanded values lie in [-1, 1] (normalised by the block max first): one constant scale maps 1 to E4M3's max."""
    return torch.full((1, 1), E4M3.max, device=device)


@dataclass(frozen=True)
class StateCodec:
    """One storage format for a ``(blocks, block_size)`` FP32 state; see the module docstring for the formats."""

    name: str

    def zeros(self, blocks: int, block_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The parts of an all-zero state."""
        shape = (blocks, block_size)
        if self.name == "fp32":
            return {"value": torch.zeros(shape, device=device)}
        if self.name == "bf16":
            return {"value": torch.zeros(shape, device=device, dtype=torch.bfloat16)}
        dtype = torch.float16 if self.name == "fp16" else E4M3.dtype
        parts = {"codes": torch.zeros(shape, device=device, dtype=dtype),
                 "scale": torch.ones((blocks, 1), device=device)}
        if self.name == "e4m3_expand":
            parts["k"] = torch.ones((blocks, 1), device=device)
        return parts

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """FP32 ``(blocks, block_size)`` values."""
        if self.name in ("fp32", "bf16"):
            return parts["value"].float()
        if self.name == "e4m3_expand":  # codes hold sign·(|x|/max)^k · 448; "scale" holds the block's max
            hp = dequantize(parts["codes"], _expand_code_scale(parts["codes"].device), torch.float32)
            return torch.sign(hp) * hp.abs().pow(parts["k"].reciprocal()) * parts["scale"]
        return dequantize(parts["codes"], parts["scale"], torch.float32)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """New parts for FP32 ``x`` (the caller decides whether to commit them)."""
        if self.name == "fp32":
            return {"value": x.float()}
        if self.name == "bf16":
            return {"value": x.to(torch.bfloat16)}
        if self.name == "fp16":
            scale = compute_scale(amax(x, "row"), FP16, power_of_2=True)
            return {"codes": quantize(x, scale, FP16), "scale": scale}
        if self.name == "e4m3":
            scale = compute_scale(amax(x, "row"), E4M3)
            return {"codes": quantize(x, scale, E4M3), "scale": scale}
        return self._encode_expanded(x)

    def _encode_expanded(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        magnitude = x.abs()
        block_max = magnitude.amax(dim=1, keepdim=True)
        nonzero_min = torch.where(magnitude > 0, magnitude, torch.full_like(magnitude, float("inf"))).amin(
            dim=1, keepdim=True)
        log_range = torch.log(block_max / nonzero_min)  # inf/NaN for all-zero blocks, 0 for constant blocks
        k = (_E4M3_LOG_RANGE / log_range).clamp(max=_K_MAX)
        k = torch.where(torch.isfinite(k) & (k > 0), k, torch.ones_like(k))
        # Normalise by the block max *before* the power: |x|^k of a small v (1e-6^8 = 1e-48) underflows fp32 to 0 and a
        # whole block of v decoded to zero, which made Adam step by m/eps (measured: O3 loss jumps, docs/optimizer.md).
        # (|x|/max)^k lies in [2^-6/448, 1] by construction of k, so it never underflows.
        denom = torch.where(block_max > 0, block_max, torch.ones_like(block_max))
        expanded = torch.sign(x) * (magnitude / denom).pow(k)
        codes = quantize(expanded, _expand_code_scale(x.device), E4M3)
        return {"codes": codes, "scale": denom, "k": k}

    def bytes_per_element(self, block_size: int) -> float:
        """Storage per state element, scales included (what ``tools/measure_memory.py`` measures)."""
        per_block = {"fp32": 0, "bf16": 0, "fp16": 4, "e4m3": 4, "e4m3_expand": 8}[self.name]
        elem = {"fp32": 4, "bf16": 2, "fp16": 2, "e4m3": 1, "e4m3_expand": 1}[self.name]
        return elem + per_block / block_size


CODECS = ("fp32", "bf16", "fp16", "e4m3", "e4m3_expand")


def get_codec(name: str) -> StateCodec:
    if name not in CODECS:
        raise ValueError(f"Unknown optimizer state format {name!r}; valid formats are {list(CODECS)}.")
    return StateCodec(name)
