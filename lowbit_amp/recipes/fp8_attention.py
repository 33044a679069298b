"""Attention whose saved inputs are FP8 (``activations.attention: fp8``, with ``activations.storage: fp8``).

Why: under COAT's FP8 activation storage (:mod:`lowbit_amp.recipes.fp8_activations`) everything
``F.scaled_dot_product_attention`` saves stays in the model dtype — q, k, v, its output and the logsumexp — because
its backward re-exponentiates the saved logsumexp, where an E4M3 error would become an error in the exponent. On the
issue-7 anchor (4096 wide, 8192 tokens) that is 256 MiB per layer of exact saves, the largest block of activation
memory the recipe leaves in 16 bits.

What this does instead: the forward runs attention without recording a graph, keeps q, k and v as FP8 with the
recipe's group scaling (1.06 B/element instead of 2), and keeps neither the output nor the logsumexp. The backward
dequantizes q, k, v, recomputes attention from them with autograd on, and differentiates that. So nothing log-domain
is ever stored in FP8: the logsumexp the backward uses is recomputed, consistently, from the same (dequantized)
inputs. What it costs: one more attention forward per layer in backward (on the anchor ~2% of the step's FLOPs), and
the gradient is that of attention at the FP8-rounded q/k/v (the output the forward returned used the exact ones).
The output is not saved because the next op (the output projection, an FP8 linear) saves its own FP8 copy anyway.

Served only where the recompute is exact: no dropout (a recompute would draw a different mask) and no attention mask
that itself requires a gradient; every other call takes the exact path (counted in the storage's stats).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["fp8_saved_attention", "qkv_eligible"]

_local = threading.local()
_ARG_NAMES = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _recomputing() -> bool:
    return getattr(_local, "recompute", False)


def _named(args: tuple, kwargs: dict) -> dict:
    """SDPA's arguments after q, k, v, by name (positional ones included)."""
    named = dict(zip(_ARG_NAMES, args[3:]))
    named.update(kwargs)
    return named


def qkv_eligible(args: tuple, kwargs: dict, min_numel: int) -> bool:
    """Whether an SDPA call (its positional args and kwargs) can take the FP8-saved path."""
    if _recomputing() or len(args) < 3 or not torch.is_grad_enabled():
        return False
    q, k, v = args[:3]
    named = _named(args, kwargs)
    if float(named.get("dropout_p", 0.0) or 0.0) != 0.0:
        return False
    mask = named.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.requires_grad:
        return False
    tensors = (q, k, v)
    return (all(type(t) is torch.Tensor and t.is_floating_point() for t in tensors)
            and any(t.requires_grad for t in tensors) and q.numel() >= min_numel)


class _Fp8SavedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, stats: Any,
                named: dict) -> torch.Tensor:  # type: ignore[override]
        from lowbit_amp.recipes.fp8_activations import quantize_groups

        with torch.no_grad():
            out = F.scaled_dot_product_attention(q, k, v, **named)
        packed = []
        for t in (q, k, v):
            p = quantize_groups(t.detach(), group_size)
            packed.append(p)
            if stats is not None:
                stats.add_packed(t, p)
        ctx.packed = packed  # not save_for_backward: these are already FP8, the storage's pack hook must not see them
        ctx.named = named
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        from lowbit_amp.recipes.fp8_activations import dequantize_groups

        needs = ctx.needs_input_grad[:3]
        inputs = [dequantize_groups(p).detach().requires_grad_(need) for p, need in zip(ctx.packed, needs)]
        ctx.packed = None  # free the FP8 copies as soon as they are decoded
        _local.recompute = True
        try:
            with torch.enable_grad():
                out = F.scaled_dot_product_attention(*inputs, **ctx.named)
                wanted = [t for t, need in zip(inputs, needs) if need]
                grads = iter(torch.autograd.grad(out, wanted, grad_out))
        finally:
            _local.recompute = False
        return (*(next(grads) if need else None for need in needs), None, None, None)


def fp8_saved_attention(args: tuple, kwargs: dict, group_size: int, stats: Any = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(*args, **kwargs)`` with q, k, v saved in FP8 (check :func:`qkv_eligible`)."""
    q, k, v = args[:3]
    return _Fp8SavedAttention.apply(q, k, v, group_size, stats, _named(args, kwargs))
