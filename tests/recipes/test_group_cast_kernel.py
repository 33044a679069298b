"""The Triton group cast of COAT's FP8 activation storage (lowbit_amp/kernels/group_cast.py) in Triton's CPU
interpreter, bit for bit against the reference ops (lowbit_amp/recipes/fp8_activations.py): codes, shifts, tensor
scale and the decoded values, on shapes that are and are not multiples of the group size, bf16/fp16/fp32, spread
magnitudes, all-zero tensors, tiny groups, NaN and inf. The interpreter uses the kernel's bit-exact E4M3 encoder (its
own FP8 casts round wrongly); tests/gpu/test_group_cast_gpu.py checks the hardware path. Skipped without Triton."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_group_cast_kernels_in_interpreter_are_bitwise_the_reference() -> None:
    script = textwrap.dedent("""
        import torch
        import lowbit_amp.recipes.fp8_activations as fa
        from lowbit_amp.kernels.group_cast import quantize_flat, dequantize_into

        def reference(x, gs):
            fa.FUSED_GROUP_CAST = False
            return fa.quantize_groups(x, gs)

        g = torch.Generator().manual_seed(0)
        cases = []
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for numel in (1000, 4096, 37, 16):
                x = torch.randn(numel, generator=g) * torch.logspace(-4, 3, numel)
                cases.append((x.to(dtype), 16))
        x = torch.randn(999, generator=g); x[5:40] = 0; x[100:116] = 1e-30; cases.append((x, 16))
        cases.append((torch.randn(640, generator=g).bfloat16(), 32))
        cases.append((torch.zeros(300), 16))
        x = torch.randn(300, generator=g); x[7] = float("nan"); cases.append((x, 16))
        x = torch.randn(300, generator=g); x[9] = float("inf"); cases.append((x, 16))
        checked = 0
        for x, gs in cases:
            ref = reference(x, gs)
            codes, shifts, ts = quantize_flat(x.contiguous(), gs)
            assert torch.equal(shifts, ref.shifts), (x.dtype, x.numel(), shifts, ref.shifts)
            same = torch.equal(ts, ref.tensor_scale) or bool(ts.isnan() and ref.tensor_scale.isnan())
            assert same, (ts, ref.tensor_scale)
            if not ref.tensor_scale.isnan():
                assert torch.equal(codes.view(torch.uint8), ref.codes.view(torch.uint8)), (x.dtype, x.numel())
                out = torch.empty(codes.numel(), dtype=x.dtype)
                dequantize_into(codes, shifts, ts, out)
                fa.FUSED_GROUP_CAST = False
                back = fa.dequantize_groups(ref)
                assert torch.equal(out[: x.numel()], back.reshape(-1)), (x.dtype, x.numel())
            checked += 1
        # through the recipe's entry points with the fused path switched on: same PackedActivation, same values back
        fa.FUSED_GROUP_CAST = True
        x = (torch.randn(3, 50, 48, generator=g) * 5).bfloat16().transpose(1, 2)  # dense, non-contiguous
        packed = fa.quantize_groups(x, 16)
        fa.FUSED_GROUP_CAST = False
        ref = fa.quantize_groups(x, 16)
        assert torch.equal(packed.codes.view(torch.uint8), ref.codes.view(torch.uint8))
        fa.FUSED_GROUP_CAST = True
        assert torch.equal(fa.dequantize_groups(packed), fa.dequantize_groups(ref))
        print("ok", checked)
    """)
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
