"""Number formats lowbit_amp can quantize to.

A :class:`Format` knows everything the scale formula and the casts need: the torch storage dtype, the largest finite
value (``max``), the smallest normal (``min_normal``), its bit width, and whether it is a floating-point or an integer
grid. Formats are immutable values and print as their short name (``e4m3``), so they read well in ``print(model)``.

Why E4M3 for forward operands and E5M2 for gradients: E4M3 has one more mantissa bit (better resolution for weights and
activations, whose range is narrow), E5M2 has ~2^15 more dynamic range, which output gradients need because their
magnitudes spread over many more octaves (Micikevicius et al., "FP8 formats for deep learning", 2022).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    """An 8-bit (or wider) number format.

    Attributes:
        name: short lowercase name used in configs and ``extra_repr`` (``"e4m3"``, ``"e5m2"``, ``"int8"``).
        dtype: the torch dtype values are stored in.
        max: largest finite representable magnitude; quantization saturates here.
        min_normal: smallest positive normal magnitude (for integers: 1).
        bits: storage bits per element.
        is_float: True for floating-point grids, False for integer grids.
    """

    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    bits: int
    is_float: bool

    @property
    def min_subnormal(self) -> float:
        """Smallest positive representable magnitude (values below half of it round to zero)."""
        if not self.is_float:
            return 1.0
        return float(torch.finfo(self.dtype).smallest_normal) * 2.0 ** -self.mantissa_bits

    @property
    def mantissa_bits(self) -> int:
        if not self.is_float:
            return 0
        return {"e4m3": 3, "e5m2": 2, "fp16": 10, "bf16": 7}[self.name]

    def __str__(self) -> str:
        return self.name


E4M3 = Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 8, True)
E5M2 = Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 8, True)
INT8 = Format("int8", torch.int8, 127.0, 1.0, 8, False)
FP16 = Format("fp16", torch.float16, 65504.0, 2.0**-14, 16, True)
BF16 = Format("bf16", torch.bfloat16, float(torch.finfo(torch.bfloat16).max), 2.0**-126, 16, True)

FORMATS: dict[str, Format] = {f.name: f for f in (E4M3, E5M2, INT8, FP16, BF16)}


def get_format(name: str | Format) -> Format:
    """Look a format up by name; unknown names raise with the valid choices and a close match."""
    if isinstance(name, Format):
        return name
    key = str(name).lower().replace("fp8_", "").replace("float8_", "")
    if key in FORMATS:
        return FORMATS[key]
    close = difflib.get_close_matches(key, FORMATS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown number format {name!r}; valid formats are {sorted(FORMATS)}.{hint}")
