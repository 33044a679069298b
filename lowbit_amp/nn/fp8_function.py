"""The FP8 linear layer's autograd Function: it owns all three GEMMs.

For ``y = x·Wᵀ + b`` with ``x (M, K)`` (leading dims flattened), ``W (N, K)``, ``dy (M, N)``::

    GEMM          NT form                 operand a (format, scaled along)   operand b (format)
    output        y  = x  · (W)ᵀ          x   E4M3  [input state]            W   E4M3  [weight state]
    grad_input    dx = dy · (Wᵀ)ᵀ         dy  E5M2  [grad_output state]      Wᵀ  E4M3
    grad_weight   dW = dyᵀ · (xᵀ)ᵀ        dyᵀ E5M2                           xᵀ  E4M3

Six operands, three quantized tensors. Tensorwise scales are orientation-free, so the transposed operands are plain
transposes of the FP8 tensors (no re-quantization) and backward needs only the FP8 ``x`` and ``W`` that forward saved —
the high-precision input is not kept, so activation memory does not grow. Row and block granularities scale along the
contraction dim, which differs between GEMMs, so for those the high-precision input is saved and the transposed
operands are re-quantized just in time (documented in docs/numerics.md). The backward GEMMs always accumulate in FP32
(``use_fast_accum=False``); the weight gradient comes out in FP32 and goes to ``layer._weight_grad_output`` (FP8 at O2+).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lowbit_amp.formats import Format
from lowbit_amp.gemm.fp8 import fp8_mm_nt
from lowbit_amp.quant.cast import compute_scale, quantize
from lowbit_amp.quant.granularity import Granularity, amax
from lowbit_amp.quant.operand import quantize_operand, quantize_operand_t

if TYPE_CHECKING:
    from lowbit_amp.nn.linear import LowBitLinear


def _just_in_time(hp: torch.Tensor, fmt: Format, gran: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Current-scaling quantization for a re-oriented operand (row/block recipes only)."""
    scale = compute_scale(amax(hp, gran), fmt)
    return quantize(hp, scale, fmt, gran), scale


def _weight_grad_dtype(layer: "LowBitLinear") -> torch.dtype:
    """What the weight-gradient GEMM writes: the weight's dtype for a high-precision gradient, else (an FP8 gradient,
    encoded next) FP32 or, with ``linear.weight_grad_gemm: bf16``, bf16."""
    cfg = layer.lb_config
    if cfg.weight_grad == "hp":
        return layer.weight.dtype
    return torch.bfloat16 if cfg.weight_grad_gemm == "bf16" else torch.float32


class Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer: "LowBitLinear",
        out_dtype: torch.dtype,
        x_lp: torch.Tensor,
        x_t_lp: torch.Tensor | None,
        x_scale: torch.Tensor,
        x_scale_inv: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x``'s FP8 cast comes in made (``x_lp``, ``x_t_lp`` where the weight needs a gradient, the scale and its
        inverse): :meth:`LowBitLinear.forward` makes it, or takes a sibling layer's (shared_input_cast.py)."""
        cfg = layer.lb_config
        x2d = x.reshape(-1, x.shape[-1])
        in_gran = layer.input_scaling.granularity
        w_gran = layer.weight_scaling.granularity
        tensorwise = layer.tensorwise
        # Tensorwise: the backward GEMMs read xᵀ and Wᵀ, made in the same (fused, on CUDA) pass as x and W.
        w_t_lp = None
        # weight_cache: none (eager): W is cast here and freed after the GEMM; backward re-casts Wᵀ with this scale.
        recast = (cfg.weight_cache == "none" and tensorwise and not torch.compiler.is_compiling()
                  and getattr(layer.weight, "lowbit_fp8_weight", None) is None)
        if recast:
            w_lp, _, w_scale, w_scale_inv = quantize_operand_t(weight.detach(), layer.weight_scaling, False, cfg.fused_cast)
        elif torch.compiler.is_compiling():
            # The per-version weight cache is Python-side state Dynamo cannot trace: cast W (and Wᵀ for backward, in
            # the same fused pass on CUDA) in the graph instead — once per step either way without accumulation.
            w_lp, w_t_lp, w_scale, w_scale_inv = quantize_operand_t(
                weight.detach(), layer.weight_scaling, tensorwise and ctx.needs_input_grad[0], cfg.fused_cast)
        else:
            w_lp, w_scale = layer.quantized_weight(with_transpose=tensorwise and ctx.needs_input_grad[0])
            w_scale_inv = layer.quantized_weight_scale_inv(w_lp)
        y = fp8_mm_nt(x_lp, x_scale, w_lp, w_scale, out_dtype, in_gran, w_gran, bias, fast_accum=cfg.fast_accum_forward,
                      a_scale_inv=x_scale_inv, b_scale_inv=w_scale_inv)
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.tensorwise = tensorwise
        if ctx.tensorwise:
            # Only xᵀ is kept (same bytes as x): forward's x_lp is freed after the output GEMM (or once the shared-cast
            # slot lets go of it, when the block returns).
            # Compiled: Wᵀ made in forward is saved instead of W (backward reads only Wᵀ); eager: W, whose cached
            # transpose backward looks up.
            ctx.w_is_t = w_t_lp is not None
            ctx.recast = recast
            w_saved = weight if recast else (w_t_lp if ctx.w_is_t else w_lp)  # recast: the parameter itself, no copy
            ctx.save_for_backward(x_t_lp, x_scale, x_scale_inv, w_saved, w_scale, w_scale_inv)
        else:
            ctx.save_for_backward(x2d, weight)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        layer: LowBitLinear = ctx.layer
        go_state = layer.grad_output_scaling
        dy2d = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        dx = dw = db = None
        if ctx.tensorwise:
            x_t_lp, x_scale, x_scale_inv, w_lp, w_scale, w_scale_inv = ctx.saved_tensors
            dy_lp, dy_t_lp, dy_scale, dy_scale_inv = quantize_operand_t(dy2d, go_state, need_dw, layer.lb_config.fused_cast)
            if need_dx:
                if ctx.recast:
                    w_t_lp = layer.recast_weight_t(w_lp, w_scale)  # w_lp holds the high-precision weight here
                elif ctx.w_is_t:
                    w_t_lp = w_lp
                elif torch.compiler.is_compiling():
                    w_t_lp = w_lp.t().contiguous()
                else:
                    w_t_lp = layer.quantized_weight_t(w_lp)
                dx = fp8_mm_nt(dy_lp, dy_scale, w_t_lp, w_scale, ctx.x_dtype,
                               a_scale_inv=dy_scale_inv, b_scale_inv=w_scale_inv)
            if need_dw:
                # A 16-bit weight gradient comes straight out of the GEMM (FP32 accumulation, one rounding in its
                # epilogue — the same value as FP32 output then .to()), saving an FP32 write + read of dW: 8 bytes per
                # parameter per step, ~1.3 ms/step on the 4096-wide anchor at 3 TB/s (estimated, not timed alone).
                dw_dtype = _weight_grad_dtype(layer)
                dw = fp8_mm_nt(dy_t_lp, dy_scale, x_t_lp, x_scale, dw_dtype,
                               a_scale_inv=dy_scale_inv, b_scale_inv=x_scale_inv)
        else:
            dy_lp, dy_scale = quantize_operand(dy2d, go_state)
            x2d, weight = ctx.saved_tensors
            go_gran = go_state.granularity
            if need_dx:
                w_t_lp, w_t_scale = _just_in_time(weight.t(), layer.weight_scaling.fmt, layer.weight_scaling.granularity)
                dx = fp8_mm_nt(dy_lp, dy_scale, w_t_lp, w_t_scale, ctx.x_dtype, go_gran, layer.weight_scaling.granularity)
            if need_dw:
                dy_t_lp, dy_t_scale = _just_in_time(dy2d.t(), go_state.fmt, go_gran)
                x_t_lp, x_t_scale = _just_in_time(x2d.t(), layer.input_scaling.fmt, layer.input_scaling.granularity)
                dw = fp8_mm_nt(dy_t_lp, dy_t_scale, x_t_lp, x_t_scale,
                               torch.float32 if layer.lb_config.weight_grad == "hp" else _weight_grad_dtype(layer),
                               go_gran, layer.input_scaling.granularity)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        if dw is not None:
            dw = layer._weight_grad_output(dw)
        if need_db:
            db = dy2d.float().sum(0).to(layer.bias.dtype)
        return dx, dw, db, None, None, None, None, None, None
