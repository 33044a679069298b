"""Fine-grained block scaling (DeepSeek-V3, arXiv 2412.19437) and how its error is measured.

The recipe itself is configuration only (``configs/deepseek_blockwise.yaml``): the core already quantizes 1x128 tiles
and 128x128 blocks with current scaling and re-quantizes the re-oriented operands for backward. What lives here is
the evaluation both the tests and ``bench/bench_recipes.py`` use: a heavy-tailed workload and the SQNR of the three
GEMMs of one layer against float64.

Why block scaling helps FP8 less than it helps INT8: E4M3 is a floating-point grid, so a per-tensor scale only costs
precision for values pushed below its normal range (about 2**15 under the amax). A few 100x outlier channels do not
push the bulk that far: per-tensor scaling loses ~1-2 dB of global SQNR, while the *tokens* with little energy lose
much more, and when magnitudes differ across tokens (typical of output gradients) per-tensor scaling flushes whole
tokens toward zero. The worst-token SQNR shows it; the global SQNR, dominated by the largest tokens, hides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit_amp.config import LinearConfig
from lowbit_amp.quant.metrics import sqnr_db

RECIPE_YAML = "configs/deepseek_blockwise.yaml"


def blockwise_linear_config() -> LinearConfig:
    """The ``linear`` section of ``configs/deepseek_blockwise.yaml``."""
    from lowbit_amp.levels import resolve_config

    return resolve_config(RECIPE_YAML).linear


def tensorwise_e4m3_config() -> LinearConfig:
    """The same recipe with per-tensor scales: the baseline block scaling is compared against (E4M3 everywhere,
    current scaling, FP32 accumulation — only the granularity differs)."""
    from lowbit_amp.config import apply_overrides

    tensor = {"algo": "current", "granularity": "tensor"}
    return apply_overrides(blockwise_linear_config(), {"input": {"scaling": tensor}, "weight": {"scaling": tensor},
                                                       "grad_output": {"scaling": tensor}})


def heavy_tailed(rows: int, cols: int, outlier_channels: int = 4, outlier_factor: float = 100.0,
                 token_spread: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Student-t (df=3) values with ``outlier_channels`` columns multiplied by ``outlier_factor``; with
    ``token_spread > 1`` each row is also scaled by a log-uniform factor in ``[1/token_spread, token_spread]``."""
    normal = torch.randn(rows, cols, generator=generator)
    chi2 = torch.randn(rows, cols, 3, generator=generator).pow(2).sum(-1)  # chi-squared with 3 degrees of freedom
    x = normal / torch.sqrt(chi2 / 3.0)
    if outlier_channels:
        channels = torch.randperm(cols, generator=generator)[:outlier_channels]
        x[:, channels] *= outlier_factor
    if token_spread > 1.0:
        log_spread = math.log(token_spread)
        x *= torch.exp((torch.rand(rows, 1, generator=generator) * 2 - 1) * log_spread)
    return x.to(device)


@dataclass
class GemmErrors:
    """SQNR (dB) of the three GEMMs against float64: global, and over the worst token (row) of y and dx."""

    y: float
    dx: float
    dw: float
    y_worst_token: float
    dx_worst_token: float


def _worst_row_sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.double()
    noise = (approx.double() - ref).pow(2).sum(1)
    signal = ref.pow(2).sum(1)
    return float((10 * torch.log10(signal / noise.clamp_min(1e-300))).min())


def gemm_errors(config: LinearConfig, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor) -> GemmErrors:
    """Run one :class:`~lowbit_amp.nn.LowBitLinear` forward and backward under ``config`` and compare all three
    GEMMs with float64."""
    from lowbit_amp.nn.linear import LowBitLinear

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = LowBitLinear.from_linear(linear, config)
    x_in = x.detach().clone().requires_grad_()
    y = layer(x_in)
    y.backward(dy)
    y = y.detach()
    y_ref = F.linear(x.double(), weight.double())
    dx_ref = dy.double() @ weight.double()
    dw_ref = dy.double().t() @ x.double()
    return GemmErrors(
        y=sqnr_db(y_ref, y), dx=sqnr_db(dx_ref, x_in.grad), dw=sqnr_db(dw_ref, layer.weight.grad),
        y_worst_token=_worst_row_sqnr(y_ref, y), dx_worst_token=_worst_row_sqnr(dx_ref, x_in.grad),
    )
