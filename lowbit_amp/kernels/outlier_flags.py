"""The fallback detector's flags in one Triton launch: median of the tile amaxes, comparison, NaN rule.

Same result as :func:`lowbit_amp.int8.fallback.detect_outlier_tiles` (the reference), which on CUDA takes a selection
kernel plus six elementwise launches per quantized operand. Why (H200, 4096-wide anchor step, 30 detections per
step, 2026-12-02): the INT8 step was bound by its host time, and ``torch.median`` (a sort) cost ~265 us of host time
per call; the step's host enqueue time went 38.0 ms (median, run x) -> 26.6 ms (``kthvalue``, run y) -> 22.5 ms
(this kernel, run z). Here one program loads every tile amax (up to :data:`MAX_TILES`), finds the lower median by
bisection over the float bit patterns (amaxes are non-negative, so integer order is float order; 31 halvings of the
int32 range end on an exact element value), and writes the flags: one launch, no sort, no host sync. Its GPU time
(31 block-wide reductions on one SM) was not measured on its own.
"""

from __future__ import annotations

import torch

from lowbit_amp.kernels.int8_gemm import _Launcher

__all__ = ["MAX_TILES", "triton_outlier_flags"]

MAX_TILES = 32768  # one program holds them all (a 32768x16384 operand in 128x128 tiles); larger: a kthvalue
_launch_flags = _Launcher("outlier_flags_kernel", "lowbit_amp.kernels._outlier_flags_triton")


def triton_outlier_flags(tile_amax: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool flags, shape of ``tile_amax``: amax > ``threshold`` × lower median (none if that median is 0 or NaN)."""
    n = tile_amax.numel()
    if not 0 < n <= MAX_TILES:
        raise ValueError(f"triton_outlier_flags: {n} tiles; the kernel takes 1..{MAX_TILES} "
                         "(use lowbit_amp.int8.fallback.detect_outlier_tiles).")
    amax = tile_amax.contiguous().float()
    flags = torch.empty(tile_amax.shape, dtype=torch.bool, device=tile_amax.device)
    block = max(16, 1 << (n - 1).bit_length())
    _launch_flags((1,), (amax, flags.view(torch.uint8)), (n, (n - 1) // 2 + 1),
                  {"THRESHOLD": float(threshold), "BLOCK": block}, num_warps=8 if block >= 4096 else 4)
    return flags
