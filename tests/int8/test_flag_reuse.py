"""The weight gradient reuses the forward's outlier flags of ``x`` (transposed) for ``xᵀ`` (row layout).

Why this is exact, not an approximation: with square fallback tiles, the tiles of ``xᵀ`` are the tiles of ``x``
transposed — the same elements, so the same tile amaxes, the same median and the same flags; detection would find
exactly the transposed flags. Checked against detection on data with outlier tiles, on Gaussian data, on ragged
shapes and with a NaN (which clears every flag), for both fallback modes; then in the layer: one detection fewer per
step and bit-identical gradients."""

from __future__ import annotations

import pytest
import torch

from lowbit_amp.config import Int8Config, LinearConfig
from lowbit_amp.int8 import row_scaled
from lowbit_amp.int8.row_scaled import check_given_flags, quantize_rows
from lowbit_amp.nn import int8_function
from lowbit_amp.nn.linear import LowBitLinear
from lowbit_amp.quant.granularity import Granularity


def _data(rows: int, cols: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 31 + cols)
    x = torch.randn(rows, cols, generator=g)
    if kind in ("outliers", "nan"):
        x[0:128:7, 130:200] *= 90.0
        x[rows - 40:rows:3, 0:50] *= 300.0
    if kind == "nan":
        x[3, 5] = float("nan")
    return x.bfloat16()


@pytest.mark.parametrize("mode", ["residual", "hp"])
@pytest.mark.parametrize(("rows", "cols", "kind"), [(384, 512, "outliers"), (300, 260, "outliers"),
                                                    (256, 384, "gauss"), (300, 260, "nan")])
def test_forward_flags_transposed_equal_detection_on_the_transpose(rows, cols, kind, mode) -> None:  # type: ignore[no-untyped-def]
    x = _data(rows, cols, kind)
    fwd = quantize_rows(x, "128x128", 6.0, mode=mode)
    detected = quantize_rows(x.t(), "128x128", 6.0, mode=mode)
    given = quantize_rows(x.t(), "128x128", 6.0, mode=mode, flags=fwd.flags.t())
    assert torch.equal(detected.flags, fwd.flags.t())
    if kind == "outliers":
        assert bool(detected.flags.any())
    if kind in ("gauss", "nan"):
        assert not bool(detected.flags.any())
    assert torch.equal(given.flags, detected.flags)
    assert torch.equal(given.main.q, detected.main.q) and torch.equal(given.main.scale, detected.main.scale)
    if mode == "residual":
        assert torch.equal(given.residual.scale, detected.residual.scale)
        mask = detected.element_mask()
        assert torch.equal(given.residual.q[mask], detected.residual.q[mask])


def test_given_flags_of_the_wrong_grid_are_refused() -> None:
    tile = Granularity.parse("128x128")
    check_given_flags(torch.zeros(3, 2, dtype=torch.bool), (300, 200), tile)
    with pytest.raises(ValueError, match="tile grid"):
        check_given_flags(torch.zeros(2, 3, dtype=torch.bool), (300, 200), tile)
    with pytest.raises(ValueError, match="bool"):
        check_given_flags(torch.zeros(3, 2), (300, 200), tile)


@pytest.mark.parametrize("mode", ["residual", "hp"])
def test_layer_detects_twice_per_step_and_gradients_are_unchanged(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = LinearConfig(compute="int8", int8=Int8Config(act_block="row", weight_block="row", fallback=True,
                                                       fallback_mode=mode))
    torch.manual_seed(0)
    layer = LowBitLinear(256, 384, config=cfg)
    x = torch.randn(4, 96, 256)
    x[0, :40, 130:200] *= 80.0  # an outlier tile in x (and so in xᵀ)
    dy = torch.randn(4, 96, 384)
    calls: list[int] = []
    detect = row_scaled.detect_outlier_tiles
    monkeypatch.setattr(row_scaled, "detect_outlier_tiles", lambda t, thr: calls.append(1) or detect(t, thr))

    def grads() -> tuple[torch.Tensor, ...]:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        layer(xi).backward(dy)
        assert layer.weight.grad is not None and xi.grad is not None
        return xi.grad, layer.weight.grad, layer.bias.grad

    reused = grads()
    assert len(calls) == 2  # x (forward) and dy (grad input); xᵀ reuses x's
    assert bool(layer.fallback_fraction > 0)
    monkeypatch.setattr(int8_function, "_flags_for_transpose", lambda a, c: None)
    calls.clear()
    detected = grads()
    assert len(calls) == 3
    for a, b in zip(reused, detected):
        assert torch.equal(a, b)


def test_fraction_into_equals_fraction() -> None:
    """The layer's monitor buffer gets the fallback fraction in one reduction; the same value as ``fraction``."""
    x = _data(300, 260, "outliers")
    op = quantize_rows(x, "128x128", 6.0, mode="hp")
    out = torch.full((), -1.0)
    op.fraction_into(out)
    assert float(out) > 0 and torch.equal(out, op.fraction)
    none = quantize_rows(torch.zeros(0, 260), "128x128", 6.0, mode="hp")
    none.fraction_into(out)
    assert float(out) == 0.0
