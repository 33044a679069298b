"""Which linear layers are worth converting, from their shapes.

FP8 tensor-core GEMMs need in/out features that are multiples of 16. Small GEMMs do not gain: measured on an H100
(shared/ANCHORS.md), FP8 over bf16 is 1.04x at 1024x768x768 and 1.19x at 2048x1024x1024 *before* the casts, which cost
a pass over each operand, and in eager mode every FP8 layer also pays ~3 cast launches and 3 ``_scaled_mm`` calls of
host time. The ``auto`` threshold comes from bench/bench_all.py's per-layer benchmark (forward + backward, 8192 tokens,
H100, 2026-11-24; docs/performance.md): every layer with ``in*out >= 16.8M`` (4096x4096 and up) gained, every one
with ``in*out <= 4.2M`` (1024x4096, 2048x2048, 1024x1024, ...) lost, so layers below 8M weight elements stay in bf16
on CUDA. On CPU (emulation, for numerics only) nothing is excluded by size.

INT8 layers have their own threshold: the same benchmark with the INT8 preset (``LINEAR_LEVEL=int8 python
bench/bench_all.py linear``, H200, 2026-12-02, run ze) gains from 4096x12288 (50.3M: 1.21x, 4096x14336 1.24x, 14336x4096
1.22x) and loses at 4096x4096 (16.8M: 0.37x) and below: an INT8 layer spends ~2.5 ms of host time per forward +
backward (quantizers, fallback detection, three GEMM launches; FP8's ~0.75 ms), so a layer gains only where its GPU
work covers that. ``auto`` keeps INT8 layers below the geometric mean of the two, 29M, in bf16. In a GPU-bound step
the o-projections (16.8M) cost nothing either way (the 4096-wide anchor step: 39.63 ms all INT8 vs 39.34 ms with them
in bf16, run zf).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lowbit_amp.config import ModulePolicy

AUTO_MIN_GEMM_SIZE_CUDA = 8 * 1024 * 1024
AUTO_MIN_GEMM_SIZE_CUDA_INT8 = 29 * 1024 * 1024


def resolve_min_gemm_size(policy: ModulePolicy, device: torch.device, compute: str = "fp8") -> int:
    """The element count below which a layer stays in high precision; ``auto`` depends on the device and on the
    layer's ``compute`` (``int8`` has its own, higher, threshold: the module docstring)."""
    if policy.min_gemm_size == "auto":
        if device.type != "cuda":
            return 0
        return AUTO_MIN_GEMM_SIZE_CUDA_INT8 if compute == "int8" else AUTO_MIN_GEMM_SIZE_CUDA
    return int(policy.min_gemm_size)


def skip_reason(name: str, linear: nn.Linear, policy: ModulePolicy, min_size: int, compute: str) -> str | None:
    """Why ``linear`` stays in high precision, or None if it is eligible."""
    for pattern in policy.exclude:
        if re.search(pattern, name):
            return f"excluded by pattern {pattern!r}"
    if compute == "hp":
        return None  # O0 / per-module 'hp' layers still go through LowBitLinear, in high precision
    align = policy.alignment
    if linear.in_features % align or linear.out_features % align:
        return (f"shape {linear.out_features}x{linear.in_features} is not a multiple of {align} "
                "(FP8/INT8 tensor-core GEMMs need it)")
    if linear.in_features * linear.out_features < min_size:
        return f"too small to gain ({linear.in_features * linear.out_features} < min_gemm_size {min_size})"
    return None
