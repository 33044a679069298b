"""Master weights: where the optimizer reads the FP32 weight from and how it writes the updated one back.

==========  ===============================================  ======================================================
mode        stored                                           write-back
==========  ===============================================  ======================================================
``none``    nothing; the model's parameter is the master     round-to-nearest into the parameter's dtype
``fp32``    FP32 copy (blocks)                               master exact; parameter = nearest cast of it
``fp16``    FP16 codes + per-tensor power-of-2 scale         nearest; the power-of-2 scale keeps small weights out of
                                                             fp16's subnormals and rescaling never re-rounds
``bf16_sr`` nothing if the parameter is bf16 or fp32 (it   stochastic rounding onto the bf16 grid (Micikevicius et
            holds every bf16 value exactly, so it *is* the   al., "Mixed Precision Training With 8-bit Floating
            master), else (fp16) a bf16 copy                 Point"): E[bf16 weight] = FP32 update, so updates far
                                                             below bf16's ulp still move the weight on average
==========  ===============================================  ======================================================

Stochastic rounding draws its noise from a counter-based hash of (element index, step, parameter salt) instead of a
stateful RNG: a resumed run reproduces the same roundings bit for bit, and the step stays one traceable function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit_amp.formats import BF16, FP16
from lowbit_amp.quant.cast import compute_scale, dequantize, quantize, round_stochastic
from lowbit_amp.quant.granularity import amax

__all__ = ["MASTER_MODES", "MasterWeights", "hash_uniform"]

MASTER_MODES = ("none", "fp32", "fp16", "bf16_sr")
_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values (products wrap; the mask keeps 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def hash_uniform(numel: int, step: torch.Tensor, salt: int, device: torch.device) -> torch.Tensor:
    """``numel`` float32 values in [0, 1), a deterministic function of (index, ``step``, ``salt``); no host sync."""
    index = torch.arange(numel, device=device, dtype=torch.int64)
    seed = _mix32((step.to(torch.int64) * 0x9E3779B1 + salt * 0x7FEB352D + 0x165667B1) & _MASK32)
    h = _mix32((index * 0x27D4EB2F + seed) & _MASK32)
    return (h >> 8).to(torch.float32) * (2.0**-24)


@dataclass(frozen=True)
class MasterWeights:
    """One master-weight mode; ``uses_param(dtype)`` says whether the parameter itself is the master."""

    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MASTER_MODES:
            raise ValueError(f"Unknown master_weights {self.mode!r}; valid modes are {list(MASTER_MODES)}.")

    def uses_param(self, param_dtype: torch.dtype) -> bool:
        """Whether the parameter itself holds the master. For ``bf16_sr`` an fp32 parameter does too: it stores the
        stochastically rounded bf16 values exactly, so a separate bf16 copy would repeat them (2 B/param: what O3 on
        an fp32 model, and on DeepSpeed ZeRO's fp32 partitions, used to keep)."""
        return self.mode == "none" or (self.mode == "bf16_sr" and param_dtype in (torch.bfloat16, torch.float32))

    def init(self, w_blocks: torch.Tensor, param_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Parts of a master initialised from the FP32 ``(blocks, block_size)`` parameter values."""
        if self.uses_param(param_dtype):
            return {}
        if self.mode == "fp32":
            return {"value": w_blocks.float().clone()}
        if self.mode == "bf16_sr":
            return {"value": w_blocks.to(torch.bfloat16)}
        scale = compute_scale(amax(w_blocks), FP16, power_of_2=True)
        return {"codes": quantize(w_blocks, scale, FP16), "scale": scale}

    def read(self, parts: dict[str, torch.Tensor], param_blocks: torch.Tensor) -> torch.Tensor:
        """FP32 master values; ``param_blocks`` is the padded parameter (used when it is the master)."""
        if not parts:
            return param_blocks.float()
        if "value" in parts:
            return parts["value"].float()
        return dequantize(parts["codes"], parts["scale"], torch.float32)

    def write(self, w: torch.Tensor, param_dtype: torch.dtype, step: torch.Tensor, salt: int
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(new master parts, new parameter values in param_dtype)`` from the updated FP32 weights ``w``."""
        if self.mode == "none":
            return {}, w.to(param_dtype)
        if self.mode == "fp32":
            return {"value": w}, w.to(param_dtype)
        if self.mode == "bf16_sr":
            noise = hash_uniform(w.numel(), step, salt, w.device).reshape(w.shape)
            rounded = round_stochastic(w, BF16, noise=noise).to(torch.bfloat16)
            if self.uses_param(param_dtype):
                return {}, rounded.to(param_dtype)
            return {"value": rounded}, rounded.to(param_dtype)
        scale = compute_scale(amax(w), FP16, power_of_2=True)
        codes = quantize(w, scale, FP16)
        return {"codes": codes, "scale": scale}, dequantize(codes, scale, param_dtype)

    def bytes_per_element(self, param_dtype: torch.dtype) -> float:
        if self.uses_param(param_dtype):
            return 0.0
        return 4.0 if self.mode == "fp32" else 2.0
