"""The shape policy's ``auto`` threshold per device and per compute format (lowbit_amp/nn/shape_policy.py)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit_amp.config import ModulePolicy
from lowbit_amp.nn.shape_policy import (
    AUTO_MIN_GEMM_SIZE_CUDA,
    AUTO_MIN_GEMM_SIZE_CUDA_INT8,
    resolve_min_gemm_size,
    skip_reason,
)


def test_auto_threshold_depends_on_device_and_format() -> None:
    auto = ModulePolicy()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_min_gemm_size(auto, cpu, "fp8") == 0 and resolve_min_gemm_size(auto, cpu, "int8") == 0
    assert resolve_min_gemm_size(auto, cuda, "fp8") == AUTO_MIN_GEMM_SIZE_CUDA
    assert resolve_min_gemm_size(auto, cuda, "int8") == AUTO_MIN_GEMM_SIZE_CUDA_INT8
    # the measured bounds (H200, run ze): INT8 lost at 4096x4096 and gained from 4096x12288; FP8 gains at 4096x4096
    assert 4096 * 4096 < AUTO_MIN_GEMM_SIZE_CUDA_INT8 <= 4096 * 12288
    assert 1024 * 4096 < AUTO_MIN_GEMM_SIZE_CUDA <= 4096 * 4096
    explicit = ModulePolicy(min_gemm_size=123)
    assert resolve_min_gemm_size(explicit, cuda, "int8") == 123 == resolve_min_gemm_size(explicit, cuda, "fp8")


def test_an_o_projection_stays_in_bf16_for_int8_but_not_for_fp8_on_cuda() -> None:
    o_proj = nn.Linear(4096, 4096, bias=False, device="meta")
    auto = ModulePolicy()
    cuda = torch.device("cuda")
    int8 = skip_reason("attn.o", o_proj, auto, resolve_min_gemm_size(auto, cuda, "int8"), "int8")
    assert int8 is not None and "too small to gain" in int8
    assert skip_reason("attn.o", o_proj, auto, resolve_min_gemm_size(auto, cuda, "fp8"), "fp8") is None
