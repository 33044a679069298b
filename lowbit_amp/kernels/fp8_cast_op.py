"""The fused FP8 cast as a ``torch.library`` custom op, so compiled graphs run the same Triton kernel as eager.

Why: without it, under ``torch.compile`` the reference cast ops are traced and Inductor fuses them itself — 1.5x
slower than our kernel on the warm delayed cast of a 16384x4096 operand (0.174 vs 0.115 ms, H100, docs/performance.md),
and that difference was most of the 4096-wide compiled miss (1.40x vs the 1.45x target). An opaque custom op keeps the
kernel in the graph with no graph break.

The op folds the tensor's amax into the state's ``pending_amax`` / ``nonfinite_count`` from inside the kernel, as
:meth:`ScalingState.record` does and as the eager launch does; the schema declares both as mutated (``Tensor(a!)``), so
Dynamo and AOTAutograd see the mutation (functionalised, then re-inplaced by Inductor onto the buffers: no copies).
Until 2026-12-02 the op was functional — it returned this call's amax and count, and two traced ops (max, add) folded
them into the buffers — which left Inductor one or two extra kernels per cast (about 30 per step of the 4096-wide
compiled anchor: each a launch of GPU time on a GPU-bound step; an Inductor CPU compile of two O1 layers shows 7
forward kernels before, 4 after). The values and state updates equal the eager fused path's bit for bit
(tests/kernels/test_fp8_cast_gpu.py; on CPU the compiled plumbing is tested with a reference implementation
registered for the test, tests/nn/test_compile.py).

Registering the op imports nothing heavy (Triton is imported by the CUDA implementation when first called), so this
module is safe on CPU-only installs; the op has no CPU implementation because the dispatcher
(:mod:`lowbit_amp.kernels.dispatch`) only routes CUDA tensors here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit_amp.scaling.state import ScalingState

__all__ = ["set_via_triton_op", "traceable_fused_quantize"]


# A plain ``torch.library.Library`` definition + CUDA kernel + fake, not ``torch.library.custom_op``: the latter wraps
# every call in a Python autograd layer that costs ~20 us of host time per call (CPU measurement, torch 2.13: 25-30 us
# vs 11-12 us per dispatch of a trivial op), and the compiled O1 step calls this op 30 times per step in a forward
# that runs launch-bound after each synchronisation (bench/trace_gaps.py). The op needs no autograd: it is called only
# inside LowBitLinear's autograd.Function, where grad mode is off.
_LIB = torch.library.Library("lowbit_amp", "FRAGMENT")
_LIB.define(
    "fp8_cast(Tensor x, Tensor scale, Tensor scratch, Tensor(a!) pending_amax, Tensor(b!) nonfinite_count, "
    "ScalarType out_dtype, float fmt_max, float target, bool current, bool record, bool want_transpose) "
    "-> (Tensor, Tensor, Tensor)")


def fp8_cast(
    x: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor, pending_amax: torch.Tensor,
    nonfinite_count: torch.Tensor, out_dtype: torch.dtype, fmt_max: float, target: float, current: bool,
    record: bool, want_transpose: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lp, lpᵀ or an empty tensor, scale_out[8])`` (layout: :func:`lowbit_amp.kernels.fp8_cast.launch_cast`);
    with ``record``, ``x``'s amax is folded into ``pending_amax`` and ``nonfinite_count`` in place (see the module
    docstring; untouched without ``record``).

    ``scratch`` is the state's all-zero ``cast_scratch`` words: the one-pass delayed cast counts finished programs
    in it and its last program zeroes it again, so the op leaves it as it found it (declared unmutated). The outputs
    are allocated uninitialised and written whole by the kernel (zero-filling them cost three launches per cast,
    bench/trace_gaps.py, H200, 2026-12-01)."""
    from lowbit_amp.kernels.fp8_cast import launch_cast

    lp, lp_t, scale_out = launch_cast(x, scale, out_dtype, fmt_max, target, current, record, want_transpose,
                                      pending_amax, nonfinite_count, scratch if (record and not current) else None)
    if lp_t is None:
        lp_t = lp.new_empty((0,))
    return lp, lp_t, scale_out


_LIB.impl("fp8_cast", fp8_cast, "CUDA")


