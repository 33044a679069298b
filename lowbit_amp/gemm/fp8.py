"""FP8 GEMM ``out = dequant(a) @ dequant(b).T`` on tensor cores (``torch._scaled_mm``) or emulated on CPU.

Both operands are row-major and contract over their last dim (the NT form ``F.linear`` uses). Every GEMM of the linear
layer is written this way — forward ``x·Wᵀ``, input-grad ``dy·(Wᵀ)ᵀ``, weight-grad ``dyᵀ·(xᵀ)ᵀ`` — so one quantized
layout rule holds for all: a scale's blocks run along the contraction dim.

``torch._scaled_mm`` wants ``mat2`` column-major, i.e. ``b.t()`` of a row-major ``b`` — free. It takes the *inverse*
scales (dequantization multipliers). Tensorwise scales are 0-d; rowwise are ``(M, 1)`` and ``(1, N)``. Dimensions must be
multiples of 16; a ragged M is zero-padded (zero rows contribute nothing). Block granularities (1x128 / 128x128) and
CPU run the emulation: dequantize to FP32, FP32 matmul — the same math tensor cores do with FP32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit_amp.capability import uses_tensor_cores
import lowbit_amp.gemm.scaled_mm_op  # noqa: F401  (registers lowbit_amp::scaled_mm_nt)
from lowbit_amp.quant.cast import dequantize
from lowbit_amp.quant.granularity import Granularity

_ALIGN = 16


def _emulated(a, a_scale, a_gran, b, b_scale, b_gran, out_dtype, bias):  # type: ignore[no-untyped-def]
    a_hp = dequantize(a, a_scale, torch.float32, a_gran)
    b_hp = dequantize(b, b_scale, torch.float32, b_gran)
    out = a_hp @ b_hp.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _tensor_core_ok(a: torch.Tensor, b: torch.Tensor, gran: Granularity, b_gran: Granularity) -> bool:
    if not uses_tensor_cores(a.device) or gran != b_gran:
        return False
    if not (gran.is_tensorwise or (gran.rows == 1 and gran.cols is None)):
        return False
    if gran.rows == 1 and not (a.dtype == b.dtype == torch.float8_e4m3fn):
        return False  # cuBLAS rowwise scaling is E4M3-only on sm_90
    return a.shape[1] % _ALIGN == 0 and b.shape[0] % _ALIGN == 0


def fp8_mm_nt(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    a_granularity: Granularity | str = "tensor",
    b_granularity: Granularity | str | None = None,
    bias: torch.Tensor | None = None,
    fast_accum: bool = False,
    a_scale_inv: torch.Tensor | None = None,
    b_scale_inv: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequant(a) @ dequant(b).T (+ bias)`` in ``out_dtype``; scales use the ``lp = hp * scale`` convention.

    ``b_granularity`` defaults to ``a_granularity``; mixed granularities (e.g. 1x128 activations with 128x128
    weights) run the emulation until a block-scaled kernel serves them. ``a_scale_inv``/``b_scale_inv``: the
    reciprocals when the caller already has them (the fused casts write them), saving two launches per GEMM.
    """
    gran = Granularity.parse(a_granularity)
    b_gran = gran if b_granularity is None else Granularity.parse(b_granularity)
    if not _tensor_core_ok(a, b, gran, b_gran):
        return _emulated(a, a_scale, gran, b, b_scale, b_gran, out_dtype, bias)
    rows = a.shape[0]
    pad = (-rows) % _ALIGN
    scale_a = a_scale_inv if a_scale_inv is not None else a_scale.float().reciprocal()
    scale_b = b_scale_inv if b_scale_inv is not None else b_scale.float().reciprocal()
    if pad:
        a = F.pad(a.view(torch.uint8), (0, 0, 0, pad)).view(a.dtype)
        if not gran.is_tensorwise:
            scale_a = F.pad(scale_a, (0, 0, 0, pad), value=1.0)
    if not gran.is_tensorwise:
        scale_b = scale_b.reshape(1, -1)
    if bias is not None and out_dtype == torch.float32:
        bias_arg, bias_after = None, bias  # _scaled_mm rejects a bias with fp32 output
    else:
        bias_arg, bias_after = (bias.to(out_dtype) if bias is not None else None), None
    if torch.compiler.is_compiling():  # opaque to Inductor's scaled-mm lowering; see lowbit_amp/gemm/scaled_mm_op.py
        out = torch.ops.lowbit_amp.scaled_mm_nt(a, b, scale_a, scale_b, bias_arg, out_dtype, fast_accum)
    else:
        out = torch._scaled_mm(
            a, b.t(), scale_a=scale_a, scale_b=scale_b, bias=bias_arg, out_dtype=out_dtype, use_fast_accum=fast_accum
        )
    if pad:
        out = out[:rows]
    if bias_after is not None:
        out = out + bias_after
    return out
