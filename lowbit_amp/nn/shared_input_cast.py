"""Layers fed the same tensor share its FP8 cast: SwiGLU's ``w1(h)`` and ``w3(h)``, separate q/k/v projections.

Why: each such layer used to cast the same input itself — one more read of the input and write of its FP8 copy and
transpose per sibling (an 8192x4096 bf16 input: 0.047 ms on the H200, bench/bench_cast_sweep.py run zo; two per step
of the 4096-wide anchor, whose SwiGLU MLPs feed ``h`` to w1 and w3) and a second FP8 transpose of it held for backward.

How: one slot holds the last input cast — the input tensor object, its version counter, the cast's key and results.
A layer whose input *is* that tensor (the same object, not modified in place since), whose input state has the same
format, scaling config, rounding and warmth, and which needs nothing the cast did not make (the transpose), takes the
cast and records its amax into its own state, so its history, scale and warm flag evolve exactly as if it had cast
itself. It casts with the first layer's scale: the same value while both histories are the same, as they are for layers
always fed the same tensor, and an equally valid tensorwise scale of the same tensor otherwise. The slot holds strong
references, so a recycled object cannot pass for the input. It is emptied by forward hooks (``always_call``) on the model
``amp.initialize`` converted and on every module that calls its layers, so nothing it holds outlives the block that
made it; layers that ``amp.initialize`` did not set up (``share_input_cast`` off, or built by hand) never use it.

Under ``torch.compile`` Dynamo resolves the ``is`` test between traced tensors while tracing and replays the slot's
updates as Python side effects, so compiled graphs share the cast too, with no graph break
(tests/nn/test_shared_input_cast.py). Version counters are not readable there; see :func:`_unchanged_while_tracing`
for what stands in for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit_amp.quant.operand import OperandCast, cast_operand

if TYPE_CHECKING:
    from lowbit_amp.scaling.state import ScalingState

__all__ = ["attach", "cast_input", "release"]

# At most one entry: (input tensor, its _version, key, OperandCast). A list, not an attribute, so Dynamo tracks it.
_SLOT: list = []


def _key(state: ScalingState) -> tuple:
    return (state.fmt, state.config, state.rounding, state._warm)


def cast_input(x: torch.Tensor, state: ScalingState, want_transpose: bool, use_kernel: bool,
               share: bool) -> OperandCast:
    """The FP8 cast of layer input ``x`` (any leading dims) with ``state``: the slot's when ``share`` and it matches
    (then ``state`` records its amax), else a fresh one (kept in the slot when ``share``). No grad is recorded."""
    key = _key(state)
    compiling = torch.compiler.is_compiling()
    # Inference tensors (torch.inference_mode) have no version counter, so an in-place change could not be seen: no
    # sharing for them.
    share = share and (compiling or not x.is_inference())
    if share:
        for entry in _SLOT:
            if entry[0] is x and entry[2] == key and (entry[3].lp_t is not None or not want_transpose) and (
                    _unchanged_while_tracing(entry[3]) if compiling else entry[1] == x._version):
                cast = entry[3]
                if cast.amax is not None:
                    state.record(cast.amax)
                return cast
    with torch.no_grad():
        cast = cast_operand(x.detach().reshape(-1, x.shape[-1]), state, want_transpose, use_kernel)
    if share:
        _SLOT.clear()
        _SLOT.append((x, None if compiling else x._version, key, cast))
    return cast


def _unchanged_while_tracing(cast: OperandCast) -> bool:
    """Whether a traced input can be trusted not to have changed in place since ``cast`` was made of it.

    Dynamo cannot read an intermediate tensor's version counter while tracing (it becomes a data-dependent symbol),
    so compiled graphs decide from what the first layer needed instead: a layer whose weight takes a gradient (it
    made ``xᵀ``) under grad mode is one for which ``nn.Linear`` saves the input, so an in-place change of it before
    the sibling would fail plain PyTorch's backward ("modified by an inplace operation") — such code does not train
    in high precision either. With grad off, or a frozen first layer, that guarantee is absent: no sharing."""
    return cast.lp_t is not None and torch.is_grad_enabled()


def release() -> None:
    """Drop the slot's references (when the converted model, or a module calling its layers, returns)."""
    _SLOT.clear()


def _release_hook(_module: nn.Module, _args: object, _output: object) -> None:
    release()


def attach(model: nn.Module) -> None:
    """Let ``model``'s converted layers share input casts: they use the slot, which forward hooks empty after every
    forward (also one that raises) of ``model`` and of each module that calls such layers directly.

    Why the parents too: siblings are called from their parent's forward (an MLP's w1/w3, an attention's q/k/v), and
    emptying the slot when that returns means no cast outlives the block that made it. With the model's hook alone,
    every block started with the previous block's last cast in the slot (tests/nn/test_shared_input_cast.py): memory
    held across blocks and, for blocks compiled one by one, a tensor their graphs had to take in."""
    from lowbit_amp.nn.linear import LowBitLinear

    parents = []
    for module in model.modules():
        children = [c for c in module.children() if isinstance(c, LowBitLinear) and c.lb_config.share_input_cast]
        for child in children:
            child._share_input_cast = True
        if children:
            parents.append(module)
    if not parents:
        return
    for module in parents if model in parents else [*parents, model]:
        module.register_forward_hook(_release_hook, always_call=True)
