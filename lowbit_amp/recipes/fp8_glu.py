"""Gated linear units (SwiGLU, GeGLU) whose backward reads their two FP8-saved inputs directly (``activations.glu:
fused``, with ``activations.storage: fp8``).

Why: under COAT's FP8 activation storage (:mod:`lowbit_amp.recipes.fp8_activations`) the gate ``act(a) * b`` of a
Llama/Gemma MLP saves three FP8 tensors of the FFN width: ``a`` (for the activation's backward), and ``act(a)`` and
``b`` (for the product's). In backward each is decoded to a full model-dtype tensor before the elementwise gradients
run, so when the MLP's backward starts the step holds the incoming gradient, two decoded inputs and two new gradients
— on the issue-7 anchor (8192 tokens x 14336) 5 x 224 MiB, the largest transient of the step (H200 run i,
``bench/memory_peak_breakdown.py``: 448 MiB of decoded inputs live at the peak).

What this does instead: while the storage's forward runs, an eligible ``F.silu(a)`` or ``F.gelu(a)`` (either
``approximate``) becomes a node that keeps only the FP8 pack of ``a`` (the storage's own group cast) and whose output
is remembered; a product of that output with a same-shaped tensor ``b`` becomes one node that keeps only the FP8 pack
of ``b`` — ``act(a)`` itself is kept nowhere (one FP8 tensor of the FFN width less per layer), and the model-dtype
``a`` is freed right after the activation as before. The product's backward computes ``grad_a = g * b * act'(a)`` and
``grad_b = g * act(a)`` in FP32 from the two packs — on CUDA in one Triton pass that decodes the groups in registers
(:mod:`lowbit_amp.kernels.glu_backward`), elsewhere with the reference ops chunked at 16 M elements — and hands
``grad_a`` to the activation's node, which autograd runs next (it consumes that node's output) and which returns it as
its input's gradient, adding its own chain rule only if ``act(a)`` had other uses. The forward's outputs are the very
``act(a)`` and product the unfused path computes (bit-identical).

Pattern match, not a module swap: the user's forward stays ``F.silu(self.w1(x)) * self.w3(x)`` (``nn.SiLU``/``nn.GELU``
modules call the same functions). The product is fused only for the exact pattern (the same object with an unchanged
version counter, same shape/dtype/device, no broadcasting); anything else is the ordinary product. Numerics: ``grad_b``
uses ``act`` of the FP8 ``a`` instead of an FP8 ``act(a)``: for SiLU the error is ``silu'(a) * a`` instead of
``silu(a)`` times E4M3's relative error, up to 1.28x larger for a > 0, smaller for a < 0 (0.8 dB lower input-gradient
SQNR in tests/recipes/test_fp8_glu.py). The packs are freed by the first backward, so a second backward through the
same graph (``retain_graph=True``) raises.
"""

from __future__ import annotations

import importlib.util
import math
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "MUL_FUNCTIONS",
    "ActState",
    "GluMatcher",
    "act_backward_reference",
    "activation_of",
    "glu_backward_reference",
]

MUL_FUNCTIONS = frozenset({torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul})
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # kernel constexpr ACT = index
_CHUNK = 1 << 24
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K0 = math.sqrt(2.0 / math.pi)  # tanh-GELU: u = K0 * (a + K1 * a^3)
_K1 = 0.044715
RETAIN_GRAPH_ERROR = ("backward ran twice through a gated linear unit fused by activations.glu='fused', whose FP8 "
                      "inputs are freed after the first backward; retain_graph=True is not supported there: use "
                      "activations.glu: separate for double backward passes.")

#: The Triton backward (lowbit_amp/kernels/glu_backward.py) on CUDA; ``LOWBIT_AMP_FUSED_GLU_KERNEL=0`` turns it off
#: for a process (the reference ops then run, same formula).
FUSED_KERNEL = os.environ.get("LOWBIT_AMP_FUSED_GLU_KERNEL", "1") == "1"


class ActState:
    """What one activation call under the storage shares with the product that consumes it: the activation's name,
    the FP8 pack of its input, and the input gradient the fused product's backward computed (see :class:`_Fp8Act`)."""

    __slots__ = ("act", "grad_a", "packed")

    def __init__(self, act: str, packed: Any) -> None:
        self.act = act
        self.packed = packed
        self.grad_a: torch.Tensor | None = None


