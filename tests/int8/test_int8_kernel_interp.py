"""The Triton INT8 GEMM configurations in Triton's CPU interpreter (tiny shapes; GPU-less check of indexing, the TMA
descriptor path, the fallback loop and the magic-offset conversion). Skipped where Triton is not installed.

Tolerance: max abs error / max |reference| < 1e-6 (FP32 summation order only; INT32 products are exact).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_configs_in_interpreter_match_reference() -> None:
    script = textwrap.dedent("""
        import dataclasses, torch
        from lowbit_amp.int8 import quantize_blocks, quantize_with_fallback
        from lowbit_amp.int8.reference_gemm import reference_block_mm_nt
        from lowbit_amp.kernels.int8_gemm import CONFIGS, DEFAULT_CONFIG, triton_block_mm_nt, triton_quantize_act
        g = torch.Generator().manual_seed(0)
        x = torch.randn(200, 384, generator=g).bfloat16()
        x[0:128:9, 140:160] *= 100
        w = torch.randn(264, 384, generator=g)
        ref = quantize_with_fallback(x, "1x128", "128x128", 6.0, "residual")
        tri = triton_quantize_act(x, 128, True, 6.0, "residual")
        assert torch.equal(ref.flags, tri.flags) and int(ref.flags.sum()) == 1
        assert torch.equal(ref.main.q, tri.main.q) and torch.equal(ref.main.scale, tri.main.scale)
        m = ref.element_mask()
        assert torch.equal(ref.residual.q[m], tri.residual.q[m])
        cfgs = {name: CONFIGS[name] for name in (DEFAULT_CONFIG, "n128_w4_s3", "n128_w4_s3_magic")}
        cfgs["ptr"] = dataclasses.replace(CONFIGS[DEFAULT_CONFIG], use_tma=False)
        for name, cfg in cfgs.items():
            for block in ("128x128", "1x128"):
                wq = quantize_blocks(w, block)
                bias = torch.randn(264, generator=g)
                for a_ref, a_tri in ((ref, tri), (ref.main, tri.main)):
                    yr = reference_block_mm_nt(a_ref, wq, torch.float32, bias=bias)
                    yt = triton_block_mm_nt(a_tri, wq, torch.float32, bias=bias, config=cfg)
                    err = float((yr - yt).abs().max() / yr.abs().max())
                    assert err < 1e-6, (name, block, err)
        print("ok")
    """)
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
