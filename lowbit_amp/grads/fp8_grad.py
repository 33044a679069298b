"""``Fp8Grad``: a weight gradient stored as FP8 codes + one FP32 scale (1 byte per parameter), usable as ``p.grad``.

Why a tensor subclass: autograd's engine casts a returned gradient whose dtype differs from the input's back to the
input's dtype, so a plain ``float8`` tensor would be silently widened to bf16/fp32. ``Fp8Grad`` is a *wrapper* subclass
whose declared dtype/shape/device are the parameter's, while its only storage is the FP8 ``codes`` and a 0-d ``scale``
(``hp ≈ codes / scale``, the core convention of :mod:`lowbit_amp.quant.cast`).

What user code does with gradients keeps working (ops live in :mod:`lowbit_amp.grads.ops`):

* micro-batch accumulation (AccumulateGrad's ``grad += new``) — ``rescale`` mode sums in FP32 and re-quantizes with
  a fresh scale (stays 1 B/param); ``fp32`` mode keeps an FP32 accumulator until :meth:`Fp8Grad.finalize` quantizes
  once (4 B/param while accumulating). ``docs/optimizer.md`` has the measured error of each.
* ``mul_``/``div_`` by a scalar and ``_foreach_mul_`` change only the scale (``clip_grad_norm_``, loss unscaling);
* ``norm``/``_foreach_norm`` compute on the dequantized values; ``zero_``/``_foreach_zero_`` keep the storage;
* any other op sees the dequantized tensor in the declared dtype (inspection), and any other in-place op re-encodes;
* ``grad.data = t`` re-encodes ``t`` (``Module.to()`` relies on it); a ``t`` that views a larger buffer (DeepSpeed
  ZeRO's aliasing of its gradient bucket) raises, since an FP8 copy cannot follow later writes to that buffer.

Non-finite gradients: a NaN/inf anywhere in the FP32 gradient makes the scale NaN, so every dequantized element is NaN
and ``isfinite(grad).all()`` (the loss scaler's check) and the optimizer's skip both see it — a saturating cast alone
would have turned inf into a finite ±448·scale⁻¹ and hidden it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Self

import torch

from lowbit_amp.formats import Format, get_format
from lowbit_amp.quant.cast import compute_scale, dequantize, quantize
from lowbit_amp.quant.granularity import amax

__all__ = ["ACCUMULATION_MODES", "Fp8Grad", "encode_fp8", "to_fp8_weight_grad"]

ACCUMULATION_MODES = ("rescale", "fp32")
_TENSOR_DATA = torch.Tensor.data  # torch's own getset descriptor, which Fp8Grad.data wraps


def encode_fp8(hp: torch.Tensor, fmt: Format, rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of ``hp`` with a fresh per-tensor scale; a non-finite input yields a NaN scale (see above).

    On CUDA (eager, with :data:`FUSED_ENCODE`) the fused cast kernel serves it: two passes (amax, then cast) and no
    full-size temporaries. The reference's ``x * scale`` and ``clamp`` each allocated an FP32 copy of the gradient
    (``clamp`` is now in place): for the 4096x14336 weights of the issue-7 anchor that was 448 MiB live at the step's
    memory peak, on top of the GEMM's FP32 output (H200 allocation trace, bench/memory_peak_breakdown.py). Same codes and scale for a finite input
    (tests/gpu/test_fp8_grad_encode_gpu.py); for a non-finite one the scale is NaN either way, which is all that
    marks it (its codes are not meaningful on either path)."""
    if rounding == "nearest" and _fused_encode_serves(hp, fmt):
        return _fused_encode(hp, fmt)
    current = amax(hp)  # of |hp|: >= 0, +inf or NaN, so ``current < inf`` is isfinite() in one op instead of four
    scale = torch.where(current < math.inf, compute_scale(current, fmt), math.nan)
    return quantize(hp, scale, fmt, rounding=rounding), scale


#: On since tests/gpu/test_fp8_grad_encode_gpu.py passed on an H200 (run i, 2026-12-01: codes and scales bit-identical
#: to the reference ops). ``LOWBIT_AMP_FUSED_ENCODE=0`` switches it off for a whole process (the reference ops).
FUSED_ENCODE = os.environ.get("LOWBIT_AMP_FUSED_ENCODE", "1") == "1"


