"""``LowBitLinear``: a drop-in ``nn.Linear`` whose three GEMMs run in FP8 or INT8 (or high precision at O0).

It *is* an ``nn.Linear`` (same ``weight``/``bias`` Parameter objects after conversion, so the user's optimizer and
state_dict keys keep working) plus one :class:`~lowbit_amp.scaling.ScalingState` per FP8 operand. Which GEMM path runs
is ``lb_config.compute``: ``hp`` (``F.linear``, the O0 baseline through the same module), ``fp8``
(:mod:`lowbit_amp.nn.fp8_function`) or ``int8`` (:mod:`lowbit_amp.nn.int8_function`).

The weight is cast once per optimizer step, not once per micro-batch: the FP8 copy is cached under the weight's
version counter, which every in-place update (optimizer step, ``load_state_dict``) bumps. Writes that bypass it (through
``weight.data``, DeepSpeed ZeRO, FSDP2) must call :meth:`LowBitLinear.invalidate_weight_cache`. ``weight_cache: none``
trades that cache for memory: W is cast per forward and Wᵀ re-cast in backward (:meth:`LowBitLinear.recast_weight_t`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit_amp.config import LinearConfig
from lowbit_amp.quant.cast import quantize
from lowbit_amp.quant.operand import quantize_operand_t
from lowbit_amp.scaling.state import ScalingState

__all__ = ["LowBitLinear", "invalidate_weight_caches"]


class LowBitLinear(nn.Linear):
    """See the module docstring. Build one from an existing layer with :meth:`from_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,  # type: ignore[no-untyped-def]
                 *, config: LinearConfig | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(config or LinearConfig())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LinearConfig) -> "LowBitLinear":
        """Wrap ``linear``'s own Parameters (no copy), so optimizers holding them keep working."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._setup(config)
        return layer

    def _setup(self, config: LinearConfig) -> None:
        self.lb_config = config
        self._weight_cache: tuple | None = None
        self._share_input_cast = False  # set by amp.initialize (lowbit_amp/nn/shared_input_cast.py)
        device = self.weight.device
        if config.compute == "fp8":
            self.input_scaling = ScalingState(config.input.scaling, config.input.format, config.input.rounding).to(device)
            self.weight_scaling = ScalingState(config.weight.scaling, config.weight.format,
                                               config.weight.rounding).to(device)
            self.grad_output_scaling = ScalingState(config.grad_output.scaling, config.grad_output.format,
                                                    config.grad_output.rounding).to(device)
        elif config.compute == "int8":
            self.register_buffer("fallback_fraction", torch.zeros((), device=device), persistent=False)

    @property
    def tensorwise(self) -> bool:
        """Both FP8 operands of the forward GEMM scaled per tensor: the backward GEMMs then read plain transposes of
        the forward's FP8 x and W (made in the same cast), not re-quantized copies."""
        return self.input_scaling.granularity.is_tensorwise and self.weight_scaling.granularity.is_tensorwise

    # ------------------------------------------------------------------------------------------------ weight cast
    def quantized_weight(self, with_transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_lp, w_scale)``, cast at most once per weight version (i.e. once per optimizer step).

        ``with_transpose``: also make the FP8 ``Wᵀ`` the input-grad GEMM reads, in the same fused pass on CUDA
        (lowbit_amp/kernels); the cache then also holds ``1/w_scale`` (:meth:`quantized_weight_scale_inv`).
        """
        gathered = getattr(self.weight, "lowbit_fp8_weight", None)
        if gathered is not None:  # FSDP2 all-gathered it in FP8 already (lowbit_amp/distributed/fsdp_fp8_weight.py)
            return gathered
        key = (self.weight._version, self.weight.data_ptr())
        cache = self._weight_cache
        if cache is None or cache[0] != key or (with_transpose and cache[3] is None):
            with torch.no_grad():
                w_lp, w_t, w_scale, w_scale_inv = quantize_operand_t(
                    self.weight.detach(), self.weight_scaling, with_transpose, self.lb_config.fused_cast)
            self._weight_cache = (key, w_lp, w_scale, w_t, w_scale_inv)
        return self._weight_cache[1], self._weight_cache[2]

    def invalidate_weight_cache(self) -> None:
        """Drop the cached low-bit weight so the next forward casts ``weight`` afresh.

        Why this exists: the cache is keyed on ``(weight._version, weight.data_ptr())``, which every in-place update of
        the Parameter itself bumps (``optimizer.step()``, ``load_state_dict``, ``with torch.no_grad(): w.add_(...)``).
        Writes that bypass the Parameter's version counter are invisible to that key, and the layer would keep running
        on the cast of the old weight. Call this after any of them:

        * writes through ``weight.data`` (``w.data.copy_(new)``: ``.data`` is an alias with its own version counter);
        * ``weight.data = t`` rebinding onto storage that may sit at a reused address;
        * engines that update parameters behind the module's back — DeepSpeed ZeRO (steps flat partitions and copies
          back through ``.data``) and FSDP2 (re-gathers shards into the same unsharded storage); lowbit_amp's DeepSpeed
          plugin and ``fully_shard_lowbit`` already call it for you.

        Cheap: it only drops a reference; the next forward pays one cast. For a whole model use
        :func:`lowbit_amp.nn.invalidate_weight_caches`.
        """
        self._weight_cache = None

    def recast_weight_t(self, weight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        """FP8 ``Wᵀ`` (contiguous) cast from the high-precision ``weight`` with forward's scale ``w_scale``, for
        ``weight_cache: none``: the cast is elementwise with one scale, so these are exactly the transposed codes of
        forward's ``W`` (tested) while nothing FP8 was held in between. Reads ``weight`` through its transpose view in
        the fused kernel on CUDA (no bf16 transpose copy); the reference ops elsewhere. Records nothing: forward did."""
        fmt = self.weight_scaling.fmt
        with torch.no_grad():
            w_t = weight.detach().t()
            from lowbit_amp.kernels.dispatch import fused_cast_unavailable

            if fused_cast_unavailable(w_t, self.weight_scaling, enabled=self.lb_config.fused_cast) is None:
                from lowbit_amp.kernels.fp8_cast import launch_cast

                lp, _, _ = launch_cast(w_t, w_scale.reshape(()).float(), fmt.dtype, fmt.max, fmt.max, current=False,
                                       record=False, want_transpose=False, pending=None, nonfinite=None, scratch=None)
                return lp
            return quantize(w_t.contiguous(), w_scale, fmt, "tensor")

    def quantized_weight_scale_inv(self, w_lp: torch.Tensor) -> torch.Tensor | None:
        """``1/w_scale`` of the cached cast ``w_lp`` when the fused kernel wrote it, else None."""
        cache = self._weight_cache
        return cache[4] if cache is not None and cache[1] is w_lp and len(cache) > 4 else None

    def quantized_weight_t(self, w_lp: torch.Tensor) -> torch.Tensor:
        """Contiguous transpose of the cached FP8 weight (the input-grad GEMM's operand), made once per version."""
        cache = self._weight_cache
        if cache is not None and cache[1] is w_lp:
            if cache[3] is None:
                self._weight_cache = cache = (cache[0], cache[1], cache[2], w_lp.t().contiguous(), *cache[4:])
            return cache[3]
        return w_lp.t().contiguous()

    def _weight_grad_output(self, dw: torch.Tensor) -> torch.Tensor:
        """What autograd receives as the weight gradient: model dtype (O1) or FP8 with a scale (O2+)."""
        if self.lb_config.weight_grad == "hp":
            return dw.to(self.weight.dtype)
        from lowbit_amp.grads.fp8_grad import to_fp8_weight_grad

        return to_fp8_weight_grad(dw, self.weight, self.lb_config)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.lb_config.compute
        if compute == "hp":
            return F.linear(x, self.weight, self.bias)
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            if compute == "fp8":
                from lowbit_amp.nn.fp8_function import Fp8LinearFunction
                from lowbit_amp.nn.shared_input_cast import cast_input

                # The input cast runs here, outside the autograd.Function, so that a sibling fed the same tensor can
                # share it (shared_input_cast.py; Dynamo cannot trace that slot's side effects inside a Function).
                # Tensorwise: the cast also makes the xᵀ the weight-gradient GEMM reads.
                want_t = self.tensorwise and self.weight.requires_grad and torch.is_grad_enabled()
                x_lp, x_t_lp, x_scale, x_scale_inv, _ = cast_input(
                    x, self.input_scaling, want_t, self.lb_config.fused_cast, self._share_input_cast)
                return Fp8LinearFunction.apply(x, self.weight, self.bias, self, out_dtype, x_lp, x_t_lp, x_scale,
                                               x_scale_inv)
            from lowbit_amp.nn.int8_function import Int8LinearFunction

            return Int8LinearFunction.apply(x.to(out_dtype), self.weight, self.bias, self)

    def extra_repr(self) -> str:
        cfg = self.lb_config
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if cfg.compute == "fp8":
            text += (f", fp8 i:{self.input_scaling.extra_repr()},w:{self.weight_scaling.extra_repr()},"
                     f"go:{self.grad_output_scaling.extra_repr()}")
        elif cfg.compute == "int8":
            i8 = cfg.int8
            text += f", int8 i:{i8.act_block},w:{i8.weight_block},fallback:{i8.fallback_mode if i8.fallback else 'off'}"
            if i8.fallback and hasattr(self, "fallback_fraction"):  # last forward's fraction (a host sync: repr only)
                text += f"@{i8.fallback_threshold:g}x,last:{float(self.fallback_fraction):.3f}"
        else:
            text += ", hp"
        if cfg.weight_grad != "hp":
            text += f", wgrad:{cfg.weight_grad}"
        return text


def invalidate_weight_caches(model: nn.Module) -> int:
    """Call :meth:`LowBitLinear.invalidate_weight_cache` on every ``LowBitLinear`` in ``model``; returns how many.

    Use it after updating a model's weights in a way that bypasses the Parameters' version counters (see that
    method), e.g. after ``model.weight.data.copy_(...)`` loops or a custom parameter-server pull.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, LowBitLinear):
            module.invalidate_weight_cache()
            count += 1
    return count
