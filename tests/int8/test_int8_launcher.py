"""The INT8 kernels' cached launcher (lowbit_amp.kernels.int8_gemm._Launcher) and the fallback index kernel.

Why: the launcher skips Triton's per-call dispatch after the first call of a specialization, so its cache key must
separate every call Triton would compile differently (else a binary specialized for, e.g., 16-byte aligned operands
would run on unaligned ones). The cached path needs CUDA; here it runs against a stand-in kernel, and the key is
checked against Triton's own specialization where Triton is importable. The fallback index kernel now writes every
entry of its index rows (no zero-fill launch); checked in Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit_amp.kernels import int8_gemm
from lowbit_amp.kernels.int8_gemm import _Launcher, _spec

_HAS_TRITON = importlib.util.find_spec("triton") is not None


class _Compiled:
    function = "fn"
    packed_metadata = "meta"

    def __init__(self, log: list) -> None:
        self.log = log

    def run(self, *args: object) -> None:
        self.log.append(("run", args))


class _Kernel:
    """Stands in for a JITFunction: ``kernel[grid](...)`` 'compiles' and returns a compiled kernel."""

    arg_names = ["x_ptr", "n", "stride", "BLOCK", "MODE"]

    def __init__(self) -> None:
        self.log: list = []

    def __getitem__(self, grid: tuple):
        def launch(*args: object, **kwargs: object) -> _Compiled:
            self.log.append(("compile", grid, args, kwargs))
            return _Compiled(self.log)

        return launch


@pytest.fixture
def launcher(monkeypatch: pytest.MonkeyPatch):
    device = {"index": 0}
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: device["index"], raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    monkeypatch.setattr(int8_gemm, "_launch_hooked", lambda: False)
    launch = _Launcher("stand_in")
    launch.kernel, launch.direct = _Kernel(), True
    return launch, device


def test_launcher_compiles_once_per_specialization_then_launches_directly(launcher) -> None:
    launch, device = launcher
    log = launch.kernel.log
    x = torch.zeros(64)
    launch((4,), (x,), (32, 64), {"BLOCK": 128, "MODE": 1}, num_warps=4)
    assert [e[0] for e in log] == ["compile"]
    y = torch.ones(64)
    launch((7, 2), (y,), (32, 64), {"BLOCK": 128, "MODE": 1}, num_warps=4)  # same key: another tensor, same spec
    assert log[-1] == ("run", (7, 2, 1, 1000, "fn", "meta", None, None, None, y, 32, 64, 128, 1))
    before = len(log)
    variants = [
        ((x[1:],), (32, 64), {"BLOCK": 128, "MODE": 1}, {"num_warps": 4}),  # 4-byte offset: not 16-byte aligned
        ((x.double(),), (32, 64), {"BLOCK": 128, "MODE": 1}, {"num_warps": 4}),  # dtype
        ((x,), (1, 64), {"BLOCK": 128, "MODE": 1}, {"num_warps": 4}),  # int == 1 is a constexpr to Triton
        ((x,), (33, 64), {"BLOCK": 128, "MODE": 1}, {"num_warps": 4}),  # not divisible by 16
        ((x,), (2**31 + 16, 64), {"BLOCK": 128, "MODE": 1}, {"num_warps": 4}),  # 64-bit
        ((x,), (32, 64), {"BLOCK": 64, "MODE": 1}, {"num_warps": 4}),  # constexpr
        ((x,), (32, 64), {"BLOCK": 128, "MODE": 1}, {"num_warps": 8}),  # compile option
        ((x,), (32, 64), {"BLOCK": 128, "MODE": 1}, {"num_warps": 4, "maxnreg": 128}),  # extra option
    ]
    for tensors, ints, constexprs, options in variants:
        launch((4,), tensors, ints, constexprs, **options)
        assert log[-1][0] == "compile", (tensors, ints, constexprs, options)
    device["index"] = 1  # a compiled binary belongs to one device
    launch((4,), (x,), (32, 64), {"BLOCK": 128, "MODE": 1}, num_warps=4)
    assert log[-1][0] == "compile" and len(log) == before + len(variants) + 1
    launch((4,), (x,), (32, 64), {"BLOCK": 128, "MODE": 1}, num_warps=4)
    assert log[-1][0] == "run" and log[-1][1][3] == 1001  # device 1's stream


def test_launcher_rejects_arguments_out_of_signature_order(launcher) -> None:
    launch, _ = launcher
    with pytest.raises(TypeError, match="signature order"):
        launch((1,), (torch.zeros(4),), (32, 64), {"MODE": 1, "BLOCK": 128})


def test_launcher_uses_tritons_path_when_not_a_jit_function() -> None:
    """The interpreter's kernels (TRITON_INTERPRET=1) and launch hooks go through ``kernel[grid]`` every time."""
    launch = _Launcher("stand_in")
    launch.kernel, launch.direct = _Kernel(), False
    for _ in range(3):
        launch((2,), (torch.zeros(4),), (32, 64), {"BLOCK": 128, "MODE": 1}, num_warps=4)
    assert [e[0] for e in launch.kernel.log] == ["compile"] * 3


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
def test_spec_separates_what_triton_specializes_on() -> None:
    """Two pointer-like arguments share a cache key iff Triton specializes them identically (ints are keyed by
    value in the launcher, and ``_spec`` of ints by Triton's classes)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.tools.tensor_descriptor import TensorDescriptor

    t = torch.zeros(256, 256, dtype=torch.int8)
    args = [t, t[1:], t[:, 1:], t.float(), t.float()[:, 3:], 0, 1, 2, 16, 17, 48, 2**31 - 16, 2**31, 2**33 + 1, -16,
            -(2**31), -(2**31) - 16, None, TensorDescriptor.from_tensor(t, [128, 128]),
            TensorDescriptor.from_tensor(t[:, :192], [128, 64]), TensorDescriptor.from_tensor(t.float(), [64, 64]),
            TensorDescriptor.from_tensor(t[:128], [128, 128])]
    for a in args:
        for b in args:
            same_triton = native_specialize_impl(BaseBackend, a, False, True, True) == native_specialize_impl(
                BaseBackend, b, False, True, True)
            assert (_spec(a) == _spec(b)) == same_triton, (a, b)


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
def test_fallback_index_in_interpreter() -> None:
    """Each row: the flagged K blocks ascending (``count`` of them), then the others ascending — a permutation."""
    script = textwrap.dedent("""
        import torch
        from lowbit_amp.kernels.int8_gemm import fallback_index
        g = torch.Generator().manual_seed(0)
        for rows, n_kb in ((1, 1), (3, 5), (4, 17), (2, 16)):
            flags = torch.rand(rows, n_kb, generator=g) < 0.4
            flags[0] = False
            counts, order = fallback_index(flags)
            assert order.shape == (rows, n_kb)
            for r in range(rows):
                flagged = torch.nonzero(flags[r]).flatten().int()
                others = torch.nonzero(~flags[r]).flatten().int()
                assert int(counts[r]) == flagged.numel()
                assert torch.equal(order[r], torch.cat([flagged, others])), (rows, n_kb, r, order[r], flags[r])
        print("ok")
    """)
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_launcher_keys_ints_by_value(launcher) -> None:
    """Another shape with the same Triton specialization is a new key (one pass through ``kernel[grid]``, where
    Triton reuses its binary), never a launch with a binary compiled for another specialization."""
    launch, _ = launcher
    log = launch.kernel.log
    x = torch.zeros(64)
    launch((4,), (x,), (32, 64), {"BLOCK": 128, "MODE": 1})
    launch((4,), (x,), (48, 64), {"BLOCK": 128, "MODE": 1})
    launch((4,), (x,), (48, 64), {"BLOCK": 128, "MODE": 1})
    assert [e[0] for e in log] == ["compile", "compile", "run"]
    launch.MAX_KEYS = 2
    launch((4,), (x,), (64, 64), {"BLOCK": 128, "MODE": 1})  # over the cap: cleared, then this key stored
    assert len(launch.cache) == 1