def _fused_encode_serves(hp: torch.Tensor, fmt: Format) -> bool:
    """The fused kernel's preconditions (lowbit_amp/kernels/dispatch.py) for a per-tensor, round-to-nearest encode."""
    if not FUSED_ENCODE or hp.device.type != "cuda":  # every weight gradient passes here: the cheap tests first
        return False
    from lowbit_amp.kernels.dispatch import fused_kernels_available

    return (hp.dim() >= 1 and hp.numel() > 0 and fmt.is_float
            and hp.dtype in (torch.bfloat16, torch.float16, torch.float32) and fused_kernels_available()
            and not torch.compiler.is_compiling())


def _fused_encode(hp: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    from lowbit_amp.kernels.fp8_cast import launch_cast

    x2d = hp.reshape(-1, hp.shape[-1])
    amax_out = torch.empty((), dtype=torch.float32, device=hp.device)
    nonfinite = torch.empty((), dtype=torch.int64, device=hp.device)
    # current scaling with this tensor's amax, recorded "fresh" into amax_out / nonfinite (no zero-fill launches)
    codes, _, scale_out = launch_cast(x2d, amax_out, fmt.dtype, fmt.max, fmt.max, current=True, record=True,
                                      want_transpose=False, pending=amax_out, nonfinite=nonfinite, scratch=None,
                                      fresh=True)
    scale = torch.where(nonfinite == 0, scale_out[0], math.nan)
    return codes.view(hp.shape), scale


class Fp8Grad(torch.Tensor):
    """A gradient of a parameter of ``dtype``; holds ``codes`` (FP8, same shape) and a 0-d FP32 ``scale``.

    In ``fp32`` accumulation mode ``pending`` holds an FP32 sum instead of codes until :meth:`finalize`.
    """

    _codes: torch.Tensor | None
    _scale: torch.Tensor
    _fmt: Format
    _mode: str
    _pending: torch.Tensor | None

    @staticmethod
    def __new__(cls, codes: torch.Tensor | None, scale: torch.Tensor, fmt: Format, dtype: torch.dtype,
                mode: str = "rescale", pending: torch.Tensor | None = None) -> Self:
        ref = codes if codes is not None else pending
        assert ref is not None, "Fp8Grad needs codes or a pending FP32 sum"
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, ref.shape, dtype=dtype, device=ref.device, requires_grad=False
        )

    def __init__(self, codes: torch.Tensor | None, scale: torch.Tensor, fmt: Format, dtype: torch.dtype,
                 mode: str = "rescale", pending: torch.Tensor | None = None) -> None:
        self._codes, self._scale, self._fmt, self._mode, self._pending = codes, scale, fmt, mode, pending

    # ------------------------------------------------------------------------------------------------ accessors
    @property
    def fmt(self) -> Format:
        return self._fmt

    def finalize(self) -> Fp8Grad:
        """Quantize a pending FP32 sum (``fp32`` accumulation mode) into codes; a no-op otherwise. Returns self."""
        if self._pending is not None:
            self._codes, self._scale = encode_fp8(self._pending, self._fmt)
            self._pending = None
        return self

    def codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 codes and the FP32 scale (``hp = codes / scale``) the optimizer reads directly."""
        self.finalize()
        assert self._codes is not None
        return self._codes, self._scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._pending is not None:
            return self._pending.to(dtype)
        assert self._codes is not None
        return dequantize(self._codes, self._scale, dtype)

    def storage_bytes(self) -> int:
        """Bytes this gradient really holds (codes or pending sum, plus the scale)."""
        held = self._pending if self._pending is not None else self._codes
        assert held is not None
        return held.untyped_storage().nbytes() + self._scale.untyped_storage().nbytes()

    def set_from(self, hp: torch.Tensor) -> None:
        """Re-encode this gradient in place from high-precision values (same storage semantics)."""
        if self._pending is not None:
            self._pending = hp.float().clone()
        else:
            self._codes, self._scale = encode_fp8(hp.float(), self._fmt)

    # ------------------------------------------------------------------------------------------------ .data
    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        """A detached alias, as for any tensor (an ``Fp8Grad`` sharing these codes)."""
        return _TENSOR_DATA.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        """``grad.data = value``: adopt ``value``'s *values* (re-encoded to FP8 codes + a fresh scale), never its storage.

        Why not torch's own setter: it rebinds the wrapper's (empty) storage and leaves ``codes``/``scale`` as they
        were, so every read kept returning the old gradient — silently. Re-encoding is right for value-style uses
        (``Module.to()``/``.double()`` with gradients present go through ``.data =``; ``g.data = g.data * 2``). It is
        wrong for *aliasing* uses: DeepSpeed ZeRO rebinds ``grad.data`` to a slice of its flat bucket and later reads
        the reduced bucket back through ``param.grad``, which an FP8 copy cannot see. A ``value`` that is a view into a
        larger buffer is that pattern, so it raises instead of quietly becoming a snapshot.
        """
        if isinstance(value, Fp8Grad):  # an Fp8Grad's storage *is* its codes: share them, as .data would
            new = value
        else:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"Fp8Grad.data = ...: expected a floating-point tensor, got "
                                f"{getattr(value, 'dtype', type(value).__name__)}.")
            nbytes = value.untyped_storage().nbytes()
            if nbytes and nbytes > value.numel() * value.element_size():
                raise RuntimeError(
                    f"Fp8Grad.data = <view of a {nbytes}-byte buffer>: an FP8 weight gradient stores codes + a scale, so "
                    f"it cannot alias a slice of another buffer (DeepSpeed ZeRO's contiguous gradients do this, then "
                    f"read the reduced bucket back through param.grad, which would silently see stale values). Fix: "
                    f"use lowbit_amp.integrations.deepspeed_plugin.initialize (it widens Fp8Grad before ZeRO buckets "
                    f"it), or replace the gradient object (param.grad = tensor) instead of assigning .data, or pass "
                    f"a standalone copy (grad.data = view.clone()) if a one-time copy is what you want.")
            hp = value.detach().float()
            if self._pending is not None:
                new = Fp8Grad(None, torch.ones((), device=hp.device), self._fmt, value.dtype, self._mode,
                              pending=hp.clone())
            else:
                codes, scale = encode_fp8(hp, self._fmt)
                new = Fp8Grad(codes, scale, self._fmt, value.dtype, self._mode)
        # torch's setter with a storage-less wrapper updates the declared shape/dtype/device only
        _TENSOR_DATA.__set__(self, new)
        self._codes, self._scale, self._fmt, self._mode, self._pending = (
            new._codes, new._scale, new._fmt, new._mode, new._pending)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        state = "pending fp32" if self._pending is not None else f"{self._fmt}"
        return f"Fp8Grad({state}, shape={tuple(self.shape)}, dtype={self.dtype}, value={self.dequantize(self.dtype)})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from lowbit_amp.grads.ops import dispatch

        return dispatch(func, args, kwargs or {})


def to_fp8_weight_grad(dw: torch.Tensor, weight: torch.Tensor, cfg: Any) -> Fp8Grad:
    """The weight gradient autograd receives at O2+: ``dw`` (FP32 from the backward GEMM) as an :class:`Fp8Grad`.

    ``cfg`` is the layer's :class:`~lowbit_amp.config.LinearConfig`; ``weight_grad`` picks E4M3/E5M2 and
    ``grad_accumulation`` the accumulation mode.
    """
    mode = cfg.grad_accumulation
    if mode not in ACCUMULATION_MODES:
        raise ValueError(f"linear.grad_accumulation={mode!r} is not one of {list(ACCUMULATION_MODES)}.")
    fmt = get_format(cfg.weight_grad)
    if dw.shape != weight.shape:
        raise ValueError(f"weight gradient shape {tuple(dw.shape)} does not match the weight's {tuple(weight.shape)}.")
    if mode == "fp32":
        return Fp8Grad(None, torch.ones((), device=dw.device), fmt, weight.dtype, mode, pending=dw.float())
    if dw.dtype not in (torch.float32, torch.bfloat16):  # a bf16 GEMM output is encoded as it is (no FP32 copy)
        dw = dw.float()
    codes, scale = encode_fp8(dw, fmt, cfg.weight_grad_rounding)
    return Fp8Grad(codes, scale, fmt, weight.dtype, mode)
