"""INT8 row layers under ``torch.compile`` on CUDA through the ops of lowbit_amp/int8/compiled_ops.py (their Triton
kernels inside the graph): one graph, the same outputs, gradients and fallback fractions as eager. Passing this on a
GPU (first: run zk, 2026-12-02) is what lets CUDA route compiled INT8 layers through the ops."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_int8_row_layers_match_eager_on_gpu(backend: str) -> None:
    import lowbit_amp as amp

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024)).cuda().bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = amp.initialize(model, opt_level="int8", modules={"min_gemm_size": 0})
    eager = copy.deepcopy(model)
    x = torch.randn(8, 256, 1024, device="cuda", dtype=torch.bfloat16)
    x[0, :64, 256:512] *= 80.0
    x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y_c, y_e = compiled(x_c), eager(x_e)
    # aot_eager runs eager's kernels in eager's order: equal; Inductor fuses the GELU its own way (bf16 rounding)
    tol = 0.0 if backend == "aot_eager" else 2e-2
    torch.testing.assert_close(y_c, y_e, rtol=tol, atol=tol)
    y_c.float().square().mean().backward()
    y_e.float().square().mean().backward()
    torch.testing.assert_close(x_c.grad, x_e.grad, rtol=1e-2, atol=1e-3)
    for p_c, p_e in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-2, atol=1e-3)
    for a, b in zip(model.modules(), eager.modules()):
        if hasattr(a, "fallback_fraction"):
            assert torch.equal(a.fallback_fraction, b.fallback_fraction)
    assert float(model[0].fallback_fraction) > 0
    torch._dynamo.reset()
