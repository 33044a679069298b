"""FP8 gradient all-reduce over standard collectives: shared scale, FP8 payloads, FP32 sum, FP8 result.

NCCL and gloo cannot sum FP8, so the reduction is built from collectives that only *move* bytes::

    1. amax     one MAX all-reduce of a vector holding every segment's (tensor's) local amax  -> global amax
    2. encode   each rank quantizes its flat buffer with the shared per-segment scale  s = fmt.max / global_amax
    3. a2a      all_to_all of the FP8 codes viewed as uint8: rank r receives chunk r from every rank
                (the reduce-scatter's traffic, but on 1-byte payloads)
    4. sum      rank r sums its N received chunks in FP32 and divides by N (the mean, in code units: |mean| <= fmt.max)
    5. requant  rank r re-quantizes its reduced chunk to FP8, optionally with a per-chunk boost (see below)
    6. gather   all_gather of the FP8 chunk + its 4-byte boost; every rank decodes the same bytes with the same
                scales, so the result is bit-identical on all ranks by construction.

Bytes on the wire per rank: ``2·L·(N-1)/N`` (one byte per element each way) versus ``4·L·(N-1)/N`` for a bf16 ring
all-reduce — half — plus a tiny amax all-reduce.

Where the 1/N goes (pre- vs post-scaling). FP8-LM divides by N *before* the FP8 sum because its sum is done in FP8 and
would overflow. Here the sum is FP32 (no overflow up to 2**127), so dividing the inputs by N only pushes every rank's
values down the FP8 grid by log2(N) octaves — more underflow, no benefit. ``tests/distributed/test_reduce_splits.py``
measures the splits ``prescale = N**-alpha`` (alpha = 1: FP8-LM, 0.5: sqrt split, 0: post-scaling) for N = 2..64 and
post-scaling wins at every N (table in docs/distributed.md); it is the default. What the measurement also shows is
that the *output* scale matters: the mean of N noisy gradients is typically ~1/sqrt(N) of the inputs' amax, so
re-quantizing it with the input scale wastes octaves. ``output_scaling='chunk'`` (default) multiplies each rank's
output chunk by its own boost ``fmt.max / amax(chunk)`` and ships the 4-byte boost with the payload (no extra round trip).

Exact zeros: where the ranks' gradients nearly cancel (|mean| below one input ulp, ~2^-4 of the inputs), their FP8 codes
can be exact opposites and the FP32 sum is exactly 0 — measured ~1.1 % of elements per step at N = 2 on the tiny GPT.
That is inside the tested error bound, and a zero gradient is an ordinary value, but an optimizer state codec that
mishandles zeros will show it here first (the O3 loss jump of 2026-12-01 was the ``e4m3_expand`` v codec underflowing
in FP32; docs/distributed.md has the measurements).

Non-finite gradients: a segment whose global amax is inf/NaN comes back as NaN on every rank (so loss scalers and
``clip_grad_norm_`` see the overflow); it is never silently clamped to ``fmt.max``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lowbit_amp.formats import Format, get_format
from lowbit_amp.quant.cast import compute_scale, quantize

__all__ = [
    "PRESCALE_ALPHA",
    "Fp8Reduced",
    "fp8_all_reduce_",
    "fp8_all_reduce_codes",
    "simulate_fp8_all_reduce",
]

# prescale name -> alpha in ``prescale = N**-alpha`` applied before the FP8 cast (the rest of 1/N after the FP32 sum).
PRESCALE_ALPHA = {"post": 0.0, "sqrt": 0.5, "pre": 1.0}
_BOOST_BYTES = 4  # the per-chunk float32 boost travels appended to the FP8 chunk


@dataclass
class Fp8Reduced:
    """The reduced gradient as FP8 codes with their scales (what O2/O3 optimizers can consume without a hp copy).

    ``codes (L,)`` FP8; ``segment_scales (S,)`` shared input scales; ``chunk_boost (N,)`` per-chunk output boosts;
    value ``i`` is ``codes[i] / (segment_scale(i) * chunk_boost[i // chunk] * out_factor)``.
    """

    codes: torch.Tensor
    segment_scales: torch.Tensor
    segments: tuple[int, ...]
    chunk_boost: torch.Tensor
    chunk: int
    out_factor: float
    finite: torch.Tensor  # (S,) bool: False where the global amax was inf/NaN

    def element_scale(self) -> torch.Tensor:
        """Per-element scale (``lp = hp * scale``) of ``codes``."""
        seg = _expand_segments(self.segment_scales, self.segments)
        boost = self.chunk_boost.repeat_interleave(self.chunk)[: seg.numel()]
        return seg * boost * self.out_factor

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = self.codes.float() / self.element_scale()
        if not bool(self.finite.all()):
            nan_mask = _expand_segments((~self.finite).float(), self.segments) > 0
            values = values.masked_fill(nan_mask, float("nan"))
        return values.to(out_dtype)


# ------------------------------------------------------------------------------------------------ pure steps
def _expand_segments(per_segment: torch.Tensor, segments: Sequence[int]) -> torch.Tensor:
    counts = torch.tensor(list(segments), device=per_segment.device)
    return per_segment.repeat_interleave(counts)


def _segment_amax(flat: torch.Tensor, segments: Sequence[int]) -> torch.Tensor:
    """Local amax of each segment, float32, shape (S,); NaN/inf propagate."""
    out = [p.abs().amax().float() if p.numel() else flat.new_zeros((), dtype=torch.float32)
           for p in flat.split(list(segments))]
    return torch.stack(out) if out else flat.new_zeros((0,), dtype=torch.float32)


def _encode(flat: torch.Tensor, elem_scale: torch.Tensor, prescale: float, fmt: Format, padded: int) -> torch.Tensor:
    """Quantize with the shared per-element scale (times the pre-scale), zero-padded to ``padded`` elements."""
    codes = quantize(flat.float(), elem_scale * prescale, fmt)
    if padded > flat.numel():
        codes = torch.cat([codes, torch.zeros(padded - flat.numel(), dtype=codes.dtype, device=codes.device)])
    return codes


def _reduce_chunk(received: torch.Tensor, world: int, prescale: float) -> torch.Tensor:
    """FP32 sum of the ``(N, chunk)`` received codes, returned as the mean in input-code units (|.| <= fmt.max)."""
    return received.float().sum(0) * (1.0 / (world * prescale))


def _requantize(mean_units: torch.Tensor, fmt: Format, output_scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes of the reduced chunk and its boost (1 for ``'shared'``)."""
    if output_scaling == "chunk":
        finite = mean_units[torch.isfinite(mean_units)]
        chunk_amax = finite.abs().amax() if finite.numel() else mean_units.new_zeros(())
        boost = compute_scale(chunk_amax, fmt).clamp(min=1.0)  # only ever enlarge: |mean| <= fmt.max already
    elif output_scaling == "shared":
        boost = mean_units.new_ones(())
    else:
        raise ValueError(f"output_scaling={output_scaling!r}: use 'chunk' (per-chunk boost) or 'shared'.")
    return quantize(mean_units, boost, fmt), boost.reshape(1).float()


def _check(flat: torch.Tensor, segments: Sequence[int] | None, prescale: str) -> tuple[int, ...]:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"fp8_all_reduce expects a flat contiguous 1-D tensor (a gradient bucket), got shape "
                         f"{tuple(flat.shape)}; pass tensor.view(-1) of a contiguous buffer.")
    if not flat.is_floating_point():
        raise TypeError(f"fp8_all_reduce reduces floating-point gradients, got dtype {flat.dtype}.")
    if prescale not in PRESCALE_ALPHA:
        raise ValueError(f"prescale={prescale!r} is not one of {list(PRESCALE_ALPHA)}.")
    segs = tuple(int(s) for s in segments) if segments is not None else (flat.numel(),)
    if sum(segs) != flat.numel() or any(s < 0 for s in segs):
        raise ValueError(f"segments {segs[:8]}... sum to {sum(segs)}, but the buffer has {flat.numel()} elements.")
    return segs


# ------------------------------------------------------------------------------------------------ distributed
def fp8_all_reduce_codes(
    flat: torch.Tensor,
    group: object | None = None,
    *,
    fmt: Format | str = "e4m3",
    average: bool = True,
    segments: Sequence[int] | None = None,
    prescale: str = "post",
    output_scaling: str = "chunk",
) -> Fp8Reduced:
    """All-reduce ``flat`` across ``group`` with FP8 payloads; returns the FP8 result with its scales (see module doc).

    ``segments``: lengths of the tensors packed in ``flat`` (one shared scale each); default one segment.
    ``average``: mean over ranks (DDP semantics) or sum. Collective: every rank of ``group`` must call it with the same
    ``flat.numel()``, ``segments`` and options.
    """
    import torch.distributed as dist

    fmt = get_format(fmt)
    segs = _check(flat, segments, prescale)
    world = dist.get_world_size(group)
    prescale_factor = float(world) ** -PRESCALE_ALPHA[prescale]

    amax = _segment_amax(flat, segs)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    finite = torch.isfinite(amax)
    seg_scales = compute_scale(amax, fmt)  # 1 where amax is 0 / non-finite
    elem_scale = _expand_segments(seg_scales, segs)

    chunk = max(1, math.ceil(flat.numel() / world))
    codes = _encode(flat, elem_scale, prescale_factor, fmt, chunk * world)
    received = torch.empty(chunk * world, dtype=torch.uint8, device=flat.device)
    dist.all_to_all_single(received, codes.view(torch.uint8), group=group)

    mean_units = _reduce_chunk(received.view(codes.dtype).view(world, chunk), world, prescale_factor)
    out_codes, boost = _requantize(mean_units, fmt, output_scaling)
    payload = torch.cat([out_codes.view(torch.uint8), boost.view(torch.uint8)])
    gathered = torch.empty(world * (chunk + _BOOST_BYTES), dtype=torch.uint8, device=flat.device)
    dist.all_gather_into_tensor(gathered, payload, group=group)
    gathered = gathered.view(world, chunk + _BOOST_BYTES)
    all_codes = gathered[:, :chunk].contiguous().view(codes.dtype).reshape(-1)[: flat.numel()]
    all_boost = gathered[:, chunk:].contiguous().view(torch.float32).reshape(world)
    return Fp8Reduced(all_codes, seg_scales, segs, all_boost, chunk, 1.0 if average else 1.0 / world, finite)


def fp8_all_reduce_(flat: torch.Tensor, group: object | None = None, **options: object) -> torch.Tensor:
    """In-place FP8 all-reduce of a flat buffer (e.g. a DDP bucket): ``flat`` receives the dequantized mean (or sum).

    Options as :func:`fp8_all_reduce_codes`. Returns ``flat``.
    """
    reduced = fp8_all_reduce_codes(flat, group, **options)  # type: ignore[arg-type]
    flat.copy_(reduced.dequantize(torch.float32))
    return flat


# ------------------------------------------------------------------------------------------------ simulation
def simulate_fp8_all_reduce(
    per_rank: torch.Tensor,
    *,
    fmt: Format | str = "e4m3",
    average: bool = True,
    segments: Sequence[int] | None = None,
    prescale: str = "post",
    output_scaling: str = "chunk",
) -> torch.Tensor:
    """What :func:`fp8_all_reduce_codes` returns (dequantized, float32) for ``per_rank (N, L)`` — the same steps, with
    the collectives replaced by tensor reshuffles, so N = 64 ranks can be measured in one process."""
    fmt = get_format(fmt)
    if per_rank.dim() != 2:
        raise ValueError(f"simulate_fp8_all_reduce expects per_rank of shape (N ranks, L), got {tuple(per_rank.shape)}.")
    world, length = per_rank.shape
    segs = _check(per_rank[0].contiguous(), segments, prescale)
    prescale_factor = float(world) ** -PRESCALE_ALPHA[prescale]
    amax = torch.stack([_segment_amax(row.contiguous(), segs) for row in per_rank]).amax(0)
    finite = torch.isfinite(amax)
    seg_scales = compute_scale(amax, fmt)
    elem_scale = _expand_segments(seg_scales, segs)
    chunk = max(1, math.ceil(length / world))
    codes = torch.stack([_encode(row, elem_scale, prescale_factor, fmt, chunk * world) for row in per_rank])
    out_codes, boosts = [], []
    for r in range(world):
        mean_units = _reduce_chunk(codes[:, r * chunk:(r + 1) * chunk], world, prescale_factor)
        c, b = _requantize(mean_units, fmt, output_scaling)
        out_codes.append(c)
        boosts.append(b)
    reduced = Fp8Reduced(torch.cat(out_codes)[:length], seg_scales, segs, torch.cat(boosts), chunk,
                         1.0 if average else 1.0 / world, finite)
    return reduced.dequantize(torch.float32)
