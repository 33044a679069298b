"""What the current device can do, as ``(ok, reason)`` pairs that feed both user errors and test skips.

Decided by compute capability, never by GPU name: FP8 tensor cores need sm_89+ (Ada, Hopper, Blackwell); INT8
tensor cores exist from sm_75. CPU always works through the emulation path (same numerics, no speed).
"""

from __future__ import annotations

import importlib.util

import torch


def fp8_gemm_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        return True, "CPU: FP8 GEMMs are emulated (dequantize + FP32 matmul), same numerics, no speed-up"
    if device.type != "cuda":
        return False, f"device type {device.type!r} has no FP8 GEMM path; use opt_level='O0' or a CUDA/CPU device"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, (
            f"compute capability {major}.{minor} has no FP8 tensor cores (needs 8.9+); use opt_level='int8' "
            "(INT8 tensor cores) or 'O0'"
        )
    return True, f"compute capability {major}.{minor}: torch._scaled_mm on FP8 tensor cores"


def triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (it ships with CUDA builds of torch)"
    return True, "triton importable"


def uses_tensor_cores(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    # Cached per device: the query costs ~10 us of host time, paid by every FP8 GEMM in eager mode otherwise.
    # (A plain dict, not functools.lru_cache, which torch.compile warns about when it traces the call.)
    known = _FP8_TENSOR_CORES.get(device.index)
    if known is None:
        known = _FP8_TENSOR_CORES[device.index] = fp8_gemm_supported(device)[0]
    return known


_FP8_TENSOR_CORES: dict[int | None, bool] = {}
