"""``LowBitOptimizer``: Adam/AdamW and SGD-with-momentum whose state format is chosen per moment.

One class for every variant (the update rule and the formats are values, not subclasses): state formats from
:mod:`lowbit_amp.optim.state_codec`, master weights from :mod:`lowbit_amp.optim.master`, math in
:mod:`lowbit_amp.optim.update`. Gradients may be :class:`~lowbit_amp.grads.Fp8Grad` (read as codes + scale, never
widened in memory) or ordinary tensors.

The param groups are the user's dicts, key for key: hyper-parameters are read from them at every step (so LR schedulers
work), and settings this optimizer cannot honour (``amsgrad=True``, ``differentiable=True``, sparse gradients) raise
instead of being ignored. ``foreach``/``fused``/``capturable`` only choose torch's kernels and are accepted as they are.

Non-finite gradients: by default (``nonfinite="skip"``) a step with any inf/NaN gradient changes nothing — weights,
moments, master weights and step counters keep every byte — and ``skipped_steps`` (a device tensor, read it when you
want; reading syncs) counts such steps. The check costs no host sync. ``nonfinite="error"`` syncs once per step and
raises ``FloatingPointError``. With loss scaling on, :mod:`lowbit_amp.loss_scaler` already sets the gradients to None
on overflow and this optimizer then skips those parameters, as torch's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from lowbit_amp.config import ConfigError
from lowbit_amp.grads.fp8_grad import Fp8Grad
from lowbit_amp.optim.master import MasterWeights
from lowbit_amp.optim.state_codec import get_codec
from lowbit_amp.optim.update import UpdateSpec, all_finite, compiled_update, fused_step_for

__all__ = ["LowBitOptimizer", "format_tag", "parse_format_tag"]

RULES = ("adam", "sgd")
NONFINITE = ("skip", "error")
EXP_AVG_FORMATS = ("fp32", "bf16", "e4m3")
EXP_AVG_SQ_FORMATS = ("fp32", "fp16", "e4m3_expand")


class _Replay:
    """What :meth:`LowBitOptimizer._replayed` checks before re-launching a step: per parameter a list ``[param, its
    state dict, the ids of its state tensors, gradient-codes address, scale address, the parameter's address (``p.data
    = ...`` moves it), numel, dtype, the gradient's type (Fp8Grad or a plain tensor), the codes' dtype]`` — the two
    gradient addresses are updated when a re-launch re-points them —, per group (group, device, hyper tensor, flags)."""

    __slots__ = ("entries", "fused", "hypers")

    def __init__(self, fused: Any, entries: list[tuple], hypers: list[tuple]) -> None:
        self.fused, self.entries, self.hypers = fused, entries, hypers


def _state_tensors(state: dict[str, Any]) -> tuple[int, ...]:
    """Identity of every tensor of an Adam state's parts (a replaced tensor, e.g. by a checkpoint load, changes it);
    ``map``/``chain`` keep it at C speed: it runs per parameter per re-launched step."""
    return tuple(map(id, chain(state["exp_avg"].values(), state["exp_avg_sq"].values(), state["master"].values(),
                               (state["step"], state["salt"]))))


def format_tag(rule: str, exp_avg: str | None, exp_avg_sq: str | None, master: str, block_size: int) -> str:
    """The string saved with every parameter's state; a checkpoint whose tag differs is converted on load."""
    return f"{rule};exp_avg={exp_avg};exp_avg_sq={exp_avg_sq};master={master};block={block_size}"


def parse_format_tag(tag: str) -> dict[str, str]:
    rule, *fields = tag.split(";")
    parsed = dict(field.split("=", 1) for field in fields)
    parsed["rule"] = rule
    return parsed


