"""The fused row-scaled INT8 quantizer (:mod:`lowbit_amp.kernels.int8_row_quant`) in Triton's CPU interpreter against
:func:`lowbit_amp.int8.row_scaled.quantize_rows`: codes, scales, flags and the residual's scale equal bit for bit, the
residual's codes inside flagged tiles too (outside them the kernel leaves the buffer unwritten). Ragged shapes, every
K block, injected outlier tiles, Gaussian data, special values (inf, NaN, all-zero rows, a row whose only non-zeros
sit in a flagged tile), a transposed input, and the 4-row programs the GPU uses for small M. Skipped where Triton is
not installed. GPU: test_row_quant_gpu.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_row_quantizer_in_interpreter_matches_reference() -> None:
    script = textwrap.dedent("""
        import torch
        from lowbit_amp.int8.fallback import FallbackOperand
        from lowbit_amp.int8.row_scaled import ROW, quantize_rows
        from lowbit_amp.kernels.int8_row_quant import triton_quantize_rows

        def check(x, bk, fallback, threshold=6.0, has_nan=False, **kw):
            tri = triton_quantize_rows(x, bk, fallback, threshold, **kw)
            if not fallback:
                ref = quantize_rows(x)
                assert tri.block == ROW and tri.scale.shape == (x.shape[0], 1)
                assert torch.equal(ref.q, tri.q) and torch.equal(ref.scale, tri.scale)
                return 0
            ref = quantize_rows(x, f"128x{bk}", threshold)
            assert isinstance(tri, FallbackOperand) and tri.mode == "residual" and tri.tile == ref.tile
            assert tri.main.block == ROW and tri.residual.block == ROW and tri.residual.scale.shape == (x.shape[0], 1)
            assert torch.equal(ref.flags, tri.flags)
            assert torch.equal(ref.main.q, tri.main.q) and torch.equal(ref.main.scale, tri.main.scale)
            assert torch.equal(ref.residual.scale, tri.residual.scale)
            mask = ref.element_mask()
            assert torch.equal(ref.residual.q[mask], tri.residual.q[mask])
            if not has_nan:
                assert torch.equal(ref.dequantize(), tri.dequantize())
            hp_ref = quantize_rows(x, f"128x{bk}", threshold, mode="hp")
            hp_tri = triton_quantize_rows(x, bk, True, threshold, mode="hp", **kw)
            assert hp_tri.mode == "hp" and hp_tri.residual is None and hp_tri.hp.dtype == torch.bfloat16
            assert torch.equal(hp_ref.flags, hp_tri.flags) and torch.equal(hp_ref.main.scale, hp_tri.main.scale)
            assert torch.equal(hp_ref.main.q, hp_tri.main.q)  # flagged tiles zeroed in the same pass
            return int(ref.flags.sum())

        def check_split(x, bk, threshold=6.0, **kw):
            # the K-split pass 2 (transposed inputs' default): no fallback and hp only
            tri = triton_quantize_rows(x, bk, False, threshold, split=True, **kw)
            ref = quantize_rows(x)
            assert torch.equal(ref.q, tri.q) and torch.equal(ref.scale, tri.scale)
            hp_ref = quantize_rows(x, f"128x{bk}", threshold, mode="hp")
            hp_tri = triton_quantize_rows(x, bk, True, threshold, mode="hp", split=True, **kw)
            assert torch.equal(hp_ref.flags, hp_tri.flags) and torch.equal(hp_ref.main.scale, hp_tri.main.scale)
            assert torch.equal(hp_ref.main.q, hp_tri.main.q)
            return int(hp_ref.flags.sum())

        g = torch.Generator().manual_seed(0)
        # Ragged (200 = 128 + 72 rows, K = 300 not a multiple of any block), injected outlier tiles, every K block.
        for bk in (64, 128, 256):
            x = torch.randn(200, 300, generator=g)
            x[0:128:9, 140:160] *= 100.0
            x[130:200:7, 260:290] *= 300.0
            x = x.bfloat16()
            assert check(x, bk, True) > 0, bk
            check(x, bk, False)
            assert check_split(x, bk) > 0 and check_split(x, bk, rows_per_program=32) > 0
        # Gaussian data: nothing flagged at the default threshold; a low threshold flags some tiles of plain data.
        x = torch.randn(300, 520, generator=g)
        assert check(x, 128, True) == 0
        assert check(x, 128, True, threshold=1.05) > 0 and check(x, 64, True, threshold=1.05) > 0
        check(x, 64, False)
        # Special values; 4-row programs (the GPU's choice for small M) once.
        x = torch.randn(200, 300, generator=g)
        x[0:128:9, 140:160] *= 100.0
        x[5, :] = 0.0
        x[5, 140:150] = 700.0  # only flagged-tile values: the row scale comes from the whole row
        x[7, :] = 0.0
        x[11, 200] = float("inf")
        x[12, 150] = -float("inf")
        x[13, 4] = 1e-40
        assert check(x, 128, True) > 0 and check(x.bfloat16(), 128, True, rows_per_program=4) > 0
        check(x, 128, False)
        check(x, 128, False, rows_per_program=4)
        x[20, 146] = float("nan")  # a NaN tile amax makes the median NaN: nothing falls back (as the reference)
        x[150, 3] = float("nan")
        check(x, 128, True, has_nan=True)
        check(x, 128, False)
        check_split(x, 128)
        # A transposed (non-contiguous) input; fp16 with 8-row programs; tiny and empty inputs.
        xt = torch.randn(300, 200, generator=g).t()
        xt[0:128:5, 0:60] *= 50.0
        assert check(xt, 64, True) > 0  # hp and no fallback: the K-split kernel, by default for this layout
        check(xt, 64, False)
        xt = torch.randn(2100, 200, generator=g).t()  # 33 K blocks of 64: K groups of 2, the last one ragged
        xt[60:128:5, 0:900] *= 50.0
        assert check_split(xt, 64) > 0
        # the forward's flags of x, transposed, given for xᵀ (the weight gradient's reuse): no detection, same result
        x = torch.randn(300, 260, generator=g)
        x[0:128:7, 130:200] *= 90.0
        x = x.bfloat16()
        fwd = quantize_rows(x, "128x128", 6.0)
        for mode in ("residual", "hp"):
            ref = quantize_rows(x.t(), "128x128", 6.0, mode=mode)
            tri = triton_quantize_rows(x.t(), 128, True, 6.0, mode=mode, flags=fwd.flags.t())
            assert bool(ref.flags.any()) and torch.equal(ref.flags, tri.flags)
            assert torch.equal(ref.main.q, tri.main.q) and torch.equal(ref.main.scale, tri.main.scale)
        try:
            triton_quantize_rows(xt, 64, True, 6.0, split=True)
            raise AssertionError("split=True with residual fallback must be refused")
        except ValueError as exc:
            assert "whole rows" in str(exc)
        x = torch.randn(256, 512, generator=g)
        x[130:200:3, 300:400] *= 80.0
        assert check(x.half(), 256, True, rows_per_program=8) > 0
        check(torch.randn(3, 5, generator=g), 64, True)
        check(torch.randn(1, 1, generator=g), 64, False)
        assert triton_quantize_rows(torch.randn(0, 5), 64, True, 6.0).main.q.shape == (0, 5)
        print("ok")
    """)
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_row_quant_kernels_compile_for_sm90_without_fma() -> None:
    """Both kernels compile for sm_90 without a GPU (Triton's bundled ptxas), and the row kernel, compiled with the
    launcher's ``enable_fp_fusion=False``, has no FMA: a fused ``x - q · (1/s)`` would round once where the reference
    rounds twice (with fusion on, its PTX has FMAs)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowbit_amp.kernels import _int8_row_quant_triton as k

    def compile_(fn, pointers, constexprs, **options):
        sig = {name: pointers.get(name, "i32") for name in fn.arg_names}
        sig.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options})

    pointers = {"x_ptr": "*bf16", "amax_ptr": "*fp32", "tile_ptr": "*fp32", "flag_ptr": "*u8", "q_ptr": "*i8",
                "scale_ptr": "*fp32", "q2_ptr": "*i8", "scale2_ptr": "*fp32"}
    try:
        compile_(k.row_block_amax_kernel, pointers, {"TILE_M": 128, "RB": 64, "BK": 128})
        row = compile_(k.row_quantize_kernel, pointers,
                       {"FALLBACK": True, "TILE_M": 128, "RB": 16, "BK": 128, "CH": 64, "N_KB": 32, "STAGES": 3,
                        "HP": False}, enable_fp_fusion=False)
        compile_(k.row_quantize_kernel, pointers, {"FALLBACK": True, "TILE_M": 128, "RB": 16, "BK": 128, "CH": 64,
                                                   "N_KB": 32, "STAGES": 3, "HP": True}, enable_fp_fusion=False)
        for fallback in (False, True):
            split = compile_(k.row_quantize_split_kernel, pointers,
                             {"FALLBACK": fallback, "TILE_M": 128, "RB": 64, "BK": 128, "CH": 64, "N_KB": 64,
                              "KB_PER": 8, "STAGES": 3, "HP": fallback}, enable_fp_fusion=False, num_warps=8)
            assert split.asm["cubin"]
    except Exception as exc:  # no NVIDIA backend in this Triton build
        if "backend" in str(exc).lower() or "ptxas" in str(exc).lower():
            pytest.skip(f"cannot compile for sm_90 here: {exc}")
        raise
    assert not re.search(r"\bfma\.", row.asm["ptx"])
