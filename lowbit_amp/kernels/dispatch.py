"""When the fused FP8 cast kernel serves a cast, and when the reference runs instead (and why).

The reference casts (:mod:`lowbit_amp.quant.cast`) are the CPU truth and the fallback; the Triton kernel
(:mod:`lowbit_amp.kernels.fp8_cast`) is an optimisation that must produce the same bytes. It serves a call only when
all of these hold — anything else runs the reference, which is always correct, just slower:

* the config allows it (``linear.fused_cast``, default on);
* eager or compiled: under ``torch.compile`` the same kernel runs as the ``lowbit_amp::fp8_cast`` custom op
  (:mod:`lowbit_amp.kernels.fp8_cast_op`; no graph break), because Inductor's own fusion of the reference ops is 1.5x
  slower on the large delayed casts;
* a CUDA tensor, 2-D, non-empty, bf16/fp16/fp32, and Triton importable;
* a tensorwise E4M3/E5M2 state with round-to-nearest and no power-of-2 scales (the kernel implements exactly that
  formula; row/block granularities, INT8, stochastic rounding and pow2 scales stay on the reference).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit_amp.scaling.state import ScalingState

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_KERNEL_FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


# A module constant, not a cached call: this check also runs while Dynamo traces the layer. find_spec does not import.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def fused_kernels_available() -> bool:
    """Triton importable (the per-call conditions are the caller's)."""
    return _TRITON_IMPORTABLE


def fused_cast_unavailable(
    x: torch.Tensor, state: "ScalingState", rounding: str = "nearest", enabled: bool = True
) -> str | None:
    """``None`` when the fused kernel serves this cast, else the reason the reference runs (for logs and tests)."""
    if not enabled:
        return "disabled by config (linear.fused_cast=False)"
    if x.device.type != "cuda":
        return f"tensor is on {x.device.type}; the fused kernels are CUDA-only"
    if rounding != "nearest":
        return f"rounding={rounding!r}; the kernel rounds to nearest only"
    if not state.granularity.is_tensorwise:
        return f"granularity {state.granularity}; the kernel is tensorwise only"
    if state.fmt.dtype not in _KERNEL_FORMATS:
        return f"format {state.fmt}; the kernel casts to E4M3/E5M2 only"
    if state.config.power_of_2:
        return "power-of-2 scales; the kernel implements the plain scale formula only"
    if x.dim() != 2 or x.numel() == 0:
        return f"operand shape {tuple(x.shape)}; the kernel takes a non-empty 2-D operand"
    if x.dtype not in _KERNEL_DTYPES:
        return f"input dtype {x.dtype}; the kernel reads bf16/fp16/fp32"
    if not fused_kernels_available():
        return "triton is not importable"
    return None
