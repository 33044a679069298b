"""Fused GPU kernels (Triton) that replace chains of eager reference ops on CUDA.

Nothing here imports Triton at package import: :mod:`lowbit_amp.kernels.dispatch` decides per call whether a kernel
serves it (CUDA tensor, Triton importable, eager mode, a supported recipe, ``linear.fused_cast``) and only then imports
the kernel module. The pure-PyTorch reference in :mod:`lowbit_amp.quant` stays the numerical truth; every kernel is
tested byte-for-byte against it on the GPU (tests/kernels/).
"""

from lowbit_amp.kernels.dispatch import fused_cast_unavailable

__all__ = ["fused_cast_unavailable"]
