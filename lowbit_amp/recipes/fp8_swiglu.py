"""SwiGLU whose backward reads its two FP8-saved inputs directly (``activations.glu: fused``, with
``activations.storage: fp8``).

Why: under COAT's FP8 activation storage (:mod:`lowbit_amp.recipes.fp8_activations`) the SwiGLU ``silu(a) * b`` of a
Llama MLP saves three FP8 tensors of the FFN width: ``a`` (for SiLU's backward), and ``silu(a)`` and ``b`` (for the
product's). In backward each is decoded to a full model-dtype tensor before the elementwise gradients run, so at the
moment the MLP's backward starts the step holds the incoming gradient, two decoded inputs and two new gradients — on
the issue-7 anchor (8192 tokens x 14336) 5 x 224 MiB, the largest transient of the step (H200 run i,
``bench/memory_peak_breakdown.py``: 448 MiB of decoded inputs live at the peak).

What this does instead: while the storage's forward runs, an eligible ``F.silu(a)`` becomes a node that keeps only the
FP8 pack of ``a`` (the storage's own group cast) and whose output is remembered; a product of that output with a
same-shaped tensor ``b`` becomes one node that keeps only the FP8 pack of ``b`` — ``silu(a)`` itself is kept nowhere
(one FP8 tensor of the FFN width less per layer), and the model-dtype ``a`` is freed right after SiLU as before. The
product's backward computes ``grad_a = g * b * sig(a) * (1 + a * (1 - sig(a)))`` and ``grad_b = g * silu(a)`` in FP32
from the two packs — on CUDA in one Triton pass that decodes the groups in registers
(:mod:`lowbit_amp.kernels.swiglu_backward`), elsewhere with the reference ops chunked at 16 M elements — and hands
``grad_a`` to the SiLU node, which autograd runs next (it consumes that node's output) and which returns it as its
input's gradient, adding SiLU's own chain rule only if ``silu(a)`` had other uses. The forward's outputs are the very
``F.silu(a)`` and product the unfused path computes (bit-identical).

Pattern match, not a module swap: the user's forward stays ``F.silu(self.w1(x)) * self.w3(x)``. The product is fused
only for the exact pattern (the same object with an unchanged version counter, same shape/dtype/device, no
broadcasting); anything else is the ordinary product. Numerics: ``grad_b`` uses ``silu`` of the FP8 ``a`` instead of an
FP8 ``silu(a)``: error ``silu'(a) * a`` instead of ``silu(a)`` times E4M3's relative error, up to 1.28x larger for
a > 0, smaller for a < 0 (0.8 dB lower input-gradient SQNR in tests/recipes/test_fp8_swiglu.py, 30.4 dB vs 31.2). The
packs are freed by the first backward, so a second backward through the same graph (``retain_graph=True``) raises.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GluMatcher", "MUL_FUNCTIONS", "SiluState", "silu_backward_reference", "swiglu_backward_reference"]

MUL_FUNCTIONS = frozenset({torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul})
_CHUNK = 1 << 24
RETAIN_GRAPH_ERROR = ("backward ran twice through a SwiGLU fused by activations.glu='fused', whose FP8 inputs are freed "
                      "after the first backward; retain_graph=True is not supported there: use activations.glu: "
                      "separate for double backward passes.")

#: The Triton backward (lowbit_amp/kernels/swiglu_backward.py) on CUDA; ``LOWBIT_AMP_FUSED_GLU_KERNEL=0`` turns it
#: off for a process (the reference ops then run, same formula).
FUSED_KERNEL = os.environ.get("LOWBIT_AMP_FUSED_GLU_KERNEL", "1") == "1"


class SiluState:
    """What one SiLU call under the storage shares with the product that consumes it: the FP8 pack of its input, and
    the input gradient the fused product's backward computed (handed over in backward, see :class:`_Fp8Silu`)."""

    __slots__ = ("packed", "grad_a")

    def __init__(self, packed: Any) -> None:
        self.packed = packed
        self.grad_a: torch.Tensor | None = None