class GluMatcher:
    """Remembers activation outputs of the current forward (weakly) with their :class:`ActState`, until a product
    uses them."""

    def __init__(self) -> None:
        self._outputs: dict[int, tuple[Any, int, ActState]] = {}

    def clear(self) -> None:
        self._outputs.clear()

    def record(self, out: torch.Tensor, state: ActState) -> None:
        key = id(out)
        table = self._outputs

        def forget(_ref: Any, key: int = key) -> None:
            table.pop(key, None)

        self._outputs[key] = (weakref.ref(out, forget), out._version, state)

    def match(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor, ActState] | None:
        """``(s, b, state)`` when one of ``x, y`` is a recorded ``s = act(a)`` and the other a same-shaped tensor."""
        for s, b in ((x, y), (y, x)):
            if type(s) is not torch.Tensor or type(b) is not torch.Tensor:
                continue
            hit = self._outputs.get(id(s))
            if hit is None or hit[0]() is not s or hit[1] != s._version:
                continue
            if b.shape != s.shape or b.dtype != s.dtype or b.device != s.device or b is s:
                return None
            del self._outputs[id(s)]
            return s, b, hit[2]
        return None


def activation_of(func: Any, args: tuple, kwargs: dict, min_numel: int) -> str | None:
    """The name in :data:`ACTIVATIONS` of an eligible call — a plain out-of-place ``F.silu`` or ``F.gelu`` on a
    floating tensor that will need a gradient — else None."""
    if not args or not torch.is_grad_enabled():
        return None
    if func is F.silu:
        if len(args) != 1 or kwargs.get("inplace", False) or set(kwargs) - {"inplace"}:
            return None
        act = "silu"
    elif func is F.gelu:
        approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
        if len(args) > 2 or set(kwargs) - {"approximate"} or approximate not in ("none", "tanh"):
            return None
        act = "gelu" if approximate == "none" else "gelu_tanh"
    else:
        return None
    a = args[0]
    ok = (type(a) is torch.Tensor and a.dtype in (torch.bfloat16, torch.float16, torch.float32) and a.requires_grad
          and a.numel() >= min_numel)
    return act if ok else None


