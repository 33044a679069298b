"""Loading one parameter's optimizer state, converting it when it was saved in another format.

A state saved by the same configuration (same ``format`` tag) is loaded byte for byte, so a resumed run's next steps are
bit-identical. Anything else is decoded to FP32 and re-encoded in this optimizer's formats:

* another opt level's low-bit state (e.g. O2's FP32 moments into O3's E4M3/FP16), any block size;
* a ``torch.optim.Adam``/``AdamW``/``SGD`` state (plain ``exp_avg``/``exp_avg_sq``/``momentum_buffer`` tensors);
* master weights: taken from the checkpoint when it has them, else from the current parameter.

A state that cannot serve this update rule (an SGD momentum buffer loaded into Adam, an Adam state without
``exp_avg_sq``) raises :class:`~lowbit_amp.config.ConfigError` naming what is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lowbit_amp.config import ConfigError
from lowbit_amp.optim.master import MasterWeights
from lowbit_amp.optim.state_codec import get_codec

if TYPE_CHECKING:
    from lowbit_amp.optim.lowbit_optimizer import LowBitOptimizer


def _copy_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, copy=True)
    if isinstance(value, dict):
        return {key: _copy_to(item, device) for key, item in value.items()}
    return value


def _flat_fp32(saved: Any, codec_name: str | None, numel: int, device: torch.device) -> torch.Tensor:
    """The first ``numel`` FP32 values of a saved moment (low-bit parts or a plain tensor)."""
    if isinstance(saved, torch.Tensor):
        return saved.detach().to(device=device, dtype=torch.float32).reshape(-1)[:numel]
    if codec_name is None or codec_name == "None":
        raise ConfigError("A saved optimizer moment has no format; the checkpoint is not from lowbit_amp or torch.")
    parts = {key: value.to(device) for key, value in saved.items()}
    return get_codec(codec_name).decode(parts).reshape(-1)[:numel]


def _blocks(flat: torch.Tensor, blocks: int, block_size: int) -> torch.Tensor:
    return F.pad(flat, (0, blocks * block_size - flat.numel())).view(blocks, block_size)


def import_param_state(opt: LowBitOptimizer, group: dict[str, Any], param: torch.Tensor,
                       saved: dict[str, Any], position: int) -> dict[str, Any]:
    """This optimizer's state for ``param`` (at ``position`` in the groups) from ``saved`` (loaded as is, or converted)."""
    from lowbit_amp.optim.lowbit_optimizer import parse_format_tag

    device = param.device
    expected = opt.param_format(group)
    if saved.get("format") == expected:
        state = _copy_to(saved, device)
        if state.get("master") and opt.master.uses_param(param.dtype):
            # saved before an fp32 parameter held its bf16_sr master itself: the copy equals the parameter's values
            state["master"] = {}
        return state
    theirs = parse_format_tag(saved["format"]) if "format" in saved else {}
    if theirs and theirs["rule"] != opt.rule:
        raise ConfigError(
            f"This checkpoint's optimizer state was saved by the low-bit {theirs['rule']!r} rule but this optimizer "
            f"runs {opt.rule!r}; load it into an optimizer of the same kind (Adam/AdamW vs SGD).")
    blocks, block_size, numel = opt._blocks_of(param), opt.block_size, param.numel()
    state = opt.init_state(group, param, int(saved["salt"]) if "salt" in saved else position)
    step = saved.get("step", 0)
    state["step"] = torch.as_tensor(step, dtype=torch.float32).to(device).reshape(()).clone()
    moments = ("exp_avg", "exp_avg_sq") if opt.rule == "adam" else ("momentum_buffer",)
    for key in moments:
        if key not in state:
            continue  # SGD without momentum keeps no buffer
        if saved.get(key) is None:
            raise ConfigError(
                f"The checkpoint's optimizer state has no {key!r} for a parameter of shape {tuple(param.shape)}, so "
                f"it cannot resume this {opt.rule!r} optimizer (was it saved by a different optimizer type?).")
        codec_key = "exp_avg" if key == "momentum_buffer" else key
        flat = _flat_fp32(saved[key], theirs.get(codec_key), numel, device)
        codec = opt.exp_avg_codec if key != "exp_avg_sq" else opt.exp_avg_sq_codec
        assert codec is not None
        state[key] = codec.encode(_blocks(flat, blocks, block_size))
    their_master = saved.get("master")
    if their_master and theirs:
        master_parts = {k: v.to(device) for k, v in their_master.items()}
        flat = MasterWeights(theirs["master"]).read(master_parts, master_parts.get("value", torch.empty(0))
                                                    ).reshape(-1)[:numel]
        state["master"] = opt.master.init(_blocks(flat, blocks, block_size), param.dtype)
    return state
