"""Scaling granularity: which elements share one scale.

A granularity is a block shape over the last two dimensions of a 2-D view of the tensor (leading dims are flattened
into rows): ``tensor`` (one scale), ``row`` (one per row, i.e. per token for activations / per output channel for
weights), ``1x128`` tiles and ``128x128`` blocks (DeepSeek-V3's fine-grained recipe), or any ``RxC`` block.
Sizes that are not multiples of the block are handled by treating the ragged edge block as a smaller block.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Granularity:
    """Block shape ``(rows, cols)``; ``None`` means the whole extent of that dimension."""

    rows: int | None
    cols: int | None

    @staticmethod
    def parse(spec: "str | Granularity") -> "Granularity":
        if isinstance(spec, Granularity):
            return spec
        text = str(spec).lower().strip()
        if text in ("tensor", "tensorwise", "per_tensor"):
            return Granularity(None, None)
        if text in ("row", "rowwise", "per_row", "axiswise"):
            return Granularity(1, None)
        match = re.fullmatch(r"(?:block)?(\d+)x(\d+)", text)
        if match:
            rows, cols = int(match.group(1)), int(match.group(2))
            if rows < 1 or cols < 1:
                raise ValueError(f"Block granularity {spec!r} needs positive sizes, e.g. '1x128' or '128x128'.")
            return Granularity(rows, cols)
        raise ValueError(
            f"Unknown scaling granularity {spec!r}; use 'tensor', 'row', or a block 'RxC' such as '1x128' or '128x128'."
        )

    @property
    def is_tensorwise(self) -> bool:
        return self.rows is None and self.cols is None

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return (self.rows or rows, self.cols or cols)

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """Shape of the scale tensor for a ``rows x cols`` matrix (``()`` for tensorwise)."""
        if self.is_tensorwise:
            return ()
        br, bc = self.block_shape(rows, cols)
        return (math.ceil(rows / br), math.ceil(cols / bc))

    def __str__(self) -> str:
        if self.is_tensorwise:
            return "tensor"
        if self.rows == 1 and self.cols is None:
            return "row"
        return f"{self.rows or 'M'}x{self.cols or 'K'}"


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """Flatten leading dims into rows (a view when possible)."""
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def amax(x: torch.Tensor, granularity: Granularity | str = "tensor") -> torch.Tensor:
    """Absolute maximum per block, in float32, shaped like :meth:`Granularity.scale_shape`.

    NaN propagates (``amax`` of a block with a NaN is NaN) so callers can detect non-finite inputs.
    """
    g = Granularity.parse(granularity)
    if g.is_tensorwise:
        return x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    x2 = as_2d(x)
    rows, cols = x2.shape
    br, bc = g.block_shape(rows, cols)
    pad_r, pad_c = (-rows) % br, (-cols) % bc
    a = x2.abs().float()
    if pad_r or pad_c:
        a = torch.nn.functional.pad(a, (0, pad_c, 0, pad_r))
    nr, nc = a.shape[0] // br, a.shape[1] // bc
    return a.reshape(nr, br, nc, bc).amax(dim=(1, 3))


def expand_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, ...], granularity: Granularity | str) -> torch.Tensor:
    """Broadcast a per-block scale to the 2-D view of a tensor of ``shape``."""
    g = Granularity.parse(granularity)
    if g.is_tensorwise:
        return scale
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1]
    br, bc = g.block_shape(rows, cols)
    full = scale.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return full[:rows, :cols]
