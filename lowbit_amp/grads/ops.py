"""The aten ops :class:`~lowbit_amp.grads.fp8_grad.Fp8Grad` implements itself, and the dequantizing fallback.

Only what keeps gradients 1 byte/param through a normal training loop is special-cased:

===============================  ==========================================================================
op                               what happens
===============================  ==========================================================================
``add`` / ``add_`` (two Fp8Grad)  accumulate (AccumulateGrad and autograd's input buffer call these); result Fp8Grad
``mul_``/``div_`` by a scalar      scale-only update, codes untouched (no host sync, no re-rounding)
``_foreach_mul_``/``_foreach_div_`` the same per element (``clip_grad_norm_``'s foreach path)
``zero_`` / ``_foreach_zero_``     codes zeroed in place, scale reset to 1 (clears a NaN marker)
``_foreach_norm``                  norm of the dequantized values, computed in FP32
``detach`` / ``alias`` / ``clone``  an Fp8Grad (shared or copied codes)
``copy_`` into an Fp8Grad          re-encode the source
other mutating ops                compute on dequantized values, re-encode each mutated Fp8Grad (in-place ops,
                                   ``_foreach_*_`` lists, torch.amp's ``_amp_foreach_non_finite_check_and_unscale_``)
anything else                      run on the dequantized tensors (declared dtype); the result is a plain tensor
===============================  ==========================================================================

Views (``view``, ``reshape``, slicing) therefore return plain copies, not views: writing into them does not change the
gradient. That is the one behavioural difference from a dense gradient (documented in docs/optimizer.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from lowbit_amp.grads.fp8_grad import Fp8Grad, encode_fp8

aten = torch.ops.aten


def _is_scalar_like(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, torch.Tensor) and not isinstance(value, Fp8Grad) and value.numel() == 1


def _as_scale_factor(value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(value), device=like.device, dtype=torch.float32)


def _dequant_arg(value: Any) -> Any:
    return value.dequantize(value.dtype) if isinstance(value, Fp8Grad) else value


def _hp32(value: Any) -> Any:
    return value.dequantize(torch.float32) if isinstance(value, Fp8Grad) else value


# ------------------------------------------------------------------------------------------------ accumulation
def _accumulate_into(dst: Fp8Grad, src: Any, alpha: Any = 1) -> Fp8Grad:
    """``dst += alpha * src`` keeping dst an Fp8Grad (rescale: FP32 sum, fresh scale, one re-rounding)."""
    addend = _hp32(src).float()
    if alpha != 1:
        addend = addend * alpha
    if dst._pending is not None:
        dst._pending = dst._pending + addend
    else:
        dst._codes, dst._scale = encode_fp8(dst.dequantize(torch.float32) + addend, dst._fmt)
    return dst


def _add(args: tuple, kwargs: dict) -> Any:
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    if isinstance(a, Fp8Grad) and isinstance(b, Fp8Grad) and a.shape == b.shape:
        out = _clone(a)
        return _accumulate_into(out, b, alpha)
    return _fallback(aten.add.Tensor, args, kwargs)


def _add_(args: tuple, kwargs: dict) -> Any:
    dst, src = args[0], args[1]
    if isinstance(dst, Fp8Grad):
        return _accumulate_into(dst, src, kwargs.get("alpha", 1))
    return _fallback(aten.add_.Tensor, args, kwargs)


# ------------------------------------------------------------------------------------------------ scalar scaling
def _scale_by(grad: Fp8Grad, factor: Any, divide: bool) -> Fp8Grad:
    f = _as_scale_factor(factor, grad._scale)
    if grad._pending is not None:
        grad._pending = grad._pending / f if divide else grad._pending * f
    else:
        # hp = codes / scale, so multiplying hp by f divides the scale by f (codes are not re-rounded).
        grad._scale = grad._scale * f if divide else grad._scale / f
    return grad


def _make_mul_(divide: bool, op: Any) -> Callable[[tuple, dict], Any]:
    def impl(args: tuple, kwargs: dict) -> Any:
        dst, other = args[0], args[1]
        if isinstance(dst, Fp8Grad) and _is_scalar_like(other):
            return _scale_by(dst, other, divide)
        return _fallback(op, args, kwargs)

    return impl


def _make_foreach_mul_(divide: bool) -> Callable[[tuple, dict], Any]:
    def impl(args: tuple, kwargs: dict) -> None:
        tensors, other = args[0], args[1]
        others = other if isinstance(other, (list, tuple)) else [other] * len(tensors)
        for tensor, factor in zip(tensors, others):
            if isinstance(tensor, Fp8Grad) and _is_scalar_like(factor):
                _scale_by(tensor, factor, divide)
            elif divide:
                tensor.div_(factor)
            else:
                tensor.mul_(factor)

    return impl


# ------------------------------------------------------------------------------------------------ misc
def _zero_(args: tuple, kwargs: dict) -> Fp8Grad:
    grad: Fp8Grad = args[0]
    if grad._pending is not None:
        grad._pending.zero_()
    else:
        assert grad._codes is not None
        grad._codes.zero_()
        grad._scale = torch.ones_like(grad._scale)
    return grad


def _foreach_zero_(args: tuple, kwargs: dict) -> None:
    for tensor in args[0]:
        tensor.zero_()


def _foreach_norm(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    tensors, ord_ = args[0], (args[1] if len(args) > 1 else kwargs.get("ord", 2))
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    out = []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(_hp32(tensor).float(), ord_)
        out.append(norm.to(dtype or tensor.dtype))
    return out


def _clone(grad: Fp8Grad) -> Fp8Grad:
    codes = grad._codes.clone() if grad._codes is not None else None
    pending = grad._pending.clone() if grad._pending is not None else None
    return Fp8Grad(codes, grad._scale.clone(), grad._fmt, grad.dtype, grad._mode, pending)


def _detach(args: tuple, kwargs: dict) -> Fp8Grad:
    grad: Fp8Grad = args[0]
    return Fp8Grad(grad._codes, grad._scale, grad._fmt, grad.dtype, grad._mode, grad._pending)


def _copy_(args: tuple, kwargs: dict) -> Any:
    dst, src = args[0], args[1]
    if isinstance(dst, Fp8Grad):
        dst.set_from(_hp32(src))
        return dst
    return dst.copy_(_dequant_arg(src))


def _fallback(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on dequantized tensors; an in-place op on an Fp8Grad re-encodes its result into it."""
    plain_args = tree_map(_dequant_arg, args)
    plain_kwargs = tree_map(_dequant_arg, kwargs)
    if "out" in kwargs and isinstance(kwargs["out"], Fp8Grad):
        raise NotImplementedError(f"{func} with out= an Fp8Grad is not supported; use the out-of-place form.")
    result = func(*plain_args, **plain_kwargs)
    # Write back every argument the op mutates (self of `x.op_()`, each list element of `_foreach_*_` ops, the grads
    # of torch.amp's `_amp_foreach_non_finite_check_and_unscale_`), re-encoding the ones that are Fp8Grads.
    for index, schema_arg in enumerate(func._schema.arguments[: len(args)]):
        if schema_arg.alias_info is None or not schema_arg.alias_info.is_write:
            continue
        original, plain = args[index], plain_args[index]
        pairs = zip(original, plain) if isinstance(original, (list, tuple)) else [(original, plain)]
        for grad, value in pairs:
            if isinstance(grad, Fp8Grad):
                grad.set_from(value)
    first = func._schema.arguments[0] if func._schema.arguments else None
    if isinstance(args[0], Fp8Grad) and first is not None and first.alias_info is not None and first.alias_info.is_write:
        return args[0]
    return result


