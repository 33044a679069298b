"""Which pass-2 kernel the row quantizer picks, and its grid (lowbit_amp/kernels/int8_row_quant.py); pure Python.

Why it matters: the K-split kernel is what made the weight gradient's transposed operands cheap (0.44 -> 0.21 ms for a
14336x8192 xᵀ, H200 run zc), but it cannot produce the residual fallback (whose scale needs whole rows), so routing
a residual call to it would be a wrong result, not a slow one."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.kernels.int8_row_quant import _SPLIT_MIN_PROGRAMS, _kblocks_per_program, _use_split


def test_transposed_inputs_take_the_k_split_kernel_except_with_residual_fallback() -> None:
    x = torch.empty(8192, 4096)
    xt = x.t()
    assert not _use_split(x, True, "hp", None) and not _use_split(x, False, "hp", None)
    assert _use_split(xt, False, "hp", None) and _use_split(xt, True, "hp", None)
    assert _use_split(xt, False, "residual", None)  # no fallback: the mode is irrelevant
    assert not _use_split(xt, True, "residual", None)
    assert _use_split(x, True, "hp", True) and not _use_split(xt, True, "hp", False)
    with pytest.raises(ValueError, match="whole rows"):
        _use_split(xt, True, "residual", True)
    column = torch.empty(5, 1)  # one column: stride 1 in both dims, not a transposed view
    assert not _use_split(column, False, "hp", None)


@pytest.mark.parametrize(("rows", "n_kb"), [(4096, 64), (14336, 64), (12288, 64), (64, 64), (300, 33), (64, 1)])
def test_k_groups_leave_enough_programs_and_cover_k(rows: int, n_kb: int) -> None:
    row_blocks = -(-rows // 64)
    per = _kblocks_per_program(row_blocks, n_kb)
    assert 1 <= per <= 16 and per <= max(1, n_kb)
    groups = -(-n_kb // per)
    assert groups * per >= n_kb  # every K block is some program's
    if per > 2:  # only shrunk down to 2 K blocks per program; above that the grid is large enough
        assert row_blocks * groups >= _SPLIT_MIN_PROGRAMS or per == min(16, n_kb)


def test_anchor_shapes_k_groups() -> None:
    """The 4096-wide anchor's weight-gradient operands (8192 tokens = 64 K blocks): 1024 and 1792 programs."""
    assert _kblocks_per_program(4096 // 64, 64) == 4  # 64 row blocks x 16 K groups
    assert _kblocks_per_program(14336 // 64, 64) == 8  # 224 row blocks x 8 K groups
