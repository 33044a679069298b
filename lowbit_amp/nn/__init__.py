"""Modules: the low-bit linear layer and the module swap."""

from lowbit_amp.nn.linear import LowBitLinear, invalidate_weight_caches
from lowbit_amp.nn.swap import ConversionReport, convert_linears

__all__ = ["ConversionReport", "LowBitLinear", "convert_linears", "invalidate_weight_caches"]