# Under torch.compile the same kernels can instead enter the graph as a ``torch.library.triton_op``: Inductor then
# traces the launch (``wrap_triton``) and emits it in its generated code, skipping the dispatcher, this module's
# Python and the launcher per call. Bit-exact (tests/kernels/test_fp8_cast_gpu.py, run zp) but no faster on the
# 4096-wide compiled anchor step, which is GPU-bound (run zp, 5 interleaved rounds: 1.447x compiled bf16 vs 1.450x
# through the dispatcher op), so it is opt-in.
# Set through set_via_triton_op (which registers the op: torch.library.triton_op imports Triton, and importing
# lowbit_amp must not).
VIA_TRITON_OP = False


def set_via_triton_op(on: bool) -> None:
    """Route compiled casts through ``lowbit_amp::fp8_cast_t`` (``on``) or the dispatcher op; registers the
    triton_op on first use. Takes effect for graphs traced afterwards (Dynamo guards on the switch)."""
    global VIA_TRITON_OP
    if on:
        _register_triton_op()
    VIA_TRITON_OP = on


@functools.lru_cache(maxsize=None)
def _register_triton_op() -> None:
    def fp8_cast_t(
        x: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor, pending_amax: torch.Tensor,
        nonfinite_count: torch.Tensor, out_dtype: torch.dtype, fmt_max: float, target: float, current: bool,
        record: bool, want_transpose: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`fp8_cast` as a ``triton_op``: the same kernels, arguments and results. ``scratch`` is declared
        mutated here (the kernel's atomics write it, then zero it again) because Inductor derives a wrapped kernel's
        mutations from its code."""
        from lowbit_amp.kernels.fp8_cast import launch_cast

        lp, lp_t, scale_out = launch_cast(x, scale, out_dtype, fmt_max, target, current, record, want_transpose,
                                          pending_amax, nonfinite_count, scratch, wrapped=True)
        return lp, (lp_t if lp_t is not None else lp.new_empty((0,))), scale_out

    torch.library.triton_op("lowbit_amp::fp8_cast_t", fp8_cast_t,
                            mutates_args={"pending_amax", "nonfinite_count", "scratch"})


@torch.library.register_fake("lowbit_amp::fp8_cast", lib=_LIB)
def _fp8_cast_fake(x, scale, scratch, pending_amax, nonfinite_count, out_dtype, fmt_max, target, current, record,  # type: ignore[no-untyped-def]
                   want_transpose):
    rows, cols = x.shape
    lp = x.new_empty((rows, cols), dtype=out_dtype)
    lp_t = x.new_empty((cols, rows) if want_transpose else (0,), dtype=out_dtype)
    return lp, lp_t, x.new_empty((8,), dtype=torch.float32)


def cast_modes(state: "ScalingState") -> tuple[bool, bool]:
    """``(current, record)`` for a cast with ``state``: scale from this tensor's amax (static never; delayed only
    until its history is warm), and fold the amax into the state (delayed). Shared by both entry points."""
    return not (state.config.algo == "static" or (state.delayed and state._warm)), state.delayed


def cast_results(
    state: "ScalingState", lp: torch.Tensor, lp_t: torch.Tensor | None, scale_out: torch.Tensor, current: bool,
    record: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(lp, lpᵀ, scale, 1/scale, amax or None)`` read off the kernel's ``scale_out`` (layout:
    :func:`lowbit_amp.kernels.fp8_cast.launch_cast`). Shared by both entry points."""
    return lp, lp_t, (scale_out[0] if current else state.scale), scale_out[4], (scale_out[1] if record else None)


def traceable_fused_quantize(
    x2d: torch.Tensor, state: "ScalingState", want_transpose: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`lowbit_amp.kernels.fp8_cast.fused_quantize`, traceable by ``torch.compile``."""
    fmt = state.fmt
    current, record = cast_modes(state)
    op = torch.ops.lowbit_amp.fp8_cast_t if VIA_TRITON_OP else torch.ops.lowbit_amp.fp8_cast
    lp, lp_t, scale_out = op(
        x2d, state.scale, state.cast_scratch, state.pending_amax, state.nonfinite_count, fmt.dtype, fmt.max,
        fmt.max / (2.0 ** state.config.margin), current, record, want_transpose)
    return cast_results(state, lp, lp_t if want_transpose else None, scale_out, current, record)
