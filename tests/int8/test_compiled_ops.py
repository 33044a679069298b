"""The INT8 row-layout ops for compiled graphs (lowbit_amp/int8/compiled_ops.py) on CPU: schema and fake (meta)
implementations agree with the real ones (``torch.library.opcheck``), and the ops return what the eager entry points
return, for no fallback, residual and hp, with detected and with given flags. GPU: test_compiled_ops_gpu.py."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.int8.activation import _quantize_rows
from lowbit_amp.int8.compiled_ops import compiled_quantize_rows, compiled_row_mm
from lowbit_amp.int8.fallback import FallbackOperand
from lowbit_amp.int8.reference_gemm import int8_block_mm_nt
from lowbit_amp.int8.row_scaled import quantize_rows
from lowbit_amp.quant.granularity import Granularity

TILE = Granularity(128, 128)


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 260, generator=g)
    x[0:128:7, 130:200] *= 90.0
    return x.bfloat16()


@pytest.mark.parametrize("fallback,mode", [(False, "hp"), (True, "residual"), (True, "hp")])
@pytest.mark.parametrize("given", [False, True])
def test_ops_match_the_eager_entry_points(fallback: bool, mode: str, given: bool) -> None:
    x = _x()
    flags = quantize_rows(x, "128x128", 6.0).flags if (given and fallback) else None
    op = compiled_quantize_rows(x, TILE, 6.0, fallback, mode, flags)
    ref = _quantize_rows(x, TILE, 6.0, fallback, mode, "nearest", None, "auto", flags)
    assert type(op) is type(ref)
    if fallback:
        assert isinstance(op, FallbackOperand) and isinstance(ref, FallbackOperand)
        assert op.mode == ref.mode and torch.equal(op.flags, ref.flags) and bool(op.flags.any())
        assert torch.equal(op.main.q, ref.main.q) and torch.equal(op.main.scale, ref.main.scale)
        if mode == "residual":
            assert torch.equal(op.residual.q, ref.residual.q) and torch.equal(op.residual.scale, ref.residual.scale)
        else:
            assert torch.equal(op.hp, ref.hp)
    else:
        assert torch.equal(op.q, ref.q) and torch.equal(op.scale, ref.scale)
    w = torch.randn(96, 260) * 0.05
    wq = quantize_rows(w)
    bias = torch.randn(96)
    out = compiled_row_mm(op, wq, torch.float32, bias, w)
    assert torch.equal(out, int8_block_mm_nt(ref, wq, torch.float32, bias, b_hp=w))


def test_ops_pass_opcheck() -> None:
    x = _x()
    flags = quantize_rows(x, "128x128", 6.0).flags
    for fallback, hp, given in [(False, False, None), (True, False, None), (True, True, None), (True, True, flags)]:
        torch.library.opcheck(torch.ops.lowbit_amp.int8_quantize_rows.default, (x, 128, 128, fallback, 6.0, hp, given),
                              test_utils=("test_schema", "test_faketensor"))
    op = compiled_quantize_rows(x, TILE, 6.0, True, "residual", None)
    w = torch.randn(96, 260) * 0.05
    wq = quantize_rows(w)
    args = (op.main.q, op.main.scale, wq.q, wq.scale, op.flags, op.residual.q, op.residual.scale, None, None, None,
            128, 128, torch.bfloat16)
    torch.library.opcheck(torch.ops.lowbit_amp.int8_row_mm.default, args, test_utils=("test_schema", "test_faketensor"))


def test_given_flags_are_not_returned_by_the_op() -> None:
    """No output may alias an input: given flags come back as an empty tensor and the caller keeps its own."""
    x = _x()
    flags = quantize_rows(x, "128x128", 6.0).flags
    outs = torch.ops.lowbit_amp.int8_quantize_rows(x, 128, 128, True, 6.0, True, flags)
    assert outs[2].numel() == 0
    assert compiled_quantize_rows(x, TILE, 6.0, True, "hp", flags).flags is flags