class LowBitOptimizer(torch.optim.Optimizer):
    """See the module docstring. Prefer :class:`~lowbit_amp.optim.lowbit_adamw.LowBitAdamW` /
    :class:`~lowbit_amp.optim.lowbit_sgd.LowBitSGD` or ``amp.initialize``, which build this with torch's signatures."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        rule: str,
        exp_avg: str = "fp32",
        exp_avg_sq: str = "fp32",
        master_weights: str = "none",
        block_size: int = 128,
        decoupled_default: bool = True,
        compile: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"Unknown update rule {rule!r}; valid rules are {list(RULES)}.")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite={nonfinite!r} is not one of {list(NONFINITE)}.")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
        if exp_avg not in EXP_AVG_FORMATS:
            raise ValueError(f"exp_avg={exp_avg!r} is not one of the valid formats {list(EXP_AVG_FORMATS)}.")
        if exp_avg_sq not in EXP_AVG_SQ_FORMATS:
            hint = (" A plain-E4M3 second moment flushes small values to zero; use 'e4m3_expand' (COAT's dynamic "
                    "range expansion) or 'fp16'." if exp_avg_sq == "e4m3" else "")
            raise ValueError(f"exp_avg_sq={exp_avg_sq!r} is not one of the valid formats "
                             f"{list(EXP_AVG_SQ_FORMATS)}.{hint}")
        self.rule = rule
        self.exp_avg_codec = get_codec(exp_avg)
        self.exp_avg_sq_codec = get_codec(exp_avg_sq) if rule == "adam" else None
        self.master = MasterWeights(master_weights)
        self.block_size = block_size
        self.decoupled_default = decoupled_default
        self.use_compile = compile
        self.nonfinite = nonfinite
        self.skipped_steps: torch.Tensor | None = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------------ formats
    def _momentum_codec_name(self, group: dict[str, Any]) -> str | None:
        if self.rule == "sgd" and group.get("momentum", 0) == 0:
            return None
        return self.exp_avg_codec.name

    def param_format(self, group: dict[str, Any]) -> str:
        sq = self.exp_avg_sq_codec.name if self.exp_avg_sq_codec is not None else None
        return format_tag(self.rule, self._momentum_codec_name(group), sq, self.master.mode, self.block_size)

    def _spec(self, group: dict[str, Any], param: torch.Tensor) -> UpdateSpec:
        """The parameter's :class:`UpdateSpec`, cached by everything it is built from (the group's flags are re-read
        every step, so a changed flag gives a new spec): it is asked for per parameter per step."""
        name = self._momentum_codec_name(group)
        flags = self._flags(group)
        key = (name, param.dtype, flags)
        cache = self.__dict__.setdefault("_spec_cache", {})
        spec = cache.get(key)
        if spec is None:
            spec = cache[key] = UpdateSpec(
                rule=self.rule,
                exp_avg=get_codec(name) if name is not None else None,
                exp_avg_sq=self.exp_avg_sq_codec,
                master=self.master,
                param_dtype=param.dtype,
                block_size=self.block_size,
                decoupled=flags[0],
                maximize=flags[1],
                nesterov=flags[2],
            )
        return spec

    def _flags(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:
        """The group's update flags that select a kernel variant: (decoupled weight decay, maximize, nesterov)."""
        return (bool(group.get("decoupled_weight_decay", self.decoupled_default)), bool(group.get("maximize", False)),
                bool(group.get("nesterov", False)))

    # ------------------------------------------------------------------------------------------------ checks
    def _check_group(self, group: dict[str, Any]) -> None:
        if group.get("amsgrad", False):
            raise ConfigError("The low-bit optimizer does not implement amsgrad=True; set amsgrad=False (or use "
                              "opt_level O1, which keeps your torch optimizer).")
        if group.get("differentiable", False):
            raise ConfigError("differentiable=True is not supported by the low-bit optimizer; set it to False.")
        if self.rule == "sgd" and group.get("nesterov", False) and (
                group.get("momentum", 0) <= 0 or group.get("dampening", 0) != 0):
            raise ConfigError("SGD nesterov=True needs momentum > 0 and dampening = 0 (as torch.optim.SGD requires).")

    @staticmethod
    def _grad_view(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(codes, scale)`` of the gradient; scale None for an ordinary gradient tensor."""
        grad = param.grad
        assert grad is not None
        if hasattr(grad, "to_local"):  # FSDP2: a reduce-scattered DTensor gradient; this rank updates its local shard
            grad = grad.to_local()
        if isinstance(grad, Fp8Grad):
            return grad.codes_and_scale()
        if grad.is_sparse:
            raise ConfigError("The low-bit optimizer does not support sparse gradients (e.g. nn.Embedding(sparse=True)).")
        return grad, None

    # ------------------------------------------------------------------------------------------------ state
    def _blocks_of(self, param: torch.Tensor) -> int:
        return -(-param.numel() // self.block_size)

    def init_state(self, group: dict[str, Any], param: torch.Tensor, salt: int) -> dict[str, Any]:
        """Fresh state for ``param``: zero moments, master weights copied from the parameter."""
        blocks, device = self._blocks_of(param), param.device
        padded = torch.nn.functional.pad(param.detach().reshape(-1).float(),
                                         (0, blocks * self.block_size - param.numel()))
        state: dict[str, Any] = {
            "step": torch.zeros((), dtype=torch.float32, device=device),
            "salt": torch.tensor(salt, dtype=torch.int64, device=device),
            "format": self.param_format(group),
            "master": self.master.init(padded.view(blocks, self.block_size), param.dtype),
        }
        name = self._momentum_codec_name(group)
        if self.rule == "adam":
            state["exp_avg"] = self.exp_avg_codec.zeros(blocks, self.block_size, device)
            assert self.exp_avg_sq_codec is not None
            state["exp_avg_sq"] = self.exp_avg_sq_codec.zeros(blocks, self.block_size, device)
        elif name is not None:
            state["momentum_buffer"] = get_codec(name).zeros(blocks, self.block_size, device)
        return state

    def _hyper(self, group: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The group's hyper-parameters as one device tensor. Plain numbers: one host-to-device copy, and none while
        they stay unchanged (cached per group and device) — five separate copies cost ~1.3 ms per step on an H200
        (bench/bench_optim.py profile, 2026-12-01). Tensor values (e.g. a tensor lr) are read on the device."""
        if self.rule == "adam":
            beta1, beta2 = group["betas"]
            values = [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]]
        else:
            values = [group["lr"], group.get("momentum", 0), group.get("dampening", 0), group["weight_decay"], 0.0]
        if any(isinstance(v, torch.Tensor) for v in values):
            return torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device).reshape(()) for v in values])
        cache = self.__dict__.setdefault("_hyper_cache", {})
        key = (id(group), device)
        numbers = tuple(float(v) for v in values)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = (numbers, torch.tensor(numbers, dtype=torch.float32).to(device))
        elif hit[0] != numbers:  # e.g. an LR scheduler's new lr: updated in place, so its address (in the fused
            host = torch.tensor(numbers, dtype=torch.float32)  # kernel's pointer table) stays valid
            if hit[1].device.type == "cuda":
                host = host.pin_memory()  # async copy, ordered after the kernels that read the old values
            hit[1].copy_(host, non_blocking=True)
            hit = cache[key] = (numbers, hit[1])
        return hit[1]

    def state_bytes(self) -> int:
        """Bytes held by optimizer state tensors (moments, scales, master copies, counters), measured from storage."""
        seen: set[int] = set()
        total = 0

        def visit(value: Any) -> None:
            nonlocal total
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            elif isinstance(value, dict):
                for item in value.values():
                    visit(item)

        for state in self.state.values():
            visit(state)
        return total

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        replay = self.__dict__.get("_replay")
        if replay is not None:
            if replay.fused.can_replay() and self._replayed(replay):
                return loss
            self._replay = None
        work = []
        finite = []
        for group in self.param_groups:
            self._check_group(group)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.is_contiguous():
                    raise ValueError("The low-bit optimizer needs contiguous parameters; call .contiguous() on the "
                                     f"parameter of shape {tuple(param.shape)} before building the optimizer.")
                codes, scale = self._grad_view(param)
                if scale is not None:  # all checked at once below: an FP8 gradient is non-finite iff its scale is
                    finite.append(scale)
                elif codes.numel():  # a plain gradient iff its amax is (amax propagates NaN): 2 ops, not isfinite's 5
                    finite.append(codes.abs().amax())
                work.append((group, param, codes, scale))
        if not work:
            return loss
        device = work[0][1].device
        ok = all_finite(finite, device)
        # FSDP2 (DTensor params): each rank sees only its shards' gradients, so the skip decision is a MAX all-reduce
        # of "some shard was non-finite" over every dim of every mesh — all ranks skip or step together.
        meshes = {id(p.device_mesh): p.device_mesh for _, p, _, _ in work if hasattr(p, "device_mesh")}
        if meshes:
            import torch.distributed as dist

            bad = (~ok).to(torch.int32)
            for mesh in meshes.values():
                for dim in range(mesh.ndim):
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
            ok = bad == 0
        self._count_skip(ok, device)
        hypers: dict[tuple[int, torch.device], torch.Tensor] = {}
        ones = self._ones()
        positions: dict[int, int] | None = None  # built only on a step that initialises state
        # Adam on CUDA: the fused Triton kernel (one launch per group of like parameters) unless compile=False (the
        # eager reference) or the group says fused=False; what it cannot serve keeps this loop's path (update.py).
        fused = fused_step_for(self) if self.use_compile is not False and self.rule == "adam" else None
        all_fused = fused is not None and not meshes
        added = []  # (param, codes, scale) as the fused kernel's table addresses them, in add() order
        for group, param, codes, scale in work:
            state = self.state[param]
            # A DTensor (FSDP2) parameter is updated through its local shard: the state is blocks of the *local* flat
            # shard, and the rounding stream is offset by the shard's coordinate (replicas along unsharded mesh dims
            # share it, so they stay bit-identical). A lowbit wrapper subclass (FP8 all-gather) hands over its plain data.
            local, shard_salt = param, 0
            if hasattr(param, "device_mesh"):
                local = param.to_local()
                coord, shard_index = param.device_mesh.get_coordinate() or [], 0
                for dim, placement in enumerate(param.placements):
                    if placement.is_shard():
                        shard_index = shard_index * param.device_mesh.size(dim) + coord[dim]
                shard_salt = 1_000_003 * shard_index
            local = getattr(local, "lowbit_plain_data", local)
            if not state:  # the salt (stochastic-rounding stream) is the parameter's position, saved with its state
                if positions is None:
                    positions = {id(other): i for i, (_, other) in enumerate(self._params_with_groups())}
                state.update(self.init_state(group, local, positions[id(param)]))
            salt = state["salt"] + shard_salt if shard_salt else state["salt"]
            key = (id(group), param.device)
            if key not in hypers:
                hypers[key] = self._hyper(group, param.device)
            if scale is None:  # a plain gradient: the kernel (and the reference) read a scale of one
                scale = ones.get(param.device)
                if scale is None:
                    scale = ones[param.device] = torch.ones((), device=param.device)
            if fused is not None and group.get("fused") is not False and fused.add(
                    self._spec(group, param), local, codes, scale, state, hypers[key], salt):
                if local is param:
                    added.append((param, codes, scale))
                else:  # a wrapper's plain data (FP8 all-gather): its address is not the parameter's; no replay
                    all_fused = False
                continue
            all_fused = False
            use_compile = self.use_compile if self.use_compile is not None else param.device.type == "cuda"
            update = compiled_update(self._spec(group, param), param.device, use_compile)
            moment2 = state.get("exp_avg_sq", {})
            moment1 = state.get("exp_avg", state.get("momentum_buffer", {}))
            update(local.detach(), codes, scale, moment1, moment2, state["master"], state["step"], salt,
                   hypers[key], ok.to(param.device))
        if fused is not None:
            fused.launch(ok)
        if all_fused and fused is not None and fused.can_replay():
            self._replay = _Replay(
                fused, [[p, self.state[p], _state_tensors(self.state[p]), c.data_ptr(), s.data_ptr(), p.data_ptr(),
                         p.numel(), p.dtype, type(p.grad), c.dtype] for p, c, s in added],
                [(g, d, t, self._flags(g)) for (gid, d), t in hypers.items()
                 for g in self.param_groups if id(g) == gid])
        return loss

    def _ones(self) -> dict[torch.device, torch.Tensor]:
        """Per device, the 0-d one that stands for a plain gradient's scale. Persistent (not one per step) because its
        address is in the fused kernel's cached table, which :meth:`_replayed` re-launches: a per-step tensor would be
        freed after the step and the re-launched table would point at freed memory."""
        return self.__dict__.setdefault("_ones_cache", {})

    def _replayed(self, replay: "_Replay") -> bool:
        """Re-launch the previous step's fused kernels when nothing they read moved except gradient addresses: same
        parameters (address, numel, dtype) with gradients of the same type and dtype, the same state tensors, the same
        hyper-parameter tensors and flags. A gradient found at another address than the cached table's — FP8 codes or
        scale, or a plain gradient (bias, norm, embedding; its scale is the persistent one of :meth:`_ones`) — is
        re-pointed in the table (``FusedAdamStep.relaunch(patches=...)``) instead of rebuilding the step.

        Why: the per-parameter Python of a full step (kind checks, table rows, state lookups) is ~10 µs per
        parameter on a CPU, host time that a GPU step of a model with hundreds of parameters waits for (256
        parameters of 1024²: 3.3 ms pipelined vs torch's 1.4, H200, 2026-12-01). The caching allocator usually
        hands every backward the same gradient addresses, so most steps need no patch; a plain gradient that
        ``zero_grad(set_to_none=True)`` freed is reallocated each backward (often, not always, at the same address),
        and every real model has such gradients next to its FP8 ones — before they were handled here no step of a
        real model re-launched. Every gradient's two addresses are compared each step, so no row can keep a stale
        pointer. Anything else that moved (a new parameter with a gradient, a freed one, ``p.data`` rebound,
        load_state_dict, a dtype or flag change, ``fused=False`` or ``compile=False`` set since, a DTensor, sparse or
        non-contiguous gradient) takes the full step, which records a new replay."""
        if self.use_compile is False:
            return False
        entries, i, finite, patches = replay.entries, 0, [], []
        ones = self._ones()
        n = len(entries)
        for group in self.param_groups:
            self._check_group(group)
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if i == n:
                    return False
                entry = entries[i]
                kind = type(grad)
                if kind is Fp8Grad:
                    codes, scale = grad.codes_and_scale()
                elif kind is torch.Tensor:  # not a subclass (DTensor, ...); a sparse one is not contiguous
                    codes, scale = grad, ones.get(param.device)
                else:
                    return False
                if (entry[0] is not param or kind is not entry[8] or codes.dtype is not entry[9]
                        or not codes.is_contiguous() or param.data_ptr() != entry[5] or param.numel() != entry[6]
                        or param.dtype is not entry[7] or self.state.get(param) is not entry[1]
                        or _state_tensors(entry[1]) != entry[2]):
                    return False
                if scale is None:  # no ones tensor on this device: the full step creates it
                    return False
                if kind is Fp8Grad:  # checked all at once below, as in the full step
                    finite.append(scale)
                elif codes.numel():
                    finite.append(codes.abs().amax())
                codes_ptr, scale_ptr = codes.data_ptr(), scale.data_ptr()
                if codes_ptr != entry[3] or scale_ptr != entry[4]:
                    patches.append((i, codes, codes_ptr, scale_ptr))
                i += 1
        if i != n:
            return False
        for group, device, tensor, flags in replay.hypers:
            if (self._hyper(group, device) is not tensor or self._flags(group) != flags
                    or group.get("fused") is False):
                return False
        device = entries[0][0].device
        ok = all_finite(finite, device)
        self._count_skip(ok, device)
        replay.fused.relaunch(ok, patches)
        # only now: had the count (nonfinite='error') or the launch raised, the next step must still see the rows'
        # old addresses as different and patch them again
        for index, _, codes_ptr, scale_ptr in patches:
            entries[index][3], entries[index][4] = codes_ptr, scale_ptr
        return True

    def _count_skip(self, ok: torch.Tensor, device: torch.device) -> None:
        """``skipped_steps += not ok`` (on the device, no sync); with ``nonfinite='error'`` a skipped step raises."""
        if self.skipped_steps is None:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps += (~ok).to(torch.int64)
        if self.nonfinite == "error" and not bool(ok):
            raise FloatingPointError(
                "A gradient holds inf/NaN; the optimizer step was not applied. Use loss scaling "
                "(loss_scaling.mode='dynamic') or nonfinite='skip' to skip such steps instead.")

    # ------------------------------------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint; one saved in another format (another opt level, or a torch optimizer) is converted."""
        from lowbit_amp.optim.checkpoint import import_param_state

        saved_state = state_dict.get("state", {})
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        for position, (saved_id, (group, param)) in enumerate(zip(saved_ids, self._params_with_groups())):
            if saved_id in saved_state:
                self.state[param] = import_param_state(self, group, param, saved_state[saved_id], position)

    def _params_with_groups(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        return [(group, param) for group in self.param_groups for param in group["params"]]

