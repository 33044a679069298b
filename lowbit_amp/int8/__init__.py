"""Block-wise INT8 GEMMs with dynamic block-level fallback (arXiv 2503.08040): quantization, fallback, reference GEMM.

The Triton kernels live in :mod:`lowbit_amp.kernels.int8_gemm` (imported lazily, on CUDA only).
"""

from lowbit_amp.int8.block_quant import Int8Blocks, dequantize_blocks, quantize_blocks
from lowbit_amp.int8.fallback import FallbackOperand, detect_outlier_tiles, quantize_with_fallback
from lowbit_amp.int8.reference_gemm import int8_block_mm_nt, int_mm_nt

__all__ = [
    "FallbackOperand",
    "Int8Blocks",
    "detect_outlier_tiles",
    "dequantize_blocks",
    "int8_block_mm_nt",
    "int_mm_nt",
    "quantize_blocks",
    "quantize_with_fallback",
]
