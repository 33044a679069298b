"""FP8 weight all-gather for FSDP2 (``comm.weight_all_gather='fp8'``, part of O3): 1 byte per parameter on the wire.

FSDP2 lets the sharded parameter decide what is all-gathered: if the *local* tensor of the sharded ``DTensor`` has
``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``, FSDP2 gathers whatever the first returns and hands the outputs to
the second, which builds the unsharded parameter the module computes with (PyTorch's ``_fsdp_param.py`` documents the
hooks; torchao's float8 training uses the same extension point). Two wrapper subclasses implement it:

* :class:`Fp8AllGatherWeight` wraps each ``LowBitLinear`` weight *before* ``fully_shard`` (so its shard is one too).
  It is the master weight in the parameter's dtype and behaves as a plain tensor for everything else — the optimizer
  (8-bit or torch's), ``state_dict``, ``load_state_dict``, ``DTensor`` ops. Its ``fsdp_pre_all_gather`` casts the shard
  to FP8 with a scale every rank agrees on, and returns the codes (as ``uint8``, so gloo and NCCL move raw bytes).
* :class:`Fp8GatheredWeight` is the unsharded parameter: the gathered FP8 codes plus that one scale, declared in the
  parameter's dtype so autograd and FSDP's reduce-scatter treat its gradient like any other. ``LowBitLinear`` reads the
  codes and scale directly (:attr:`Fp8GatheredWeight.lowbit_fp8_weight`), so the forward GEMM and the backward input-
  gradient GEMM use exactly the gathered bytes — no second cast.

Why one scale per tensor, agreed before the gather (not per-shard scales travelling with the payload): the GEMM takes
one tensorwise scale, and re-scaling per-shard codes to a common scale would round them twice. One MAX all-reduce of
the shard's amax (4 bytes + a 4-byte non-finite flag per weight) gives every rank the amax of the *full* weight, so
the scale and every gathered byte equal the single-device cast of the full weight — bit for bit
(``tests/distributed/test_fsdp_fp8_allgather.py``). Delayed/static weight scaling needs no all-reduce for the scale
(their scales are already synchronised buffers) but the amax is still reduced so the recorded history is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["GATHER_STATS", "Fp8AllGatherWeight", "Fp8GatheredWeight", "wrap_fp8_all_gather_weights"]

aten = torch.ops.aten

# Ops whose result is (a view of / a copy of) the weight itself, so it must stay a weight (FSDP2 pads, slices and
# views the parameter while sharding it; ``nn.Parameter`` detaches it; ``.to()``/``.clone()`` copy it). Any other op
# returns a plain tensor: optimizer moments made by ``zeros_like`` are state, not weights.
_PRESERVE = {
    aten.view.default, aten._unsafe_view.default, aten.as_strided.default, aten.slice.Tensor, aten.split.Tensor,
    aten.split_with_sizes.default, aten.clone.default, aten.detach.default, aten.alias.default, aten.new_zeros.default,
    aten.new_empty.default, aten.empty_like.default, aten._to_copy.default, aten._pin_memory.default,
}


@dataclass
class GatherStats:
    """What the FP8 pre-all-gather hooks put on the wire since :meth:`reset` (counted at the source, per rank)."""

    payload_bytes: int = 0  # bytes this rank contributed to all-gathers (FP8 codes, incl. padding rows)
    params: int = 0  # elements of the real (unpadded) shards those bytes carry
    amax_allreduce_bytes: int = 0  # bytes this rank contributed to the scale-agreement all-reduces
    gathers: int = 0

    def reset(self) -> None:
        self.payload_bytes = self.params = self.amax_allreduce_bytes = self.gathers = 0


GATHER_STATS = GatherStats()


class Fp8AllGatherWeight(torch.Tensor):
    """A ``LowBitLinear`` weight (the master, in its own dtype) that FSDP2 all-gathers in FP8. See the module docstring."""

    _data: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> "Fp8AllGatherWeight":
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=data.device, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor) -> None:
        self._data = data

    @property
    def lowbit_plain_data(self) -> torch.Tensor:
        """The plain tensor holding the values (the 8-bit optimizer updates it in place)."""
        return self._data

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Fp8AllGatherWeight({self._data!r})"

    def __reduce_ex__(self, protocol: Any) -> Any:  # torch.save of a sharded state_dict
        return (Fp8AllGatherWeight, (self._data,))

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["_data"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: None, outer_size: Any, outer_stride: Any
                             ) -> "Fp8AllGatherWeight":
        return Fp8AllGatherWeight(inner["_data"])

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        unwrap = lambda t: t._data if isinstance(t, cls) else t  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func in _PRESERVE:
            return tree_map(lambda t: cls(t) if isinstance(t, torch.Tensor) else t, out)
        if func._schema.is_mutable and args and isinstance(args[0], cls) and isinstance(out, torch.Tensor):
            return args[0]  # in-place op (copy_, add_, ...): it wrote into our data; hand back the weight itself
        return out

    # ------------------------------------------------------------------------------------------------ FSDP2 hooks
    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: nn.Module,
                            mp_policy: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Cast this rank's shard to FP8 with the scale of the full weight; return the codes as bytes.

        Collective: one MAX all-reduce over ``mesh`` of ``[amax, non-finite flag]`` (every rank calls this hook for
        the same parameters in the same order, inside FSDP2's all-gather). The amax is taken from the master weight in
        its own dtype — not after ``MixedPrecisionPolicy.param_dtype`` rounding — so the codes equal the single-device
        cast of the full weight.
        """
        from lowbit_amp.quant.cast import quantize

        state = module.weight_scaling
        data = self._data
        local_amax = data.abs().amax().float() if data.numel() else torch.zeros((), device=data.device)
        finite = torch.isfinite(local_amax)
        pair = torch.stack([torch.where(finite, local_amax, torch.zeros_like(local_amax)), (~finite).float()])
        group = mesh.get_group()
        # gloo's MAX with a NaN operand depends on operand order; reducing a flag keeps ranks in agreement.
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=group)
        amax = torch.where(pair[1] > 0, torch.full_like(pair[0], float("inf")), pair[0])
        scale = state.scale_for(amax).detach().clone().float()
        state.record(amax)
        codes = quantize(data, scale, state.fmt, state.granularity)
        rows = -(-outer_size[0] // mesh.size())  # FSDP2 gathers equal-sized (padded) shards along dim 0
        if codes.shape[0] != rows:
            codes = F.pad(codes.view(torch.uint8), (0, 0, 0, rows - codes.shape[0])).view(codes.dtype)
        payload = codes.view(torch.uint8)
        GATHER_STATS.payload_bytes += payload.numel()
        GATHER_STATS.params += data.numel()
        GATHER_STATS.amax_allreduce_bytes += pair.numel() * pair.element_size()
        GATHER_STATS.gathers += 1
        return (payload,), (scale, codes.dtype)

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: Any,
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """Wrap the gathered bytes as :class:`Fp8GatheredWeight` (FSDP2 trims padding rows with ``as_strided``).

        From the second gather on FSDP2 reuses its output buffer and passes the existing unsharded parameter as
        ``out``: only the scale is refreshed (in place, so tensors saved for backward see it)."""
        (data,) = all_gather_outputs
        scale, fp8_dtype = metadata
        codes = data.view(fp8_dtype)
        if out is not None:
            if not isinstance(out, Fp8GatheredWeight):
                raise TypeError(f"FSDP2 passed an unsharded parameter of type {type(out).__name__} to the FP8 "
                                "all-gather; expected Fp8GatheredWeight (was the weight re-wrapped after fully_shard?)")
            if out._codes.untyped_storage().data_ptr() != codes.untyped_storage().data_ptr():
                raise RuntimeError("FSDP2 re-gathered the FP8 weight into a new buffer; the unsharded parameter "
                                   "would keep stale codes. This torch version changed FSDP2's buffer reuse.")
            # The forward saved this scale for backward; backward's re-gather writes the same value (the weight did
            # not change in between), so keep its version counter as FSDP2 does for the gathered codes.
            with torch.autograd._unsafe_preserve_version_counter(out._scale):
                out._scale.copy_(scale)
            return None
        return Fp8GatheredWeight(codes, scale, param_dtype), (data,)


class Fp8GatheredWeight(torch.Tensor):
    """The unsharded weight after an FP8 all-gather: E4M3 ``codes`` and a 0-d FP32 ``scale`` (``hp ≈ codes/scale``),
    declared in the parameter's dtype. ``LowBitLinear`` uses :attr:`lowbit_fp8_weight` directly; any other op sees the
    dequantized values; in-place ops are refused (update the sharded parameter instead)."""

    _codes: torch.Tensor
    _scale: torch.Tensor

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> "Fp8GatheredWeight":
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, codes.shape, strides=codes.stride(), storage_offset=codes.storage_offset(), dtype=dtype,
            device=codes.device, requires_grad=False)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self._codes, self._scale = codes, scale

    @property
    def lowbit_fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scale)`` as ``LowBitLinear.quantized_weight`` returns them."""
        return self._codes, self._scale

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Fp8GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, fp8={self._codes.dtype})"

    def __tensor_flatten__(self) -> tuple[list[str], torch.dtype]:
        return ["_codes", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], dtype: torch.dtype, outer_size: Any, outer_stride: Any
                             ) -> "Fp8GatheredWeight":
        return Fp8GatheredWeight(inner["_codes"], inner["_scale"], dtype)

    def dequantize(self) -> torch.Tensor:
        from lowbit_amp.quant.cast import dequantize

        return dequantize(self._codes, self._scale, self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (aten.as_strided.default, aten.view.default, aten.detach.default, aten.alias.default):
            self = args[0]
            return cls(func(self._codes, *args[1:], **kwargs), self._scale, self.dtype)  # same scale object
        if func._schema.is_mutable:
            raise RuntimeError(f"{func} would modify an FP8 all-gathered weight; FSDP2 discards it after use. Modify "
                               "the sharded parameter (model.parameters() outside forward/backward) instead.")
        return func(*tree_map(lambda t: t.dequantize() if isinstance(t, cls) else t, args),
                    **tree_map(lambda t: t.dequantize() if isinstance(t, cls) else t, kwargs))


def wrap_fp8_all_gather_weights(module: nn.Module) -> int:
    """Turn every FP8 ``LowBitLinear`` weight under ``module`` not yet sharded into an :class:`Fp8AllGatherWeight`
    Parameter (call before ``fully_shard``; the layer's other references are the module attribute only). Returns how
    many were wrapped. Raises for what the FP8 all-gather cannot do instead of gathering silently in high precision."""
    from lowbit_amp.nn.linear import LowBitLinear

    counts: dict[int, int] = {}
    for _, param in module.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    wrapped = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, LowBitLinear) or layer.lb_config.compute != "fp8":
            continue
        weight = layer.weight
        if hasattr(weight, "device_mesh") or isinstance(weight, Fp8AllGatherWeight):
            continue  # already sharded by an inner fully_shard call, or already wrapped
        if not layer.weight_scaling.granularity.is_tensorwise:
            raise ValueError(
                f"comm.weight_all_gather='fp8' needs tensorwise weight scaling, but {name or 'the layer'} uses "
                f"granularity {layer.lb_config.weight.scaling.granularity!r}. Set linear.weight.scaling.granularity="
                "'tensor' or comm.weight_all_gather='hp'.")
        if counts.get(id(weight), 0) > 1:
            raise ValueError(
                f"{name}.weight is shared with another module (tied weights); the FP8 all-gather would untie it. Set "
                "comm.weight_all_gather='hp' or exclude the layer from conversion.")
        layer.weight = nn.Parameter(Fp8AllGatherWeight(weight.detach()), requires_grad=weight.requires_grad)
        layer._weight_cache = None
        wrapped += 1
    return wrapped
