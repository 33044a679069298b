"""Quantization primitives: the pure-PyTorch numerical truth every kernel is tested against."""

from lowbit_amp.quant.cast import compute_scale, dequantize, quantize, round_stochastic
from lowbit_amp.quant.granularity import Granularity, amax, expand_scale

__all__ = ["Granularity", "amax", "compute_scale", "dequantize", "expand_scale", "quantize", "round_stochastic"]
