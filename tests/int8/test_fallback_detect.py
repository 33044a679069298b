"""The fallback detector's CUDA paths — a kthvalue selection (:func:`lowbit_amp.int8.fallback._flags_by_selection`)
and the fused Triton kernel (:mod:`lowbit_amp.kernels.outlier_flags`: bisection over bit patterns, checked in Triton's CPU
interpreter here and on the GPU) flag the same tiles as ``torch.median``'s definition would, ties, zeros, inf and NaN
included."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit_amp.int8.fallback import _flags_by_selection, detect_outlier_tiles


def _by_median(tile_amax: torch.Tensor, threshold: float) -> torch.Tensor:
    median = tile_amax.flatten().median()
    return (tile_amax > threshold * median) & (median > 0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 2), (3, 5), (64, 32), (7, 33)])
def test_detector_equals_median_rule(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    for trial in range(20):
        amax = torch.rand(shape, generator=gen).square() * 10
        if trial % 4 == 1:
            amax = torch.where(torch.rand(shape, generator=gen) < 0.6, 0.0, amax)  # median often 0
        if trial % 4 == 2:
            amax = (amax * 2).round()  # ties around the median
        if trial % 4 == 3:
            amax.view(-1)[torch.randint(amax.numel(), (1,), generator=gen)] = float("nan")
        for threshold in (1.5, 6.0):
            assert torch.equal(_flags_by_selection(amax, threshold), _by_median(amax, threshold))


def test_detector_flags_the_injected_tile_only() -> None:
    amax = torch.ones(8, 8)
    amax[3, 5] = 50.0
    flags = detect_outlier_tiles(amax, 6.0)
    assert flags.sum() == 1 and flags[3, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused flags kernel runs on CUDA")
def test_detector_equals_median_rule_on_gpu() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in [(64, 32), (128, 112), (3, 5), (256, 128), (1, 1)]:
        for trial in range(10):
            amax = (torch.rand(shape, generator=gen).square() * 10 * (1 + trial % 2)).round()
            if trial == 9:
                amax[0, 0] = float("nan")
            amax = amax.cuda()
            assert torch.equal(detect_outlier_tiles(amax, 6.0), _by_median(amax, 6.0))  # the kernel
            assert torch.equal(_flags_by_selection(amax, 6.0), _by_median(amax, 6.0))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_flags_kernel_in_interpreter_equals_median_rule() -> None:
    script = textwrap.dedent("""
        import torch
        from lowbit_amp.kernels.outlier_flags import triton_outlier_flags

        def ref(a, t):
            m = a.flatten().median()
            return (a > t * m) & (m > 0)

        g = torch.Generator().manual_seed(0)
        for shape in [(1, 1), (1, 2), (2, 2), (3, 5), (64, 32), (7, 33), (128, 112)]:
            for trial in range(8):
                a = torch.rand(shape, generator=g).square() * 10
                if trial % 4 == 1:
                    a = torch.where(torch.rand(shape, generator=g) < 0.6, 0.0, a)
                if trial % 4 == 2:
                    a = (a * 2).round()
                if trial % 4 == 3:
                    a.view(-1)[0] = float("nan")
                if trial == 6:
                    a.view(-1)[-1] = float("inf")
                for t in (1.5, 6.0, 5.3):
                    assert torch.equal(triton_outlier_flags(a, t), ref(a, t)), (shape, trial, t)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_kernel_size_limit_is_the_dispatch_limit() -> None:
    from lowbit_amp.int8 import fallback
    from lowbit_amp.kernels.outlier_flags import MAX_TILES, triton_outlier_flags

    assert fallback._FLAGS_KERNEL_TILES == MAX_TILES
    with pytest.raises(ValueError, match="detect_outlier_tiles"):
        triton_outlier_flags(torch.zeros(MAX_TILES + 1), 6.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_to_hp_rounds_on_the_bits_exactly_as_the_cast(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """While compiling, hp fallback operands are rounded to bf16 on the bits (so no compiler pass can drop the round
    trip); that path must give ``x.to(bfloat16)``'s bits: random values over 60 binades, round-to-even ties, values
    that round up into the next binade or to inf, subnormals, signed zeros, inf and NaN."""
    from lowbit_amp.int8.fallback import to_hp

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4099, generator=gen) * torch.exp2(torch.randint(-30, 30, (4099,), generator=gen).float())
    one = torch.tensor(1.0).view(torch.int32)
    ties = (one + torch.tensor([0x8000, 0x18000, 0x7FFF, 0xFFFF, 0x17FFF])).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3.3895e38, 3.4e38, -3.4028e38, float("inf"), float("-inf"),
                          float("nan"), 65504.0, -1.5])
    x = torch.cat([x, ties, -ties, edges]).to(dtype)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = to_hp(x)
    want = x.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16))
    bf = x.to(torch.bfloat16)
    assert to_hp(bf) is bf
