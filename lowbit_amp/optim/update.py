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

On CUDA, Adam/AdamW parameters run instead through :class:`FusedAdamStep` — a hand-written Triton kernel
(lowbit_amp/kernels/adam_triton.py) launched once per group of like parameters — for which the functions above are
the numerical reference (tests/optim/test_fused_step.py). What it does not serve (SGD, ``master_weights='fp16'``,
tensor subclasses, CPU tensors, ``compile=False``, a param group with ``fused=False``) stays here, and
:func:`fused_unavailable` names the reason.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit_amp.optim.master import MasterWeights
from lowbit_amp.optim.state_codec import StateCodec
from lowbit_amp.quant.cast import dequantize

__all__ = ["FusedAdamStep", "UpdateSpec", "adam_update", "all_finite", "compiled_update", "fused_step_for",
           "fused_unavailable", "sgd_update"]

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


def all_finite(items: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d bool on ``device``: every float item (an FP8 gradient's scale, a plain gradient's amax) is finite and every
    bool item (a flag) is set.

    One stacked check per dtype for all items instead of one per parameter: ``torch.isfinite`` of a float tensor is
    four kernels, and per parameter those launches were most of the host time of a fused step. Items are stacked in
    their own dtype (a bf16 amax is finite exactly when its fp32 widening is), so no per-item conversion runs."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for item in items:
        # FP8 gradient scales are already 0-d on the device: taken as they are (a reshape + to per item was ~3 us of
        # host time per parameter)
        if item.dim() != 0 or item.device != device:
            item = item.reshape(()).to(device)
        groups.setdefault(item.dtype, []).append(item)
    ok: torch.Tensor | None = None
    for dtype, group in groups.items():
        stacked = torch.stack(group)
        part = stacked.all() if dtype == torch.bool else torch.isfinite(stacked).all()
        ok = part if ok is None else ok & part
    return ok if ok is not None else torch.ones((), dtype=torch.bool, device=device)


# ==================================================================================================== fused (Triton)
# The compiled per-parameter update above is the numerical reference; on CUDA the Adam/AdamW step of every parameter
# whose formats the Triton kernel implements runs instead as one multi-tensor launch per group of parameters that
# share the kernel's static kinds (lowbit_amp/kernels/adam_triton.py). Parameters it does not serve are listed, with
# the reason, by :func:`fused_unavailable` and keep the compiled path — a documented rule, never a silent switch.

_FUSED_M = {"fp32": 0, "bf16": 1, "e4m3": 2}
_FUSED_V = {"fp32": 0, "fp16": 1, "e4m3_expand": 2}
_FUSED_PARAM = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# Verified on an H200 (2026-12-01, tests/optim/test_fused_step.py): bf16 parameters, bf16_sr/none masters, AdamW, every
# m/v format and gradient kind — codes bit-identical, weights within 1 bf16 ulp of the reference. fp16/fp32 parameters,
# the fp32 master, Adam-L2 and maximize ran but differed from the reference by up to ~5e-4 (absolute, lr 1e-2) — a
# cause not yet found — so they take the compiled path unless this is set (the tests set it to keep measuring them).
FUSED_ALLOW_UNVERIFIED = False
_FUSED_GRAD = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1, torch.bfloat16: 2, torch.float16: 3, torch.float32: 4}

