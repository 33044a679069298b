"""SwiGLU whose backward reads its two FP8-saved inputs directly (``activations.glu: fused``, with
``activations.storage: fp8``).

Why: under COAT's FP8 activation storage (:mod:`lowbit_amp.recipes.fp8_activations`) the SwiGLU ``silu(a) * b`` of a
Llama MLP saves three FP8 tensors of the FFN width: ``a`` (for SiLU's backward), and ``silu(a)`` and ``b`` (for the
product's). In backward each is decoded to a full model-dtype tensor before the elementwise gradients run, so at the
moment the MLP's backward starts the step holds the incoming gradient, two decoded inputs and two new gradients — on
the issue-7 anchor (8192 tokens x 14336) 5 x 224 MiB, the largest transient of the step (H200 run i,
``bench/memory_peak_breakdown.py``: 448 MiB of decoded inputs live at the peak).

What this does instead: while the storage's forward runs, ``F.silu`` records its input ``a`` against its output, and
a product of that output with a same-shaped tensor ``b`` becomes one autograd node that keeps only ``a`` and ``b`` in
FP8 (the storage's own group cast; ``a`` is the tensor SiLU's save already packed, so nothing is packed twice). Its
backward computes ``grad_a = g * b * sig(a) * (1 + a * (1 - sig(a)))`` and ``grad_b = g * silu(a)`` in FP32 from the
codes — on CUDA in one Triton pass that decodes the groups in registers
(:mod:`lowbit_amp.kernels.swiglu_backward`), elsewhere with the reference ops chunked at 16 M elements. The forward's
output is the product of the very tensors the user's code made (bit-identical to the unfused forward); ``silu(a)`` is
not stored (one FP8 tensor of the FFN width less per layer) and its backward value is recomputed from ``a`` in FP32
(more precise than decoding a stored FP8 ``silu(a)``).

Pattern match, not a module swap: the user's forward stays ``F.silu(self.w1(x)) * self.w3(x)``. The match is exact
(same object, unchanged version counters, same shape/dtype/device, no broadcasting); anything else is the ordinary
product. If ``silu(a)`` is also used elsewhere, that use differentiates through SiLU's own node as before. Holding
``a`` from the SiLU call to the product keeps one model-dtype tensor alive across the ``w3`` GEMM in forward.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from typing import Any

import torch

__all__ = ["GluMatcher", "MUL_FUNCTIONS", "swiglu_backward_reference"]

MUL_FUNCTIONS = frozenset({torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul})
_CHUNK = 1 << 24

#: The Triton backward (lowbit_amp/kernels/swiglu_backward.py) on CUDA; ``LOWBIT_AMP_FUSED_GLU_KERNEL=0`` turns it
#: off for a process (the reference ops then run, same formula).
FUSED_KERNEL = os.environ.get("LOWBIT_AMP_FUSED_GLU_KERNEL", "1") == "1"


class GluMatcher:
    """Remembers SiLU outputs of the current forward (weakly) and their inputs, until the product consumes them."""

    def __init__(self) -> None:
        self._silu: dict[int, tuple[Any, int, torch.Tensor, int]] = {}

    def clear(self) -> None:
        self._silu.clear()

    def record(self, out: torch.Tensor, a: torch.Tensor) -> None:
        key = id(out)
        table = self._silu

        def forget(_ref: Any, key: int = key) -> None:
            table.pop(key, None)

        try:
            self._silu[key] = (weakref.ref(out, forget), out._version, a, a._version)
        except TypeError:
            pass

    def match(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(a, s, b)`` when one of ``x, y`` is a recorded ``s = silu(a)`` and the other a same-shaped tensor."""
        for s, b in ((x, y), (y, x)):
            if type(s) is not torch.Tensor or type(b) is not torch.Tensor:
                continue
            hit = self._silu.get(id(s))
            if hit is None or hit[0]() is not s or hit[1] != s._version or hit[2]._version != hit[3]:
                continue
            a = hit[2]
            if b.shape != s.shape or b.dtype != s.dtype or b.device != s.device or b is s:
                return None
            del self._silu[id(s)]
            return a, s, b
        return None


def silu_eligible(args: tuple, kwargs: dict, min_numel: int) -> bool:
    """A plain out-of-place ``F.silu`` on a floating tensor that will need a gradient."""
    if len(args) != 1 or kwargs.get("inplace", False) or not torch.is_grad_enabled():
        return False
    a = args[0]
    return (type(a) is torch.Tensor and a.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and a.requires_grad and a.numel() >= min_numel)


