"""Host-side cost of a training step: no host synchronisation once warm, and op budgets for the per-layer hot spots.

Why: at small widths a GPU step is host-bound, so every extra eager op per layer (a kernel launch on CUDA) and every
host sync (a full GPU stall) shows up in the step time (docs/limitations.md, "Host overhead of O2/O3 on small
models"). The counts are taken with a dispatch mode on CPU, where the same ops run as on the reference CUDA path.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit_amp.formats import get_format
from lowbit_amp.grads.fp8_grad import encode_fp8
from lowbit_amp.optim.update import all_finite
from lowbit_amp.quant.cast import compute_scale

aten = torch.ops.aten
# Ops that copy a device value to the host (item(), bool(t), float(t), nonzero's output size)
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default}
# Shape-only ops launch nothing
FREE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.detach.default,
        aten.alias.default, aten.t.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
        aten.select.int, aten.slice.Tensor, aten.as_strided.default, aten.unbind.int}


def _inside_torch_optim() -> bool:
    """Whether the op comes from torch's own optimizer (O0/O1/int8 keep the user's AdamW, whose non-capturable step
    counters are CPU tensors read with .item(): no device sync, and not lowbit_amp's code)."""
    frame = sys._getframe(2)
    while frame is not None:
        if f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not (func in SYNCING and _inside_torch_optim()):
            self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in FREE)

    @property
    def syncs(self) -> dict:
        return {str(op): n for op, n in self.ops.items() if op in SYNCING}


def _train_step(level: str):  # type: ignore[no-untyped-def]
    """The warm step of tools/profile_host_step.py (one definition of it), at a tiny CPU shape."""
    path = Path(__file__).resolve().parent.parent / "tools" / "profile_host_step.py"
    spec = importlib.util.spec_from_file_location("profile_host_step", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shape = argparse.Namespace(block_size=16, n_layer=2, n_head=4, n_embd=64, batch_size=2)
    return tool.build(level, shape, torch.device("cpu"))


@pytest.mark.parametrize("level", ["O0", "O1", "O2", "O3", "int8"])
def test_warm_training_step_never_syncs_with_the_host(level: str) -> None:
    step = _train_step(level)
    for _ in range(2):  # the delayed-scaling states warm up after the first step (one sync there, by design)
        step()
    with OpCounter() as counter:
        step()
    assert counter.syncs == {}, f"{level}: a warm step copied device values to the host: {counter.syncs}"


def test_compute_scale_op_budget() -> None:
    """Runs for every current-scaled cast, FP8 weight gradient and history roll; it was 13 ops (ones_like/where
    around the division, and isfinite, which is four kernels)."""
    amax = torch.tensor([0.0, 1.5, math.inf, math.nan, 3e-41])
    with OpCounter() as counter:
        compute_scale(amax, "e4m3")
    assert counter.launches <= 8, counter.ops
    prev = torch.ones(5)
    with OpCounter() as counter:
        compute_scale(amax, "e4m3", prev_scale=prev)
    assert counter.launches <= 7, counter.ops


def test_fp8_weight_grad_encode_op_budget() -> None:
    """Runs once per FP8 layer per backward at O2/O3: 24 aten ops here cost ~10 ms per step on an H200 host (6x512
    tiny GPT, 2026-12-01); 16 now."""
    grad = torch.randn(32, 48)
    with OpCounter() as counter:
        encode_fp8(grad, get_format("e4m3"))
    assert counter.launches <= 16, counter.ops


def test_all_finite_is_batched_per_dtype() -> None:
    """The optimizer's skip check costs the same few ops for 4 or 400 parameters."""
    def launches(n: int) -> int:
        items = [torch.tensor(2.0) for _ in range(n)] + [torch.tensor(1.0, dtype=torch.bfloat16) for _ in range(n)]
        with OpCounter() as counter:
            assert bool(all_finite(items, torch.device("cpu")))
        return counter.launches

    assert launches(200) == launches(2)
    cpu = torch.device("cpu")
    scales = [torch.tensor(2.0), torch.tensor(0.5)]
    amaxes = [torch.tensor(1.0, dtype=torch.bfloat16)]
    assert not bool(all_finite(scales + [torch.tensor(math.inf, dtype=torch.bfloat16)], cpu))
    assert not bool(all_finite([torch.tensor(math.nan)] + amaxes, cpu))
    assert not bool(all_finite(scales + [torch.tensor(False)], cpu))
    assert bool(all_finite(scales + amaxes + [torch.tensor(True)], cpu))
    assert bool(all_finite([], cpu))


@pytest.mark.parametrize("level, budget", [("int8", 1850), ("configs/int8_block.yaml", 1700)])
def test_int8_warm_step_op_budget(level: str, budget: int) -> None:
    """A warm int8 step of the 2-layer tiny GPT on CPU (the reference INT8 path: quantizer, fallback, GEMM). Block
    layout: 1942 ops before expand_blocks and the hoisted hp conversions (2026-12-02), 1674 after (1690 with row-major
    codes). The row layout (the preset since 2026-12-02) measured 1842. On CUDA the quantizers, fallback detection and
    GEMMs are Triton kernels instead, but every op counted here outside them runs there too."""
    step = _train_step(level)
    for _ in range(2):
        step()
    with OpCounter() as counter:
        step()
    assert counter.launches <= budget, counter.launches