#: Blocks of ``block_size`` elements handled by one program (a power of 2: the rows of the kernel's 2-D tile), and its
#: warps. Each warp owns whole tile rows, so the per-block amax/min reductions stay inside a warp (shuffles, no shared
#: memory); several rows per thread put several blocks' loads in flight at once. Chosen from the sweep in
#: bench/bench_optim.py --sweep (docs/optimizer.md).
FUSED_BLOCKS_PER_PROGRAM = 8
FUSED_NUM_WARPS = 4
#: COAT's per-element ``|x|^k`` (and the block's log-range) with libdevice's ``powf``/``logf`` when True; False
#: (default) uses the hardware ``ex2``/``lg2`` approximations (relative error ~1e-6): libdevice's accurate pow costs
#: ~100 instructions per call, two calls per element, which made the kernel instruction-bound (docs/optimizer.md).
FUSED_EXACT_POW = False
#: Bias corrections from the reference's own torch ops (a few launches per group) instead of the prologue's libdevice
#: ``powf``, whose flush-to-zero variant can differ from ATen's by an ulp — amplified by ``1 - beta2^t`` cancellation.
#: Also turns ``FUSED_FAST_MATH`` off: together the bit-exact mode the tests compare bit for bit.
FUSED_TORCH_BIAS_CORRECTION = False
#: The per-element ``sqrt(v) / bc2``, ``m / denom`` (and e4m3_expand's ``|v| / max``) with the hardware's approximate
#: division/square root (``div.full``/``sqrt.approx``, ≤ 2 ulp of FP32) instead of the IEEE sequences: the IEEE ones
#: made the kernel instruction-bound — 1.472 -> 1.304 ms per 256M-parameter O3 step, pipelined (H200,
#: bench/bench_optim.py --sweep, 2026-12-01), for an FP32 update that differs by ≤ 2 ulp before it is rounded to bf16
#: (bit-identical weights: 0.998845 vs 0.998847 of the IEEE kernel against the eager reference). Off in the bit-exact mode
#: (``FUSED_TORCH_BIAS_CORRECTION``), which reproduces the reference bit for bit.
FUSED_FAST_MATH = True
#: Re-launch the previous step's cached tables when nothing they address moved (LowBitOptimizer._replayed): ~2.5x
#: less host time per parameter (CPU-measured 2026-12-01; GPU-unverified at that date — switch off here if a GPU test
#: of tests/optim/test_fused_step.py disagrees).
FUSED_RELAUNCH = True
#: Test hook: serve CPU parameters too, through Triton's interpreter (needs TRITON_INTERPRET=1 before Triton loads).
FUSED_ON_CPU_INTERPRETER = False


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_unavailable(spec: UpdateSpec, param: torch.Tensor, grad_codes: torch.Tensor) -> str | None:
    """``None`` when the fused Triton kernel serves this parameter's update, else why the compiled path runs it."""
    reason = _kind_unavailable(spec, param, grad_codes)
    if reason is None and (not grad_codes.is_contiguous() or grad_codes.numel() != param.numel()):
        reason = "non-contiguous gradient"
    if reason is None and torch.compiler.is_compiling():
        reason = "under torch.compile: the traced reference ops are compiled instead of an opaque raw-pointer kernel"
    return reason


def _kind_unavailable(spec: UpdateSpec, param: torch.Tensor, grad_codes: torch.Tensor) -> str | None:
    """The part of :func:`fused_unavailable` fixed by the tensors' kinds and sizes (cached per parameter by
    :class:`FusedAdamStep`)."""
    on_cpu_interpreter = FUSED_ON_CPU_INTERPRETER and param.device.type == "cpu" and _interpreting()
    reason = _static_unavailable(spec, param.device.type, on_cpu_interpreter, param.dtype, grad_codes.dtype,
                                 type(param) in _PLAIN and type(grad_codes) is torch.Tensor,
                                 FUSED_ALLOW_UNVERIFIED)
    if reason is None and param.numel() >= 2**31 - 2**16:
        reason = "2^31 elements or more: the kernel indexes with int32"
    return reason


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # raw storage the kernel can address (not a subclass such as DTensor)


