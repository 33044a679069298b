"""Stochastic rounding as a cast option of every FP8 operand (``linear.{input,weight,grad_output}.rounding``,
arXiv 1905.12334): it reaches the casts, it is unbiased where round-to-nearest is not, and bad values are clear errors.

The bias test uses a static scale of 1 so the grid is known: E5M2 codes near 1 are 1.0 and 1.25, so an output gradient
of 1.1 everywhere rounds to 1.0 (-9.1%) with round-to-nearest, while stochastic rounding gives 1.25 with probability
0.4 and 1.0 with 0.6: mean 1.1. With an identity weight (exact in E4M3) the input gradient is the cast output gradient.
Measured: RN mean 1.0 exactly; SR mean over 64x64x50 draws within 0.002 of 1.1 (tolerance 0.01 = 4.5 sigma of the mean).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit_amp as amp
from lowbit_amp.config import ConfigError

STATIC = {"algo": "static", "static_scale": 1.0}


def _layer(rounding: str) -> nn.Module:
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(64))
    model = nn.Sequential(lin)
    return amp.initialize(model, opt_level="O1", overrides={
        "modules.min_gemm_size": 0, "linear.fused_cast": False,
        "linear.input.scaling": STATIC, "linear.weight.scaling": STATIC, "linear.grad_output.scaling": STATIC,
        "linear.grad_output.rounding": rounding})


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_output_gradient_rounding_bias(rounding: str) -> None:
    torch.manual_seed(0)
    model = _layer(rounding)
    assert model[0].grad_output_scaling.rounding == rounding
    assert ("/SR" in repr(model[0])) == (rounding == "stochastic")
    x = torch.ones(64, 64, requires_grad=True)
    grads = []
    for _ in range(50):
        x.grad = None
        model(x).backward(torch.full((64, 64), 1.1))
        grads.append(x.grad.clone())
    mean = torch.stack(grads).mean().item()
    if rounding == "nearest":
        assert mean == 1.0 and all(torch.equal(g, grads[0]) for g in grads)  # deterministic, biased by -9.1%
    else:
        assert abs(mean - 1.1) < 0.01, mean  # unbiased
        values = torch.stack(grads).unique()
        assert set(values.tolist()) == {1.0, 1.25}  # only the two neighbouring E5M2 codes


def test_stochastic_input_cast_is_unbiased() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(64))
    model = amp.initialize(nn.Sequential(lin), opt_level="O1", overrides={
        "modules.min_gemm_size": 0, "linear.input.scaling": STATIC, "linear.weight.scaling": STATIC,
        "linear.input.rounding": "stochastic"})
    x = torch.full((64, 64), 1.06)  # E4M3 codes near 1: 1.0, 1.125 -> P(up) = 0.48
    with torch.no_grad():
        mean = torch.stack([model(x) for _ in range(50)]).mean().item()
    assert abs(mean - 1.06) < 0.005, mean


def test_bad_rounding_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="rounding"):
        amp.initialize(nn.Sequential(nn.Linear(16, 16)), opt_level="O1", overrides={"linear.input.rounding": "up"})


def test_weight_gradient_encode_rounds_stochastically_when_asked() -> None:
    """``linear.weight_grad_rounding: stochastic`` (O2+): the FP8 weight-gradient encode is unbiased (1.06 between the
    E4M3 codes 1.0 and 1.125, with 448 fixing the scale at 1), and it reaches the layer's backward (two identical
    backward passes give different codes, where round-to-nearest gives the same)."""
    from lowbit_amp.formats import E4M3
    from lowbit_amp.grads.fp8_grad import encode_fp8

    torch.manual_seed(2)
    hp = torch.full((256, 256), 1.06)
    hp[0, 0] = 448.0
    codes, scale = encode_fp8(hp, E4M3, "stochastic")
    assert float(scale) == 1.0
    assert abs(codes.float()[1:].mean().item() - 1.06) < 0.005
    assert torch.equal(encode_fp8(hp, E4M3)[0].float()[1:].unique(), torch.tensor([1.0]))  # nearest: always 1.0

    for rounding in ("nearest", "stochastic"):
        model = amp.initialize(nn.Sequential(nn.Linear(64, 64)), opt_level="O2", overrides={
            "modules.min_gemm_size": 0, "linear.weight_grad_rounding": rounding})
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
        codes = []
        for _ in range(2):
            model[0].weight.grad = None
            model(x).square().mean().backward()
            codes.append(model[0].weight.grad.codes_and_scale()[0].view(torch.uint8).clone())
        assert torch.equal(codes[0], codes[1]) == (rounding == "nearest")
