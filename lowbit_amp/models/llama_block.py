"""The Llama-style block of the benchmarks' anchor workload (shared/anchors/anchor_gpu.py): RMSNorm -> fused-QKV
causal attention (SDPA) -> RMSNorm -> SwiGLU MLP, written the usual way (``F.silu(w1(h)) * w3(h)``), no biases.

One definition for bench/bench_all.py, bench/bench_coat.py and examples/low_memory.py, so the workload the speed and
memory figures come from is the one users can run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LlamaBlock"]


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1 = nn.RMSNorm(dim)
        self.n2 = nn.RMSNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.wqkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))
