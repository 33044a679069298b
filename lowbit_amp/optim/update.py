"""The per-parameter update math (FP32), written once as plain torch and compiled on GPU.

One function per rule (Adam/AdamW, SGD with momentum) takes a parameter's padded ``(blocks, block_size)`` views of the
gradient, its stored state *parts* and its master weights, and writes all of them in place. Every input that changes
between steps — step counter, learning rate, betas, the finite flag — is a tensor, so ``torch.compile`` compiles each
:class:`UpdateSpec` once (``dynamic=True`` covers all parameter sizes) and nothing in the step syncs with the host:

* decode (dequantize grad, m, v, master) → FP32 math → encode (re-quantize m, v, write master and parameter);
* a non-finite gradient anywhere in the step (``ok`` is False) keeps every stored byte as it was: the new parts are
  selected with ``torch.where(ok, new, old)`` after encoding, so nothing is re-rounded on a skipped step.

The math mirrors ``torch.optim.AdamW``/``Adam``/``SGD`` (same operation order), which is what lets the FP32-state
configuration track them to ~1e-6 (tests/optim/test_lowbit_adamw.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit_amp.optim.master import MasterWeights
from lowbit_amp.optim.state_codec import StateCodec
from lowbit_amp.quant.cast import dequantize

__all__ = ["UpdateSpec", "adam_update", "compiled_update", "sgd_update"]

Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class UpdateSpec:
    """Everything static about one parameter's update (the compile cache key)."""

    rule: str  # "adam" | "sgd"
    exp_avg: StateCodec | None
    exp_avg_sq: StateCodec | None
    master: MasterWeights
    param_dtype: torch.dtype
    block_size: int
    decoupled: bool = True
    maximize: bool = False
    nesterov: bool = False


def _blocks(flat: torch.Tensor, blocks: int, block_size: int) -> torch.Tensor:
    return F.pad(flat, (0, blocks * block_size - flat.numel())).view(blocks, block_size)


def _commit(parts: Parts, new: Parts, ok: torch.Tensor) -> None:
    for key, old in parts.items():
        fresh = new[key].to(old.dtype)
        if old.element_size() == 1:  # where() on float8 is not implemented everywhere; select the raw bytes
            old.view(torch.uint8).copy_(torch.where(ok, fresh.view(torch.uint8), old.view(torch.uint8)))
        else:
            old.copy_(torch.where(ok, fresh, old))


def _read(spec: UpdateSpec, param: torch.Tensor, grad_codes: torch.Tensor, grad_scale: torch.Tensor,
          master: Parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    flat = param.view(-1)
    blocks = -(-flat.numel() // spec.block_size)
    param_blocks = _blocks(flat, blocks, spec.block_size)
    g = _blocks(dequantize(grad_codes.reshape(-1), grad_scale, torch.float32), blocks, spec.block_size)
    if spec.maximize:
        g = -g
    w = spec.master.read(master, param_blocks)
    return param_blocks, g, w, flat.numel()


def _write(spec: UpdateSpec, param: torch.Tensor, w_new: torch.Tensor, master: Parts, step: torch.Tensor,
           salt: torch.Tensor, ok: torch.Tensor, numel: int) -> None:
    new_master, new_param = spec.master.write(w_new, spec.param_dtype, step, salt)
    _commit(master, new_master, ok)
    flat = param.view(-1)
    flat.copy_(torch.where(ok, new_param.reshape(-1)[:numel], flat))


def adam_update(spec: UpdateSpec, param: torch.Tensor, grad_codes: torch.Tensor, grad_scale: torch.Tensor,
                exp_avg: Parts, exp_avg_sq: Parts, master: Parts, step: torch.Tensor, salt: torch.Tensor,
                hyper: torch.Tensor, ok: torch.Tensor) -> None:
    """``hyper = [lr, beta1, beta2, eps, weight_decay]`` (FP32); ``step`` (FP32, 0-d) counts taken steps."""
    assert spec.exp_avg is not None and spec.exp_avg_sq is not None
    lr, beta1, beta2, eps, weight_decay = hyper.unbind()
    _, g, w, numel = _read(spec, param, grad_codes, grad_scale, master)
    new_step = step + 1
    if spec.decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    m = torch.lerp(spec.exp_avg.decode(exp_avg), g, 1 - beta1)
    v = spec.exp_avg_sq.decode(exp_avg_sq) * beta2 + (1 - beta2) * g * g
    bias_correction1 = 1 - torch.pow(beta1, new_step)
    bias_correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, new_step))
    denom = v.sqrt() / bias_correction2_sqrt + eps
    w = w - (lr / bias_correction1) * (m / denom)
    _commit(exp_avg, spec.exp_avg.encode(m), ok)
    _commit(exp_avg_sq, spec.exp_avg_sq.encode(v), ok)
    _write(spec, param, w, master, new_step, salt, ok, numel)
    step.copy_(torch.where(ok, new_step, step))


def sgd_update(spec: UpdateSpec, param: torch.Tensor, grad_codes: torch.Tensor, grad_scale: torch.Tensor,
               momentum_buffer: Parts, unused: Parts, master: Parts, step: torch.Tensor, salt: torch.Tensor,
               hyper: torch.Tensor, ok: torch.Tensor) -> None:
    """``hyper = [lr, momentum, dampening, weight_decay, 0]``; torch's first step copies the gradient into the buffer."""
    lr, momentum, dampening, weight_decay, _ = hyper.unbind()
    _, g, w, numel = _read(spec, param, grad_codes, grad_scale, master)
    new_step = step + 1
    g = g + weight_decay * w
    if spec.exp_avg is None:  # momentum == 0: torch keeps no buffer and steps along the gradient
        direction = g
    else:
        buf = torch.where(step == 0, g, spec.exp_avg.decode(momentum_buffer) * momentum + (1 - dampening) * g)
        direction = g + momentum * buf if spec.nesterov else buf
        _commit(momentum_buffer, spec.exp_avg.encode(buf), ok)
    w = w - lr * direction
    _write(spec, param, w, master, new_step, salt, ok, numel)
    step.copy_(torch.where(ok, new_step, step))


_RULES: dict[str, Callable[..., None]] = {"adam": adam_update, "sgd": sgd_update}
_COMPILED: dict[UpdateSpec, Callable[..., None]] = {}


def compiled_update(spec: UpdateSpec, device: torch.device, use_compile: bool) -> Callable[..., None]:
    """The update for ``spec``: eager on CPU (the reference), ``torch.compile``d once per spec on GPU."""
    rule = _RULES[spec.rule]
    if not use_compile:
        return lambda *args: rule(spec, *args)
    fn = _COMPILED.get(spec)
    if fn is None:
        compiled = torch.compile(rule, dynamic=True)
        fn = _COMPILED[spec] = lambda *args: compiled(spec, *args)
    return fn