_OPS: dict[Any, Callable[[tuple, dict], Any]] = {
    aten.add.Tensor: _add,
    aten.add_.Tensor: _add_,
    aten.mul_.Tensor: _make_mul_(False, aten.mul_.Tensor),
    aten.mul_.Scalar: _make_mul_(False, aten.mul_.Scalar),
    aten.div_.Tensor: _make_mul_(True, aten.div_.Tensor),
    aten.div_.Scalar: _make_mul_(True, aten.div_.Scalar),
    aten._foreach_mul_.Scalar: _make_foreach_mul_(False),
    aten._foreach_mul_.Tensor: _make_foreach_mul_(False),
    aten._foreach_mul_.List: _make_foreach_mul_(False),
    aten._foreach_mul_.ScalarList: _make_foreach_mul_(False),
    aten._foreach_div_.Scalar: _make_foreach_mul_(True),
    aten._foreach_div_.Tensor: _make_foreach_mul_(True),
    aten._foreach_div_.List: _make_foreach_mul_(True),
    aten._foreach_div_.ScalarList: _make_foreach_mul_(True),
    aten.zero_.default: _zero_,
    aten._foreach_zero_.default: _foreach_zero_,
    aten._foreach_norm.Scalar: _foreach_norm,
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: lambda args, kwargs: _clone(args[0]),
    aten.copy_.default: _copy_,
}


def dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    impl = _OPS.get(func)
    if impl is not None:
        return impl(args, kwargs)
    return _fallback(func, args, kwargs)