def _act_parts(a: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(a), act'(a)`` in FP32, written without cancellation (the kernel uses the same formulas):

    * SiLU: ``sig = 1 / (1 + e)``, ``e = exp(-a)``; ``1 - sig`` as ``e * sig`` for ``a >= 0`` (the subtraction costs 10
      FP32 ulps at a = 12.7) and as ``1 - sig`` below (e may overflow there);
    * GELU: ``Phi = (1 + erf(a / sqrt 2)) / 2``, ``act = a * Phi``, ``act' = Phi + a * phi(a)``;
    * tanh-GELU: ``u = K0 (a + K1 a^3)``, ``e = exp(-2|u|)``: ``1 + tanh u = 2 / (1 + e)`` (u >= 0) or ``2e / (1 + e)``,
      ``1 - tanh^2 u = 4e / (1 + e)^2`` — no ``1 - t`` near ``|t| = 1``.
    """
    if act == "silu":
        e = torch.exp(-a)
        sig = 1.0 / (1.0 + e)
        one_minus = torch.where(a >= 0, e * sig, 1.0 - sig)
        return a * sig, sig * (1.0 + a * one_minus)
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * _SQRT_HALF))
        return a * cdf, cdf + a * (torch.exp(-0.5 * a * a) * _INV_SQRT_2PI)
    u = _K0 * (a + _K1 * a * a * a)
    e = torch.exp(-2.0 * u.abs())
    inv = 1.0 / (1.0 + e)
    one_plus_t = torch.where(u >= 0, 2.0 * inv, 2.0 * e * inv)
    sech2 = 4.0 * e * inv * inv
    return 0.5 * a * one_plus_t, 0.5 * one_plus_t + 0.5 * a * sech2 * (_K0 * (1.0 + 3.0 * _K1 * a * a))


def act_backward_reference(grad: torch.Tensor, a: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``grad * act'(a)`` in FP32, rounded once to ``grad``'s dtype; chunked like :func:`glu_backward_reference`."""
    g, a = grad.reshape(-1), a.reshape(-1)
    out = torch.empty(g.numel(), dtype=grad.dtype, device=grad.device)
    for start in range(0, g.numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        out[sl] = g[sl].float() * _act_parts(a[sl].float(), act)[1]
    return out.view(grad.shape)


def glu_backward_reference(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool = True,
                           need_b: bool = True, act: str = "silu") -> tuple[torch.Tensor | None, ...]:
    """``(grad_a, grad_b)`` of ``act(a) * b`` in FP32, rounded once to ``grad``'s dtype; chunked (flat) so the FP32
    temporaries stay at 16 M elements. ``a``/``b`` may be FP32 decodings of FP8 (no intermediate rounding)."""
    shape = grad.shape
    g, a, b = grad.reshape(-1), a.reshape(-1), b.reshape(-1)
    ga = torch.empty(g.numel(), dtype=grad.dtype, device=grad.device) if need_a else None
    gb = torch.empty(g.numel(), dtype=grad.dtype, device=grad.device) if need_b else None
    for start in range(0, g.numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        g32, a32, b32 = g[sl].float(), a[sl].float(), b[sl].float()
        s, ds = _act_parts(a32, act)
        if ga is not None:
            ga[sl] = g32 * b32 * ds
        if gb is not None:
            gb[sl] = g32 * s
    return (ga.view(shape) if ga is not None else None, gb.view(shape) if gb is not None else None)


def _decode_f32(packed: Any) -> torch.Tensor:
    """FP8 group codes -> FP32 values in the packed (memory) order, no rounding to the model dtype (a kept tensor:
    its FP32 copy)."""
    from lowbit_amp.recipes.fp8_activations import PackedActivation, decode_flat

    return decode_flat(packed, torch.float32) if isinstance(packed, PackedActivation) else packed.float()


#: Activations whose Triton backward has passed tests/gpu/test_fp8_glu_gpu.py on a GPU; the others take the reference
#: ops on CUDA. All three passed on an H200 (2026-12-01, run r of bench/results; ``bash bench/run_gpu.sh next``).
GPU_VERIFIED = frozenset({"silu", "gelu", "gelu_tanh"})


def _kernel_serves(grad: torch.Tensor, pa: Any, pb: Any, act: str = "silu") -> bool:
    from lowbit_amp.recipes.fp8_activations import PackedActivation

    if not FUSED_KERNEL or not (isinstance(pa, PackedActivation) and isinstance(pb, PackedActivation)):
        return False
    if pa.stride is not None or pb.stride is not None or not grad.is_contiguous():
        return False
    if pa.codes.shape[1] != pb.codes.shape[1]:
        return False
    if grad.device.type == "cuda":
        from lowbit_amp.kernels.dispatch import fused_kernels_available

        return (act in GPU_VERIFIED and fused_kernels_available()
                and grad.dtype in (torch.bfloat16, torch.float16, torch.float32))
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


class _Fp8Act(torch.autograd.Function):
    """``F.silu``/``F.gelu`` whose input is kept as the storage's FP8 pack. Backward: the input gradient a fused
    product handed over (``state.grad_a``; the product's node runs first, it consumes this node's output), plus the
    activation's own chain rule for any other use of the output (``grad_s``; None when the product was the only one)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, state: ActState) -> torch.Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.state = state
        if state.act == "silu":
            return F.silu(a)
        return F.gelu(a, approximate="none" if state.act == "gelu" else "tanh")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_s: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        state = ctx.state
        if state.packed is None:
            raise RuntimeError(RETAIN_GRAPH_ERROR)
        grad_a, state.grad_a = state.grad_a, None
        if grad_s is not None:
            own = act_backward_reference(grad_s, _decode_f32(state.packed), state.act)
            grad_a = own if grad_a is None else grad_a + own
        state.packed = None  # both nodes are done with it
        return grad_a, None


class _FusedGlu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, b: torch.Tensor, state: ActState, storage: Any) -> torch.Tensor:  # type: ignore[override]
        # Not save_for_backward: packed through the storage here and decoded by the backward itself, so no
        # model-dtype copy of either input is ever rebuilt; ``s`` is not kept at all.
        ctx.state = state
        ctx.packed_b = storage.pack(b)
        return torch.mul(s, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        state = ctx.state
        pa, pb = state.packed, ctx.packed_b
        if pa is None or pb is None:
            raise RuntimeError(RETAIN_GRAPH_ERROR)
        ctx.packed_b = None
        need_a, need_b = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        if _kernel_serves(grad, pa, pb, state.act):
            from lowbit_amp.kernels.glu_backward import glu_backward_packed

            ga, gb = glu_backward_packed(grad, pa, pb, need_a, need_b, state.act)
        else:
            ga, gb = glu_backward_reference(grad, _decode_f32(pa), _decode_f32(pb), need_a, need_b, state.act)
        state.grad_a = ga  # to the activation's node, which runs next: the gradient w.r.t. a, not w.r.t. act(a)
        return None, gb, None, None


def fused_glu(s: torch.Tensor, b: torch.Tensor, state: ActState, storage: Any) -> torch.Tensor:
    """``s * b`` for ``s`` from :func:`activation`: saves ``b`` in FP8 and nothing of ``s`` (see the module doc)."""
    storage.stats.glu_fused += 1
    return _FusedGlu.apply(s, b, state, storage)


def activation(act: str, a: torch.Tensor, storage: Any, matcher: GluMatcher) -> torch.Tensor:
    """``act(a)`` with ``a`` kept as the storage's FP8 pack, its output remembered for :meth:`GluMatcher.match`."""
    with torch.no_grad():  # the pack's own ops must not record a graph (whose saves the hooks would pack again)
        state = ActState(act, storage.pack(a))
    out = _Fp8Act.apply(a, state)
    matcher.record(out, state)
    return out