def _sigmoid_parts(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(a), silu'(a)`` in FP32; ``1 - sig`` is formed as ``e * sig`` (``e = exp(-a)``) for ``a >= 0``, where the
    subtraction would cancel (10 FP32 ulps of error at a = 12.7), and as ``1 - sig`` below (e may overflow there)."""
    e = torch.exp(-a)
    sig = 1.0 / (1.0 + e)
    one_minus = torch.where(a >= 0, e * sig, 1.0 - sig)
    return a * sig, sig * (1.0 + a * one_minus)


def swiglu_backward_reference(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                              need_a: bool = True, need_b: bool = True) -> tuple[torch.Tensor | None, ...]:
    """``(grad_a, grad_b)`` of ``silu(a) * b`` in FP32, rounded once to ``grad``'s dtype; chunked (flat) so the FP32
    temporaries stay at 16 M elements. ``a``/``b`` may be FP32 decodings of FP8 (no intermediate rounding)."""
    shape = grad.shape
    g, a, b = grad.reshape(-1), a.reshape(-1), b.reshape(-1)
    ga = torch.empty(g.numel(), dtype=grad.dtype, device=grad.device) if need_a else None
    gb = torch.empty(g.numel(), dtype=grad.dtype, device=grad.device) if need_b else None
    for start in range(0, g.numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        g32, a32, b32 = g[sl].float(), a[sl].float(), b[sl].float()
        s, ds = _sigmoid_parts(a32)
        if ga is not None:
            ga[sl] = g32 * b32 * ds
        if gb is not None:
            gb[sl] = g32 * s
    return (ga.view(shape) if ga is not None else None, gb.view(shape) if gb is not None else None)


def _decode_f32(packed: Any) -> torch.Tensor:
    """FP8 group codes -> FP32 values in the packed (memory) order, no rounding to the model dtype."""
    from lowbit_amp.recipes.fp8_activations import PackedActivation, _group_scale

    if not isinstance(packed, PackedActivation):
        return packed.float()
    out = torch.empty(packed.codes.shape, dtype=torch.float32, device=packed.codes.device)
    step = max(1, _CHUNK // packed.codes.shape[1])
    for start in range(0, packed.codes.shape[0], step):
        sl = slice(start, start + step)
        inv = _group_scale(packed.tensor_scale, packed.shifts[sl], inverse=True)
        torch.mul(packed.codes[sl].float(), inv[:, None], out=out[sl])
    return out.reshape(-1)[: packed.numel]


def _kernel_serves(grad: torch.Tensor, pa: Any, pb: Any) -> bool:
    from lowbit_amp.recipes.fp8_activations import PackedActivation

    if not FUSED_KERNEL or not (isinstance(pa, PackedActivation) and isinstance(pb, PackedActivation)):
        return False
    if pa.stride is not None or pb.stride is not None or not grad.is_contiguous():
        return False
    if pa.codes.shape[1] != pb.codes.shape[1]:
        return False
    if grad.device.type == "cuda":
        from lowbit_amp.kernels.dispatch import fused_kernels_available

        return fused_kernels_available() and grad.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, storage: Any) -> torch.Tensor:  # type: ignore[override]
        out = torch.mul(s, b)
        # Not save_for_backward: packed here through the storage (``a`` hits the pack SiLU's save already made), and
        # decoded by the backward itself, so no model-dtype copy of either input is ever rebuilt.
        ctx.packed = (storage.pack(a), storage.pack(b))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        pa, pb = ctx.packed
        ctx.packed = None
        need_a, need_b = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        if _kernel_serves(grad, pa, pb):
            from lowbit_amp.kernels.swiglu_backward import swiglu_backward_packed

            ga, gb = swiglu_backward_packed(grad, pa, pb, need_a, need_b)
        else:
            ga, gb = swiglu_backward_reference(grad, _decode_f32(pa), _decode_f32(pb), need_a, need_b)
        return ga, gb, None, None


def fused_swiglu(a: torch.Tensor, s: torch.Tensor, b: torch.Tensor, storage: Any) -> torch.Tensor:
    """``s * b`` with ``s = silu(a)``, saving ``a`` and ``b`` in FP8 only (see the module doc)."""
    if storage.stats is not None:
        storage.stats.glu_fused += 1
    return _FusedSwiGLU.apply(a, b, s.detach(), storage)


def silu(func: Any, args: tuple, kwargs: dict, matcher: GluMatcher) -> torch.Tensor:
    """Run ``F.silu`` and remember its input for :meth:`GluMatcher.match`."""
    out = func(*args, **kwargs)
    matcher.record(out, args[0])
    return out
