"""COAT-style FP8 activation storage (arXiv 2410.19313): what autograd saves for backward is kept in FP8.

Why: in a Llama-style block most of the training memory above weights and optimizer state is *saved activations* —
the inputs and outputs of RMSNorm, SiLU, the GLU product, attention and the linear layers, kept until backward.
lowbit_amp's FP8 linear layers already save their input as FP8 (per-tensor scale, reused by both backward GEMMs), but
every non-linear op still saves 16- or 32-bit tensors. This recipe stores those in E4M3 with fine-grained group scales.

Mechanism: :func:`torch.autograd.graph.saved_tensors_hooks`. The pack hook sees every tensor any op (functional or
module, ours or the user's) saves for backward and may return something smaller; the unpack hook gives backward the
tensor back. This covers ``F.silu``, the GLU product, residual adds, norms written by hand (the tiny GPT's RMSNorm) and
``nn.RMSNorm``/``nn.LayerNorm`` alike without a module swap, which per-op drop-in autograd Functions could not.
What the pack hook leaves alone, and why:

* non-floating tensors (indices, bool masks) and tensors already in an 8-bit dtype (the FP8 linear's own saves: no
  double quantization);
* parameters and views of them (``nn.Linear`` saves ``weight.t()``): they live anyway, a copy would *add* memory;
* tensors below ``min_numel`` elements (per-row statistics such as RMSNorm's ``rstd``): bytes saved are negligible and
  each quantization costs a dozen small kernel launches;
* everything saved inside the functions in :data:`EXACT_FUNCTIONS` (attention, log-softmax / cross-entropy,
  logsumexp): their backward re-exponentiates a saved *log-domain* value (attention's logsumexp, log-probabilities),
  where E4M3's 6% relative error becomes an error of the exponent — e.g. a log-probability of -5.5 off by 0.34 scales
  that softmax gradient by e^0.34. The attention inputs/output stay in the model dtype too, as in COAT (FlashAttention
  untouched) — unless ``attention='fp8'``: then q, k, v are saved in FP8 and attention is recomputed in backward, so
  no log-domain value is ever stored (:mod:`lowbit_amp.recipes.fp8_attention`). Users can mark other regions with
  :func:`exact_storage`.

Number format. E4M3 (one more mantissa bit than E5M2; activations need resolution, not range). The tensor is split into
consecutive groups of ``group_size`` elements in memory order (1x16 along the last dim for contiguous tensors whose last
dim is a multiple of 16; a tail that does not fill a group is zero-padded). Scales use COAT's two-stage "group scaling":

1. stage 1: per-group amax (one pass over the data, ``aminmax`` per group, no full-size ``|x|`` temporary);
2. stage 2: the per-tensor amax is the max of the group amaxes (a pass over ``numel/16`` values, not over the data).

The per-tensor amax gives an FP32 tensor scale ``S = 448 / amax``; each group stores one **uint8 exponent shift**
``k = floor(log2(amax_tensor / amax_group))`` (clamped to [0, 255]) and is scaled by ``S * 2**k``, which maps its own
amax into (224, 448]. A power-of-two shift costs E4M3 nothing inside the normal range (a floating-point grid has the
same relative spacing at every exponent), yet gives every group of 16 its own range, so a quiet token next to an outlier
channel is not flushed into E4M3's subnormals. Storage: 1 byte per element + 1 byte per 16 + 4 bytes per tensor =
1.0625 B/element, 1.88x below bf16 and 3.76x below fp32 (an FP32 scale per group would be 1.25 B/element).

Non-finite activations: a NaN or inf makes the tensor's amax non-finite, so the whole tensor comes back NaN (never an
inf silently clamped to 448) and the step's gradients are non-finite — the loss scaler skips the step, as it would in
high precision. Code that saves a legitimate ±inf (a masked score in a custom op) belongs in :func:`exact_storage`.
Cost: plain PyTorch ops — pack is ``aminmax``, one multiply promoting to fp32, a clamp and the E4M3 cast (about 21
bytes of traffic per bf16 element), unpack an upcast and a multiply written straight into the model dtype (about 11),
chunked so the fp32 temporaries stay at ``_CHUNK`` elements. A Triton version of both casts
(:mod:`lowbit_amp.kernels.group_cast`, ~5 bytes of traffic per bf16 element, bit-identical on the GPU and in
Triton's interpreter) serves on CUDA (:data:`FUSED_GROUP_CAST`). Eager mode only: under
``torch.compile`` the hooks
would see AOTAutograd's saved tensors, where the exact regions are not marked, so a compiled forward raises.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit_amp.formats import E4M3
from lowbit_amp.recipes.fp8_glu import MUL_FUNCTIONS as _MUL_FUNCTIONS
from lowbit_amp.recipes.fp8_glu import GluMatcher as _GluMatcher

__all__ = [
    "EXACT_FUNCTIONS",
    "Fp8ActivationStorage",
    "PackedActivation",
    "SavedStats",
    "attach",
    "decode_flat",
    "dequantize_groups",
    "detach",
    "exact_storage",
    "fp8_activation_storage",
    "quantize_groups",
    "storage_of",
    "weight_cache_ptrs",
]

FP8_MAX = E4M3.max
MAX_SHIFT = 255
MAX_SCALE = 2.0**126
_CHUNK = 1 << 24  # elements per quantization chunk: bounds the FP32 temporaries at 64 MiB
COMPILE_ERROR = ("activations.storage='fp8' runs in eager mode only: under torch.compile the saved tensors are "
                 "AOTAutograd's, where the attention/log-softmax saves are not kept exact. Compile without it, or use "
                 "activations.storage='hp'.")
_EIGHT_BIT = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.uint8,
              torch.int8}

EXACT_FUNCTIONS: frozenset = frozenset({
    F.scaled_dot_product_attention, F.multi_head_attention_forward,
    F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax,
    F.cross_entropy, F.nll_loss,
    torch.logsumexp, torch.Tensor.logsumexp,
})
"""Functions whose saved tensors stay in high precision (their backward exponentiates a saved log-domain value)."""

ATTENTION_MODES = ("exact", "fp8")
GLU_MODES = ("separate", "fused")
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # (pack, unpack) on top, or None


# ------------------------------------------------------------------------------------------------ the group cast
@dataclass
class PackedActivation:
    """One saved tensor in FP8: codes, per-group exponent shifts, the tensor's FP32 scale and how to rebuild it."""

    codes: torch.Tensor  # float8_e4m3fn, (groups, group_size)
    shifts: torch.Tensor  # uint8, (groups,)
    tensor_scale: torch.Tensor  # float32 scalar, S = 448 / amax
    shape: torch.Size
    stride: tuple[int, ...] | None  # strides to restore (dense non-contiguous inputs), None: contiguous
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.shifts.nbytes + self.tensor_scale.nbytes