@functools.lru_cache(maxsize=256)
def _static_unavailable(spec: UpdateSpec, device_type: str, on_cpu_interpreter: bool, param_dtype: torch.dtype,
                        grad_dtype: torch.dtype, plain_tensors: bool, allow_unverified: bool) -> str | None:
    """The part of :func:`fused_unavailable` that depends only on kinds, not on the tensors (cached: it runs per
    parameter per step, and these checks were a third of the fused step's host time)."""
    if spec.rule != "adam":
        return f"rule {spec.rule!r}: the fused kernel implements Adam/AdamW only"
    if device_type != "cuda" and not on_cpu_interpreter:
        return f"parameter on {device_type}: the fused kernel is CUDA-only (CPU runs the eager reference)"
    if spec.master.mode == "fp16":
        return ("master_weights='fp16' takes one power-of-2 scale from the amax of the whole *updated* tensor, which "
                "needs a grid-wide reduction before any weight is written; a one-pass kernel cannot do that")
    unverified = (param_dtype != torch.bfloat16 or spec.master.mode not in ("bf16_sr", "none") or not spec.decoupled
                  or spec.maximize)
    if unverified and not allow_unverified:
        return ("mode not verified on the GPU: the kernel serves bf16 parameters with master_weights bf16_sr/none, "
                "AdamW (decoupled decay), maximize=False; the others disagreed with the reference beyond the test "
                "bounds (H200, 2026-12-01) and take the compiled path")
    assert spec.exp_avg is not None and spec.exp_avg_sq is not None
    if spec.exp_avg.name not in _FUSED_M or spec.exp_avg_sq.name not in _FUSED_V:
        return f"formats m={spec.exp_avg.name}, v={spec.exp_avg_sq.name} are not implemented by the fused kernel"
    if param_dtype not in _FUSED_PARAM:
        return f"parameter dtype {param_dtype} (the fused kernel writes bf16/fp16/fp32)"
    if grad_dtype not in _FUSED_GRAD:
        return f"gradient dtype {grad_dtype}"
    if not plain_tensors:
        return "tensor subclass (e.g. DTensor): the kernel reads raw storage, the compiled path handles subclasses"
    if not _triton_importable():
        return "triton is not importable"
    return None


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class FusedAdamStep:
    """One optimizer's fused step: collects the served parameters of a ``step()``, then launches the kernel once per
    group of parameters sharing static kinds (formats, dtypes, flags).

    Per launch the kernel reads a table with one int64 row of data pointers per parameter (param, gradient codes and
    scale, m/v parts, master, step counter, hyper vector, salt; numel; blocks) and a chunk table mapping each program to
    (parameter, first block). The chunk table and the static part of each row are built once and cached (rows are
    re-validated by tensor identity, so a ``load_state_dict`` that replaces state tensors rebuilds them); the gradient
    and hyper pointers change between steps, so the device copy of the table is refreshed only when some pointer
    changed — with the caching allocator's stable addresses (and always under CUDA-graph capture, where the buffers are
    static) it is reused. Nothing reads device values on the host: the finite flag, step counters, learning rate and
    the other hyper-parameters are loaded on the device. Per group there are two launches: a prologue (one program per
    parameter: bias corrections, step size, gradient reciprocal scale, SR seed, then ``step += ok``) and the main
    kernel (one program per ``FUSED_BLOCKS_PER_PROGRAM`` blocks).
    """

    def __init__(self) -> None:
        self._plans: dict[int, tuple] = {}  # id(state) -> (state, spec, ident, state tensors, *_plan(...))
        self._compiling = False
        self._used: set[int] = set()  # ids of the states added since begin()
        self._last: dict[tuple, list] = {}  # the last launch's groups (rows, alignment, parameter), for relaunch()
        # per add() since begin(), in call order: (its group's queue — the same list becomes its _last entry —, row
        # index in it, whether the row's static element arrays are 16-byte aligned, the base allocation); relaunch()
        # re-points rows through it without hashing the group keys (a spec's hash is ~0.6 us)
        self._added: list[tuple[list, int, bool, torch.Tensor]] = []
        self.relaunches = 0  # steps served by relaunch() (observability; tests)
        self.patched_rows = 0  # gradient rows re-pointed by relaunch(patches=...) (observability; tests)
        self._tables: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        self._chunks: dict[tuple, torch.Tensor] = {}
        self._pending: dict[tuple, list[tuple[list[int], tuple[torch.Tensor, ...]]]] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}  # per group: the prologue's per-parameter scalars
        self._bases: dict[torch.device, torch.Tensor] = {}
        self._step_of: dict[int, torch.Tensor] = {}
        self.fallbacks: dict[str, int] = {}  # reason -> parameters served by the compiled path (last step)

    def begin(self) -> None:
        if len(self._plans) > len(self._used):  # drop plans of states no longer stepped (they hold state tensors)
            self._plans = {k: plan for k, plan in self._plans.items() if k in self._used}
        self._used = set()
        self._added = []
        self._compiling = torch.compiler.is_compiling()
        self._pending = {}
        self._step_of = {}
        self.fallbacks = {}

    def add(self, spec: UpdateSpec, param: torch.Tensor, grad_codes: torch.Tensor, grad_scale: torch.Tensor,
            state: dict, hyper: torch.Tensor, salt: torch.Tensor) -> bool:
        """Queue ``param`` (a plain tensor: the parameter, or its local shard) for the fused launch; False (reason
        counted in ``fallbacks``) if the kernel cannot serve it. Every tensor whose pointer goes into the table is held
        until :meth:`launch` has enqueued the kernel (a temporary freed earlier could be reused by the allocator).

        Runs per parameter per step, so what is fixed between steps — the kind checks and the table row of the
        parameter and its state — is a cached plan, revalidated by identity: the state dict, the spec object, the
        parameter's address/numel/dtype, the gradient's dtype/type and the state tensors (a ``load_state_dict``
        replaces them). Host time per parameter went from ~40 to ~10 us (CPU profile with the launches stubbed,
        2026-12-01); only the gradient, scale, hyper-parameter and salt addresses are read each step."""
        m, v, master = state["exp_avg"], state["exp_avg_sq"], state["master"]
        tensors = (*m.values(), *v.values(), *master.values(), state["step"])
        ident = (param.data_ptr(), param.numel(), param.dtype, grad_codes.dtype, type(param), type(grad_codes),
                 FUSED_ALLOW_UNVERIFIED, FUSED_ON_CPU_INTERPRETER)
        self._used.add(id(state))
        plan = self._plans.get(id(state))
        if (plan is None or plan[0] is not state or plan[1] is not spec or plan[2] != ident
                or len(plan[3]) != len(tensors) or not all(a is b for a, b in zip(plan[3], tensors))):
            plan = self._plans[id(state)] = (state, spec, ident, tensors, *self._plan(spec, param, grad_codes, state))
        reason, static, static_aligned, base = plan[4:]
        if reason is None and (not grad_codes.is_contiguous() or grad_codes.numel() != param.numel()):
            reason = "non-contiguous gradient"
        if reason is None and self._compiling:
            reason = "under torch.compile: the traced reference ops are compiled instead of an opaque raw-pointer kernel"
        if reason is not None:
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
            return False
        full = list(static)
        grad_ptr = grad_codes.data_ptr()
        # element arrays as offsets from the base (exact: storages are aligned to their element size)
        full[1] = (grad_ptr - base.data_ptr()) // grad_codes.element_size()
        full[2], full[10], full[11] = grad_scale.data_ptr(), hyper.data_ptr(), salt.data_ptr()
        key = (spec, grad_codes.dtype, param.device)
        aligned = static_aligned and grad_ptr % 16 == 0
        queue = self._pending.setdefault(key, [])
        self._added.append((queue, len(queue), static_aligned, base))
        queue.append((full, aligned, (param, grad_codes, grad_scale, hyper, salt)))
        self._step_of[id(param)] = state["step"]
        return True

    def _plan(self, spec: UpdateSpec, param: torch.Tensor, grad_codes: torch.Tensor, state: dict
              ) -> tuple[str | None, list[int], bool, torch.Tensor | None]:
        """(why the kernel cannot serve this parameter or None; its table row without the per-step gradient/hyper
        columns — element arrays as offsets in elements from the device's base allocation, other columns absolute
        addresses or counts —; whether its element arrays are all 16-byte aligned; the base allocation)."""
        reason = _kind_unavailable(spec, param, grad_codes)
        if reason is not None:
            return reason, [], False, None
        from lowbit_amp.kernels import adam_triton as K  # noqa: N812

        m, v, master = state["exp_avg"], state["exp_avg_sq"], state["master"]
        if not param.is_contiguous() or not all(t.is_contiguous() for x in (m, v, master) for t in x.values()):
            return "state tensors are not contiguous (e.g. after loading a foreign checkpoint layout)", [], False, None
        base = self._bases.get(param.device)
        if base is None:  # any 16-byte-aligned allocation: element arrays are addressed relative to it
            base = self._bases[param.device] = torch.zeros(64, dtype=torch.uint8, device=param.device)
        dummy = param.data_ptr()
        row = [dummy] * int(K.NCOL)
        m_big = m["value"] if "value" in m else m["codes"]
        v_big = v["value"] if "value" in v else v["codes"]
        master_big = master.get("value", param)
        elements = {int(K.COL_PARAM): param, int(K.COL_M): m_big, int(K.COL_V): v_big, int(K.COL_MASTER): master_big}
        for column, tensor in elements.items():
            row[column] = (tensor.data_ptr() - base.data_ptr()) // tensor.element_size()
        row[int(K.COL_GRAD)] = 0  # per step (add)
        row[int(K.COL_M_SCALE)] = m["scale"].data_ptr() if "scale" in m else dummy
        row[int(K.COL_V_SCALE)] = v["scale"].data_ptr() if "scale" in v else dummy
        row[int(K.COL_V_K)] = v["k"].data_ptr() if "k" in v else dummy
        row[int(K.COL_STEP)] = state["step"].data_ptr()
        row[int(K.COL_NUMEL)] = param.numel()
        row[int(K.COL_BLOCKS)] = -(-param.numel() // spec.block_size)
        aligned = all(t.data_ptr() % 16 == 0 for t in elements.values())
        return None, row, aligned, base

    def launch(self, ok: torch.Tensor) -> None:
        """Run the queued updates (prologue + main kernel per group); step counters advance where ``ok``."""
        if not self._pending:
            return
        from lowbit_amp.kernels import adam_triton as K  # noqa: N812

        ok_u8 = ok.reshape(()).view(torch.uint8)
        for key, items in self._pending.items():
            spec, grad_dtype, device = key
            bpp = FUSED_BLOCKS_PER_PROGRAM
            base = self._bases[device]
            rows = [r for r, _, _ in items]
            aligned = all(a for _, a, _ in items)
            numel16 = all(r[int(K.COL_NUMEL)] % 16 == 0 for r in rows)
            flat = [x for r in rows for x in r]
            cached = self._tables.get(key)  # one table per group, re-sent only when a pointer changed
            if cached is not None and cached[0] == flat:
                table = cached[1]
            else:
                host = torch.tensor(flat, dtype=torch.int64)
                if device.type == "cuda":  # a pageable copy blocks the host (~0.2 ms each, measured under gVisor)
                    host = host.pin_memory()  # the caching host allocator keeps it until the async copy is done
                table = host.to(device, non_blocking=True)
                self._tables[key] = (flat, table)
            chunk_key = (key, tuple(r[int(K.COL_BLOCKS)] for r in rows), bpp)
            chunks = self._chunks.get(chunk_key)
            if chunks is None:
                blocks = torch.tensor([r[int(K.COL_BLOCKS)] for r in rows], dtype=torch.int64)
                per_param = (blocks + bpp - 1) // bpp
                owner = torch.repeat_interleave(torch.arange(len(rows)), per_param)
                starts = torch.cumsum(per_param, 0) - per_param
                first = (torch.arange(int(per_param.sum())) - starts[owner]) * bpp
                chunks = torch.stack([owner, first], 1).to(torch.int32).contiguous().to(device)
                self._chunks[chunk_key] = chunks
            assert spec.exp_avg is not None and spec.exp_avg_sq is not None
            master = {"none": K.MASTER_PARAM_RN, "fp32": K.MASTER_FP32}.get(spec.master.mode)
            if master is None:  # bf16_sr: the parameter is the master (bf16, fp32) or a bf16 copy is (fp16)
                master = K.MASTER_PARAM_SR if spec.master.uses_param(spec.param_dtype) else K.MASTER_BF16_SR
            scratch = self._scratch.get(key)
            if scratch is None or scratch.shape[0] < len(rows):
                scratch = self._scratch[key] = torch.empty((len(rows), int(K.SCRATCH_COLS)), device=device)
            interpreting = _interpreting()
            bc = scratch  # unused unless FUSED_TORCH_BIAS_CORRECTION
            if FUSED_TORCH_BIAS_CORRECTION:
                held = [h for _, _, h in items]
                hyp = torch.stack([h[3] for h in held])
                new_step = torch.stack([self._step_of[id(h[0])] for h in held]) + 1
                bc = torch.stack([hyp[:, 0] / (1 - torch.pow(hyp[:, 1], new_step)),
                                  torch.sqrt(1 - torch.pow(hyp[:, 2], new_step))], 1).contiguous()
            K.fused_adam_prologue[(len(rows),)](table, scratch, ok_u8, bc, USE_LIBDEVICE=not interpreting,
                                                GIVEN_BC=FUSED_TORCH_BIAS_CORRECTION)
            K.fused_adam_kernel[(chunks.shape[0],)](
                table, scratch, chunks, ok_u8, base, base.view(torch.int16), base.view(torch.float16),
                base.view(torch.float32), base.view(torch.float8_e4m3fn), base.view(torch.float8_e5m2),
                BLOCK_SIZE=spec.block_size, BLOCK=_next_pow2(spec.block_size), BPP=bpp,
                GRAD_KIND=_FUSED_GRAD[grad_dtype], PARAM_KIND=_FUSED_PARAM[spec.param_dtype],
                M_KIND=_FUSED_M[spec.exp_avg.name], V_KIND=_FUSED_V[spec.exp_avg_sq.name], MASTER_KIND=master,
                DECOUPLED=spec.decoupled, MAXIMIZE=spec.maximize, USE_LIBDEVICE=not interpreting,
                EXACT_POW=FUSED_EXACT_POW, ALIGNED=aligned, NUMEL16=numel16,
                FAST_MATH=FUSED_FAST_MATH and not FUSED_TORCH_BIAS_CORRECTION,
                num_warps=FUSED_NUM_WARPS, enable_fp_fusion=False,
            )
            # The kernel wrote the parameters through raw pointers: bump their autograd versions as an in-place op
            # would, so version-keyed consumers (FP8 weight caches, saved-tensor checks) see the change.
            torch.autograd.graph.increment_version([held[0] for _, _, held in items])
        # kept for relaunch(): the rows and the parameters only (holding last step's gradients would keep them alive);
        # rewritten in place, so the queues referenced by _added stay the lists relaunch() launches
        if self._pending is not self._last:
            for items in self._pending.values():
                items[:] = [(row, aligned, (held[0],)) for row, aligned, held in items]
            self._last = self._pending
        self._pending = {}

    def can_replay(self) -> bool:
        """Whether :meth:`relaunch` may repeat the last launch (not in the bit-exact mode, whose bias corrections are
        computed from the queued tensors; not after a step that served some parameter elsewhere; not while
        ``torch.compile`` traces the step, where :meth:`add` would have refused every parameter)."""
        return (FUSED_RELAUNCH and bool(self._last) and not self.fallbacks and not FUSED_TORCH_BIAS_CORRECTION
                and not torch.compiler.is_compiling())

    def relaunch(self, ok: torch.Tensor, patches: list[tuple[int, torch.Tensor, int, int]] = ()) -> None:
        """The last :meth:`launch` again, with a new finite flag: the caller checked that every address in the cached
        tables (parameters, states, hyper-parameters, salts) is unchanged and that every gradient either is at its
        cached addresses or is listed in ``patches`` as ``(i, codes, codes.data_ptr(), scale.data_ptr())`` — ``i`` the
        position of its :meth:`add` call in the step that built the tables, ``codes``/scale what the kernel reads now
        (for a plain gradient: the gradient and the optimizer's persistent ones tensor), of the dtype it had then.

        Why patches: only the gradient and scale columns of a row change from step to step (everything else is the
        parameter's cached plan), and autograd hands a plain gradient (bias, norm, embedding) a fresh allocation every
        backward unless ``zero_grad(set_to_none=False)`` kept it (and an Fp8Grad's ``+=`` re-encodes into new codes).
        Re-pointing those two columns (and the row's 16-byte alignment, which picks the kernel's vectorized variant)
        costs ~1-4 us per changed row, table upload included, where the full step costs ~10 us per parameter more than
        a re-launch (CPU, launches stubbed, 256 parameters half with plain gradients, median of 15 rounds on a loaded
        2-core machine, 2026-12-01: 14-15 us/param re-launched with no row moved, 15-17 with the 128 plain rows
        re-pointed, 23-24 for the full step). Unlisted rows are not re-read: the caller's check is what makes this
        safe."""
        if patches:
            from lowbit_amp.kernels import adam_triton as K  # noqa: N812

            col_grad, col_scale = int(K.COL_GRAD), int(K.COL_GSCALE)
            for index, codes, grad_ptr, scale_ptr in patches:
                items, j, static_aligned, base = self._added[index]
                row, _, held = items[j]
                # as in add(): element offset from the device's base allocation, the scale's absolute address
                row[col_grad] = (grad_ptr - base.data_ptr()) // codes.element_size()
                row[col_scale] = scale_ptr
                items[j] = (row, static_aligned and grad_ptr % 16 == 0, held)
            self.patched_rows += len(patches)
        self._pending = self._last
        self.relaunches += 1
        self.launch(ok)


_FUSED_STEPS: "weakref.WeakKeyDictionary[object, FusedAdamStep]" = weakref.WeakKeyDictionary()


def fused_step_for(optimizer: object) -> FusedAdamStep:
    """The persistent :class:`FusedAdamStep` (pointer-table caches) of ``optimizer``, reset for a new step."""
    fused = _FUSED_STEPS.get(optimizer)
    if fused is None:
        fused = _FUSED_STEPS[optimizer] = FusedAdamStep()
    fused.begin()
    return fused

