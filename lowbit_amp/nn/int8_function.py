"""The INT8 linear layer's autograd Function: all three GEMMs block-wise INT8 with dynamic fallback.

For ``y = x·Wᵀ + b`` with ``x (M, K)`` (leading dims flattened), ``W (N, K)``, ``dy (M, N)``, every GEMM in NT form
(:mod:`lowbit_amp.int8.reference_gemm`), operand ``a`` carrying the fallback::

    GEMM          NT form                 operand a (blocks along its K)           operand b
    output        y   = x   · (W)ᵀ        x    1x128 tiles, fallback               W    128x128 blocks (cached per step)
    grad_input    dx  = dy  · (Wᵀ)ᵀ       dy   1x128, fallback, SR if asked        Wᵀ   the same blocks, transposed
    grad_weight   dWᵀ = xᵀ · (dyᵀ)ᵀ       xᵀ   1x128 along tokens, fallback        dyᵀ  1x128 along tokens, SR if asked

With the row layout (``act_block``/``weight_block`` ``"row"``, the ``int8`` preset) each of these operands has one scale
per row instead, over the same contraction dims. The weight gradient is computed transposed so that the input activation
— where SwiGLU outliers live — is operand ``a`` and gets the fallback. Blocks run along each GEMM's contraction dim,
which differs between GEMMs, so forward saves the high-precision input and backward re-quantizes the re-oriented
operands just in time (as the FP8 path does for block granularities). Square weight blocks transpose for free. The
weight gradient comes out in the weight's dtype (FP32 at O2+, where it is encoded to FP8) and goes to
``layer._weight_grad_output``. ``layer.fallback_fraction`` holds the fraction of the forward input's tiles that fell
back in the last forward (a device tensor, updated without a host sync). With the row layout the weight gradient's
``xᵀ`` takes the forward's flags of ``x``, transposed, instead of detecting them again (the same square tiles, so the
same flags; :func:`_flags_for_transpose`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lowbit_amp.int8.activation import quantize_act, quantize_weight
from lowbit_amp.int8.block_quant import Int8Blocks
from lowbit_amp.int8.fallback import FallbackOperand
from lowbit_amp.int8.reference_gemm import int8_block_mm_nt
from lowbit_amp.int8.row_scaled import ROW
from lowbit_amp.quant.granularity import Granularity

if TYPE_CHECKING:
    from lowbit_amp.config import Int8Config
    from lowbit_amp.nn.linear import LowBitLinear


def _weight_blocks(layer: "LowBitLinear", weight: torch.Tensor, transposed: bool) -> Int8Blocks:
    """The INT8 weight (or its transpose), quantized at most once per weight version (once per optimizer step).

    Under ``torch.compile`` the cache (Python-side state keyed by ``data_ptr``, a data-dependent value Dynamo cannot
    guard on: a graph break per layer) is bypassed and the weight quantized in every call, as the FP8 path does."""
    cfg = layer.lb_config.int8
    if torch.compiler.is_compiling():
        blocks = _quantized(weight, cfg)
        return _transposed(blocks, weight, cfg) if transposed else blocks
    key = (weight._version, weight.data_ptr(), "int8")
    cache = layer._weight_cache
    if cache is None or cache[0] != key:
        layer._weight_cache = cache = (key, _quantized(weight, cfg), None, None)
    if not transposed:
        return cache[1]
    if cache[2] is None:
        layer._weight_cache = cache = (key, cache[1], _transposed(cache[1], weight, cfg), None)
    return cache[2]


@torch.no_grad()
def _quantized(weight: torch.Tensor, cfg: "Int8Config") -> Int8Blocks:
    return quantize_weight(weight.detach(), cfg)


@torch.no_grad()
def _transposed(blocks: Int8Blocks, weight: torch.Tensor, cfg: "Int8Config") -> Int8Blocks:
    """Wᵀ's codes: square blocks transpose for free, others (rows) are quantized again from Wᵀ."""
    return blocks.t() if blocks.block.rows == blocks.block.cols else quantize_weight(weight.detach().t(), cfg)


def _flags_for_transpose(a: FallbackOperand, cfg: "Int8Config") -> torch.Tensor | None:
    """The forward's outlier flags of ``x``, transposed: exactly what detection would find for ``xᵀ`` in the weight
    gradient when the tiles are square (the same tiles, transposed; the median over the same tile amaxes), so the
    backward skips that detection — one kernel launch per layer and step, and on CUDA a one-program median kernel.
    Row layout only (its quantizer takes given flags)."""
    tile = a.tile
    if Granularity.parse(cfg.act_block) != ROW or tile.rows != tile.cols:
        return None
    return a.flags.t()


class Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer: "LowBitLinear",
    ) -> torch.Tensor:
        cfg = layer.lb_config.int8
        x2d = x.reshape(-1, x.shape[-1])
        a = quantize_act(x2d, cfg, cfg.fallback)
        ctx.x_flags = None
        if isinstance(a, FallbackOperand):
            a.fraction_into(layer.fallback_fraction)
            ctx.x_flags = _flags_for_transpose(a, cfg)
        hp_b = weight.detach() if cfg.fallback and cfg.fallback_mode == "hp" else None
        y = int8_block_mm_nt(a, _weight_blocks(layer, weight, False), x.dtype, bias, b_hp=hp_b)
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2d, weight)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        layer: LowBitLinear = ctx.layer
        cfg = layer.lb_config.int8
        x2d, weight = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        rounding = "stochastic" if cfg.stochastic_grad else "nearest"
        hp_mode = cfg.fallback and cfg.fallback_mode == "hp"
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        dx = dw = db = None
        if need_dx:
            dy_a = quantize_act(dy2d, cfg, cfg.fallback, rounding)
            w_t = _weight_blocks(layer, weight, True)
            dx = int8_block_mm_nt(dy_a, w_t, ctx.x_dtype, b_hp=weight.detach().t() if hp_mode else None)
            dx = dx.reshape(ctx.x_shape)
        if need_dw:
            x_t = x2d.t()
            dy_t = dy2d.t()
            x_a = quantize_act(x_t, cfg, cfg.fallback, flags=ctx.x_flags)
            dy_b = quantize_act(dy_t, cfg, False, rounding)
            # In the weight's dtype when that is what autograd gets (weight_grad 'hp'): the epilogue's rounding equals
            # .to(dtype) of the FP32 result, and the transposing copy moves half the bytes (0.34 ms per 4096x14336
            # FP32 copy, ten per anchor step). FP32 for the FP8 weight gradient's own scaling (O2+).
            dw_dtype = weight.dtype if layer.lb_config.weight_grad == "hp" else torch.float32
            dw_t = int8_block_mm_nt(x_a, dy_b, dw_dtype, b_hp=dy_t if hp_mode else None)  # type: ignore[arg-type]
            dw = layer._weight_grad_output(dw_t.t().contiguous())
        if need_db:
            db = dy2d.float().sum(0).to(layer.bias.dtype)
        return dx, dw, db, None