#: The Triton group cast (lowbit_amp/kernels/group_cast.py) instead of the reference ops, on CUDA: on since
#: tests/gpu/test_group_cast_gpu.py passed on an H200 (2026-12-01, bit-identical codes, shifts, scales and decoded
#: values). ``LOWBIT_AMP_FUSED_GROUP_CAST=0`` switches it off for a process.
FUSED_GROUP_CAST = os.environ.get("LOWBIT_AMP_FUSED_GROUP_CAST", "1") == "1"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fused_group_cast_serves(t: torch.Tensor, group_size: int) -> bool:
    """CUDA (or any device under Triton's interpreter, for the tests), a power-of-2 group size, a 16/32-bit float."""
    if not FUSED_GROUP_CAST or t.dtype not in _KERNEL_DTYPES or group_size & (group_size - 1) or group_size > 1024:
        return False
    if t.device.type == "cuda":
        from lowbit_amp.kernels.dispatch import fused_kernels_available

        return fused_kernels_available() and not torch.compiler.is_compiling()
    return os.environ.get("TRITON_INTERPRET") == "1"


def _group_scale(tensor_scale: torch.Tensor, shifts: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``S * 2**k`` per group (or its reciprocal), exact in float32."""
    scale = tensor_scale.double() * torch.exp2(shifts.double())
    return (scale.reciprocal() if inverse else scale).float()


def quantize_groups(x: torch.Tensor, group_size: int = 16) -> PackedActivation:
    """E4M3 with per-group power-of-two shifts under a per-tensor FP32 scale (two-stage amax; see the module doc).

    Groups are ``group_size`` consecutive elements of ``x`` in memory order; dense non-contiguous tensors (transposes,
    permutes) are read in their own memory order and come back with the same strides.
    """
    stride = None
    src = x
    if not x.is_contiguous():
        like = torch.empty_like(x, device="meta")  # keeps x's strides when x is dense, else contiguous ones
        if like.is_contiguous():
            src = x.contiguous()
        else:
            stride = like.stride()
            perm = sorted(range(x.dim()), key=lambda d: -stride[d])  # the same order dequantize_groups rebuilds
            src = x.permute(perm).contiguous()  # a no-copy view when x is dense in that order
    flat = src.reshape(-1)
    numel = flat.numel()
    if _fused_group_cast_serves(flat, group_size):
        from lowbit_amp.kernels.group_cast import quantize_flat

        codes, shifts, tensor_scale = quantize_flat(flat, group_size)
        return PackedActivation(codes, shifts, tensor_scale, x.shape, stride, x.dtype, numel)
    pad = (-numel) % group_size
    if pad:
        flat = F.pad(flat, (0, pad))
    groups = flat.view(-1, group_size)
    # Stage 1: per-group amax without a full-size |x| temporary. Stage 2: per-tensor amax over the group amaxes.
    lo, hi = torch.aminmax(groups, dim=1)
    group_amax = torch.maximum(hi, lo.neg()).float()
    tensor_amax = group_amax.max()
    # S = 448 / amax, capped at 2**126 like lowbit_amp.quant.cast.compute_scale; an all-zero tensor gets 1; a
    # non-finite amax gives NaN, so the non-finite value is not silently clamped to +-448 but comes back as NaN.
    tensor_scale = (FP8_MAX / tensor_amax.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=MAX_SCALE)
    tensor_scale = torch.where(tensor_amax > 0, tensor_scale, torch.ones_like(tensor_scale))
    tensor_scale = torch.where(torch.isfinite(tensor_amax), tensor_scale, torch.full_like(tensor_scale, float("nan")))
    # k = floor(log2(amax_t / amax_g)); frexp gives ratio = m * 2**e with m in [0.5, 1), so floor(log2) = e - 1.
    ratio = tensor_amax / group_amax.clamp_min(torch.finfo(torch.float32).tiny)
    _, exponent = torch.frexp(ratio)
    shifts = torch.where(group_amax > 0, exponent - 1, torch.full_like(exponent, MAX_SHIFT))
    _, cap = torch.frexp(MAX_SCALE / tensor_scale.double())  # S * 2**k must stay <= 2**126 (finite, invertible)
    shifts = torch.minimum(shifts.clamp(0, MAX_SHIFT), (cap - 1).clamp(0, MAX_SHIFT)).to(torch.uint8)
    codes = torch.empty(groups.shape, dtype=E4M3.dtype, device=x.device)
    for start in range(0, groups.shape[0], max(1, _CHUNK // group_size)):
        sl = slice(start, start + max(1, _CHUNK // group_size))
        # S * 2**k is exact (a power-of-two multiple, <= 2**126 by the cap); it is formed in float64 on the
        # numel/16 scales only, because 2**k alone can overflow float32 (torch.ldexp with integer exponents also
        # computes 2**k in integers). The clamp covers the last-ulp case where the fp32 ratio rounded up to 2**(k+1).
        scale = _group_scale(tensor_scale, shifts[sl])
        # bf16/fp16 x fp32 promotes to fp32 inside the multiply (no separate upcast pass); copy_ casts to E4M3 (RNE)
        codes[sl].copy_(torch.mul(groups[sl], scale[:, None]).clamp_(-FP8_MAX, FP8_MAX))
    return PackedActivation(codes, shifts, tensor_scale, x.shape, stride, x.dtype, numel)


def decode_flat(packed: PackedActivation, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The packed values in memory order (1-D, ``numel`` long) in ``dtype`` (default: the packed tensor's), each the
    FP32 product ``code * (S * 2^k)^-1`` rounded once. The fused GLU backward reads them in FP32, unrounded."""
    n_groups, group_size = packed.codes.shape
    out = torch.empty(n_groups * group_size, dtype=dtype or packed.dtype, device=packed.codes.device)
    step = max(1, _CHUNK // group_size)
    out2d = out.view(n_groups, group_size)
    if _fused_group_cast_serves(out, group_size):
        from lowbit_amp.kernels.group_cast import dequantize_into

        dequantize_into(packed.codes, packed.shifts, packed.tensor_scale, out)
    else:
        for start in range(0, n_groups, step):
            sl = slice(start, start + step)
            scale_inv = _group_scale(packed.tensor_scale, packed.shifts[sl], inverse=True)
            # fp32 product, rounded once on write
            torch.mul(packed.codes[sl].float(), scale_inv[:, None], out=out2d[sl])
    return out[: packed.numel]


def dequantize_groups(packed: PackedActivation) -> torch.Tensor:
    """The tensor :func:`quantize_groups` packed, in its dtype, shape (and strides, when they were dense)."""
    flat = decode_flat(packed)
    if packed.stride is None:
        return flat.view(packed.shape)
    # Rebuild the original dense layout: the data is in the order of decreasing stride.
    perm = sorted(range(len(packed.shape)), key=lambda d: -packed.stride[d])
    permuted_shape = [packed.shape[d] for d in perm]
    inverse = [perm.index(d) for d in range(len(perm))]
    return flat.view(permuted_shape).permute(inverse)


# ------------------------------------------------------------------------------------------------ the hooks
@dataclass
class SavedStats:
    """Bytes autograd asked to save under the hooks: how many went to FP8 (before/after) and how many were kept."""

    packed_tensors: int = 0
    packed_bytes_in: int = 0  # bytes of the high-precision tensors that were quantized
    packed_bytes_out: int = 0  # their FP8 codes + shifts + scales
    kept_bytes: int = 0  # floating tensors saved as they are (small, parameters, exact regions), distinct storages
    reused: int = 0  # saves of a tensor already packed in this forward (shared, not packed twice)
    glu_fused: int = 0  # act(a) * b products that saved a and b only (glu='fused', recipes/fp8_glu.py)
    kept_reasons: dict[str, int] = field(default_factory=dict)  # saves left as they are, by reason
    kept_bytes_by_reason: dict[str, int] = field(default_factory=dict)  # kept_bytes split by the same reasons

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def add_packed(self, t: torch.Tensor, packed: "PackedActivation") -> None:
        """Count one tensor stored in FP8 (the pack hook, FP8-saved attention)."""
        self.packed_tensors += 1
        self.packed_bytes_in += t.numel() * t.element_size()
        self.packed_bytes_out += packed.nbytes

    @property
    def stored_bytes(self) -> int:
        """What the forward's saves hold: the FP8 packs plus the tensors kept as they were."""
        return self.packed_bytes_out + self.kept_bytes

    @property
    def ratio(self) -> float:
        """(hp bytes quantized + kept) / (FP8 bytes + kept): the saved-activation memory reduction."""
        return (self.packed_bytes_in + self.kept_bytes) / max(1, self.stored_bytes)


_local = threading.local()


def _exact_depth() -> int:
    return getattr(_local, "exact", 0)


@contextmanager
def exact_storage() -> Iterator[None]:
    """Inside this block, tensors saved for backward stay in high precision even under FP8 storage."""
    _local.exact = _exact_depth() + 1
    try:
        yield
    finally:
        _local.exact -= 1


def weight_cache_ptrs(modules: Any) -> set[int]:
    """Storages of the FP8 weights LowBitLinear layers cache between steps (saved by their Function, but they are
    weight memory, not activations: the byte counts leave them out like parameters)."""
    ptrs = set()
    for module in modules:
        cache = getattr(module, "_weight_cache", None)
        for item in cache or ():
            if isinstance(item, torch.Tensor):
                ptrs.add(item.untyped_storage().data_ptr())
    return ptrs


def _refuse_compiled_caller() -> None:
    """Raise when the save comes from an AOTAutograd-compiled graph (``torch.compile``): there the hooks see the
    compiled graph's saved tensors, the exact regions are not marked and layouts differ."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return
        if "_aot_autograd" in frame.f_code.co_filename:
            raise RuntimeError(COMPILE_ERROR)
        frame = frame.f_back


class _ExactFunctions(TorchFunctionMode):
    """Runs the functions of :data:`EXACT_FUNCTIONS` inside :func:`exact_storage` (a name-based, op-level marker:
    the pack hook itself cannot see which op is saving) — except attention under ``attention='fp8'``, which goes
    through :mod:`lowbit_amp.recipes.fp8_attention` (q, k, v saved in FP8, recomputed in backward) when eligible."""

    def __init__(self, storage: "Fp8ActivationStorage") -> None:
        super().__init__()
        self.storage = storage

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        storage = self.storage
        if func is F.scaled_dot_product_attention and storage.attention == "fp8" and storage.hooks_innermost():
            from lowbit_amp.recipes import fp8_attention

            if fp8_attention.qkv_eligible(args, kwargs, storage.min_numel):
                return fp8_attention.fp8_saved_attention(args, kwargs, storage.group_size, storage.stats)
        if func in EXACT_FUNCTIONS:
            with exact_storage():
                return func(*args, **kwargs)
        if storage.glu == "fused":  # every op of the forward passes here: the cheap tests first
            if func is F.silu or func is F.gelu:
                from lowbit_amp.recipes import fp8_glu

                act = fp8_glu.activation_of(func, args, kwargs, storage.min_numel)
                if act is not None and not _exact_depth() and storage.hooks_innermost():
                    return fp8_glu.activation(act, args[0], storage, storage.glu_matcher)
            elif func in _MUL_FUNCTIONS and len(args) == 2 and not kwargs and torch.is_grad_enabled():
                hit = storage.glu_matcher.match(*args)
                if hit is not None and storage.hooks_innermost():
                    from lowbit_amp.recipes import fp8_glu

                    return fp8_glu.fused_glu(*hit, storage)
        return func(*args, **kwargs)


class Fp8ActivationStorage:
    """The saved-tensor hooks of one model (or one region): enter it around the forward pass.

    Args:
        group_size: elements per scale group (COAT: 16).
        min_numel: tensors with fewer elements are saved as they are.
        params: tensors whose storages are never quantized (besides ``module``'s).
        module: the model; its parameters and buffers (read again at every entry, so re-registered or re-sharded
            parameters are seen) are never quantized, and its FP8 weight caches are told apart from activations in
            :attr:`stats`.
        attention: ``exact`` (attention's saves stay in the model dtype) or ``fp8`` (q, k, v saved in FP8 and
            attention recomputed in backward: :mod:`lowbit_amp.recipes.fp8_attention`).
        glu: ``separate`` (the activation and the product save their operands as any op) or ``fused`` (``silu(a) * b``
            and ``gelu(a) * b`` save ``a`` and ``b`` only, the backward decodes them in one pass:
            :mod:`lowbit_amp.recipes.fp8_glu`).
    """

    def __init__(self, group_size: int = 16, min_numel: int = 1 << 16, params: Any = (),
                 module: nn.Module | None = None, attention: str = "exact", glu: str = "separate") -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}.")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r} is not one of {list(ATTENTION_MODES)}.")
        if glu not in GLU_MODES:
            raise ValueError(f"glu={glu!r} is not one of {list(GLU_MODES)}.")
        self.group_size = group_size
        self.attention = attention
        self.glu = glu
        self.glu_matcher = _GluMatcher()
        self.min_numel = min_numel
        self.stats = SavedStats()
        self._params = list(params)
        self._module = module
        self._modules: list[nn.Module] = []  # LowBitLinear layers (their FP8 weight caches, for the stats)
        self._param_ptrs: set[int] = set()
        self._seen: dict[int, tuple[Any, int, PackedActivation]] = {}
        self._kept_ptrs: set[int] = set()
        self._stack: list[Any] = []

    # -- pack / unpack -------------------------------------------------------------------------------------
    def _keep(self, t: torch.Tensor, reason: str) -> torch.Tensor:
        stats = self.stats
        stats.kept_reasons[reason] = stats.kept_reasons.get(reason, 0) + 1
        if t.is_floating_point() and reason != "parameter or leaf":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._kept_ptrs:
                self._kept_ptrs.add(ptr)
                nbytes = t.untyped_storage().nbytes()
                stats.kept_bytes += nbytes
                stats.kept_bytes_by_reason[reason] = stats.kept_bytes_by_reason.get(reason, 0) + nbytes
        # A non-leaf kept as is must be packed detached: packing the tensor object itself, when it is an output saved
        # by its own node (SDPA, exp, sigmoid), makes node -> packed tensor -> grad_fn -> node a cycle through C++ that
        # no garbage collector frees — every forward without a backward leaked its graph (found by bench_coat.py).
        return t.detach() if t.grad_fn is not None else t

    def pack(self, t: torch.Tensor) -> Any:
        if not t.is_floating_point() or t.dtype in _EIGHT_BIT:
            if self._modules and t.untyped_storage().data_ptr() in weight_cache_ptrs(self._modules):
                return self._keep(t, "parameter or leaf")  # the FP8 linear's cached weight: lives anyway
            return self._keep(t, "not a 16/32-bit float")
        base = t._base if t._base is not None else t  # nn.Linear saves weight.t(), a view of the parameter
        if isinstance(base, nn.Parameter) or (base.requires_grad and base.grad_fn is None) or (
                t.untyped_storage().data_ptr() in self._param_ptrs):
            return self._keep(t, "parameter or leaf")
        if _exact_depth():
            return self._keep(t, "exact region")
        if t.numel() < self.min_numel:
            return self._keep(t, "small")
        if type(t).__name__ not in ("Tensor", "Parameter") or t.device.type == "meta":
            return self._keep(t, "tensor subclass / meta")
        _refuse_compiled_caller()  # a few frame hops per packed tensor; also catches a compiled submodule
        # The same tensor saved by several ops (RMSNorm's input by pow and mul, one input by two linears) is packed
        # once. Keyed on the Python object, validated by a weak reference and the version counter, so a freed tensor
        # whose id is reused never matches.
        key = id(t)
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            self.stats.reused += 1
            return hit[2]
        packed = quantize_groups(t, self.group_size)
        try:
            self._seen[key] = (weakref.ref(t), t._version, packed)
        except TypeError:
            pass
        self.stats.add_packed(t, packed)
        return packed

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        if isinstance(obj, PackedActivation):
            return dequantize_groups(obj)
        return obj

    def hooks_innermost(self) -> bool:
        """Whether this storage's pack hook is the one autograd calls now. Inside a region with saved-tensor hooks of its
        own (non-reentrant activation checkpointing) it is not: the region's saves are not ours to store, and the
        FP8-saving nodes (attention, the fused gated units) would change what the region's recompute must reproduce
        (``CheckpointError``), so those ops run as written there."""
        if _TOP_HOOKS is None:
            return True
        try:
            top = _TOP_HOOKS(False)  # ignore_is_tracing
        except TypeError:  # a torch whose private helper takes no argument
            top = _TOP_HOOKS()
        return top is None or getattr(top[0], "__self__", None) is self

    # -- context -------------------------------------------------------------------------------------------
    def __enter__(self) -> "Fp8ActivationStorage":
        tensors = list(self._params)
        if self._module is not None:
            tensors += [*self._module.parameters(), *self._module.buffers()]
            self._modules = [m for m in self._module.modules() if hasattr(m, "_weight_cache")]
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in tensors}
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        mode = _ExactFunctions(self)
        hooks.__enter__()
        mode.__enter__()
        self._stack.append((hooks, mode))
        return self

    def __exit__(self, *exc: Any) -> None:
        hooks, mode = self._stack.pop()
        mode.__exit__(*exc)
        hooks.__exit__(*exc)
        if not self._stack:
            self._seen.clear()
            self._kept_ptrs.clear()
            self.glu_matcher.clear()


def fp8_activation_storage(group_size: int = 16, min_numel: int = 1 << 16, module: nn.Module | None = None,
                           attention: str = "exact", glu: str = "separate") -> Fp8ActivationStorage:
    """A context manager storing saved activations in FP8 (``with fp8_activation_storage(module=model): loss = ...``).

    Pass ``module`` so its parameters and buffers are recognised and never copied; ``attention='fp8'`` also saves
    attention's q, k, v in FP8 (:mod:`lowbit_amp.recipes.fp8_attention`); ``glu='fused'`` saves ``silu(a) * b`` (or
    ``gelu(a) * b``) as ``a`` and ``b`` only (:mod:`lowbit_amp.recipes.fp8_glu`).
    """
    return Fp8ActivationStorage(group_size, min_numel, module=module, attention=attention, glu=glu)


# ------------------------------------------------------------------------------------------------ amp.initialize hook
HOOK_ATTR = "_lowbit_fp8_activations"


def attach(model: nn.Module, group_size: int = 16, min_numel: int = 1 << 16, attention: str = "exact",
           glu: str = "separate") -> Fp8ActivationStorage:
    """Run ``model``'s every forward inside FP8 activation storage (what ``activations.storage: fp8`` does).

    A forward pre-hook on the root module enters the hooks and a forward hook (``always_call``: also when forward
    raises) leaves them, so the user's training loop is unchanged; backward runs outside, unpacking on demand.
    Returns the storage object; its ``stats`` count the bytes of the most recent forward with grad enabled.
    """
    if getattr(model, HOOK_ATTR, None) is not None:
        raise ValueError("FP8 activation storage is already attached to this model.")
    storage = Fp8ActivationStorage(group_size, min_numel, module=model, attention=attention, glu=glu)

    def pre(_module: nn.Module, _args: Any) -> None:
        if torch.compiler.is_compiling():  # traced hooks: see _refuse_compiled_caller
            raise RuntimeError(COMPILE_ERROR)
        if not storage._stack and torch.is_grad_enabled():  # an eval forward saves nothing: keep the last stats
            storage.stats.reset()
        storage.__enter__()

    def post(_module: nn.Module, _args: Any, _output: Any) -> None:
        storage.__exit__(None, None, None)

    handles = (model.register_forward_pre_hook(pre), model.register_forward_hook(post, always_call=True))
    setattr(model, HOOK_ATTR, (storage, handles))
    return storage


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (activations are saved in high precision again)."""
    entry = getattr(model, HOOK_ATTR, None)
    if entry is None:
        return
    for handle in entry[1]:
        handle.remove()
    setattr(model, HOOK_ATTR, None)


def storage_of(model: nn.Module) -> Fp8ActivationStorage | None:
    """The storage :func:`attach` put on ``model`` (None when FP8 activation storage is off)."""
    entry = getattr(model, HOOK_ATTR, None)
    return entry[0] if entry is not None else None