class GluMatcher:
    """Remembers SiLU outputs of the current forward (weakly) with their :class:`SiluState`, until a product uses them."""

    def __init__(self) -> None:
        self._silu: dict[int, tuple[Any, int, SiluState]] = {}

    def clear(self) -> None:
        self._silu.clear()

    def record(self, out: torch.Tensor, state: SiluState) -> None:
        key = id(out)
        table = self._silu

        def forget(_ref: Any, key: int = key) -> None:
            table.pop(key, None)

        self._silu[key] = (weakref.ref(out, forget), out._version, state)

    def match(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor, SiluState] | None:
        """``(s, b, state)`` when one of ``x, y`` is a recorded ``s = silu(a)`` and the other a same-shaped tensor."""
        for s, b in ((x, y), (y, x)):
            if type(s) is not torch.Tensor or type(b) is not torch.Tensor:
                continue
            hit = self._silu.get(id(s))
            if hit is None or hit[0]() is not s or hit[1] != s._version:
                continue
            if b.shape != s.shape or b.dtype != s.dtype or b.device != s.device or b is s:
                return None
            del self._silu[id(s)]
            return s, b, hit[2]
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


def silu_backward_reference(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``grad * silu'(a)`` in FP32, rounded once to ``grad``'s dtype; chunked like :func:`swiglu_backward_reference`."""
    g, a = grad.reshape(-1), a.reshape(-1)
    out = torch.empty(g.numel(), dtype=grad.dtype, device=grad.device)
    for start in range(0, g.numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        out[sl] = g[sl].float() * _sigmoid_parts(a[sl].float())[1]
    return out.view(grad.shape)


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


class _Fp8Silu(torch.autograd.Function):
    """``F.silu`` whose input is kept as the storage's FP8 pack. Backward: the input gradient a fused product handed
    over (``state.grad_a``; the product's node runs first, it consumes this node's output), plus SiLU's own chain rule
    for any other use of the output (``grad_s``; None when the product was the only one)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, state: SiluState) -> torch.Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.state = state
        return F.silu(a)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_s: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        state = ctx.state
        if state.packed is None:
            raise RuntimeError(RETAIN_GRAPH_ERROR)
        grad_a, state.grad_a = state.grad_a, None
        if grad_s is not None:
            own = silu_backward_reference(grad_s, _decode_f32(state.packed))
            grad_a = own if grad_a is None else grad_a + own
        state.packed = None  # both nodes are done with it
        return grad_a, None


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, b: torch.Tensor, state: SiluState, storage: Any) -> torch.Tensor:  # type: ignore[override]
        # Not save_for_backward: packed through the storage here and decoded by the backward itself, so no
        # model-dtype copy of either input is ever rebuilt; ``s`` is not kept at all.
        ctx.state = state
        ctx.packed_b = storage.pack(b)
        return torch.mul(s, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        pa, pb = ctx.state.packed, ctx.packed_b
        if pa is None or pb is None:
            raise RuntimeError(RETAIN_GRAPH_ERROR)
        ctx.packed_b = None
        need_a, need_b = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        if _kernel_serves(grad, pa, pb):
            from lowbit_amp.kernels.swiglu_backward import swiglu_backward_packed

            ga, gb = swiglu_backward_packed(grad, pa, pb, need_a, need_b)
        else:
            ga, gb = swiglu_backward_reference(grad, _decode_f32(pa), _decode_f32(pb), need_a, need_b)
        ctx.state.grad_a = ga  # to the SiLU node, which runs next: the gradient w.r.t. a, not w.r.t. silu(a)
        return None, gb, None, None


def fused_swiglu(s: torch.Tensor, b: torch.Tensor, state: SiluState, storage: Any) -> torch.Tensor:
    """``s * b`` for ``s`` from :func:`silu`: saves ``b`` in FP8 and nothing of ``s`` (see the module doc)."""
    storage.stats.glu_fused += 1
    return _FusedSwiGLU.apply(s, b, state, storage)


def silu(a: torch.Tensor, storage: Any, matcher: GluMatcher) -> torch.Tensor:
    """``F.silu(a)`` with ``a`` kept as the storage's FP8 pack, its output remembered for :meth:`GluMatcher.match`."""
    with torch.no_grad():  # the pack's own ops must not record a graph (whose saves the hooks would pack again)
        state = SiluState(storage.pack(a))
    out = _Fp8Silu.apply(a, state)
    matcher.record(out, state)
    return out
