"""The shared input cast on the GPU: the fused kernel's path (eager) and the custom op's (compiled, Inductor).

CPU tests (tests/nn/test_shared_input_cast.py) cover the logic on the reference ops; here the amax the sibling records
comes from the kernel's ``scale_out[1]``, so bit-equality with the unshared model over warm delayed steps checks that
slot end to end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit_amp as amp
from lowbit_amp.nn import shared_input_cast
from lowbit_amp.scaling.state import ScalingState

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _GLU(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def _run(share: bool, compile_: bool, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = _GLU(256, 528).cuda().to(torch.bfloat16)  # 528: not a multiple of 64 or 128 (the kernel's tile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = amp.initialize(model, opt, opt_level="O1",
                                overrides={"modules.min_gemm_size": 0, "linear.share_input_cast": share})
    run = torch.compile(model, fullgraph=True) if compile_ else model
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(3, 333, 256, device="cuda", generator=gen, dtype=torch.bfloat16)  # 999 rows
        y = run(x)
        y.float().square().mean().backward()
        out.append(y.detach())
        out.extend(p.grad.clone() for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    out.extend(b.clone() for m in model.modules() if isinstance(m, ScalingState) for b in m.buffers())
    assert shared_input_cast._SLOT == []
    return out


@cuda
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_shared_cast_is_bitwise_the_unshared_run(compile_: bool) -> None:
    torch._dynamo.reset()
    shared = _run(True, compile_)
    torch._dynamo.reset()
    plain = _run(False, compile_)
    torch._dynamo.reset()
    for i, (a, b) in enumerate(zip(shared, plain, strict=True)):
        assert torch.equal(a, b), i
