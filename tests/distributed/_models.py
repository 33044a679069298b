"""A tiny GPT and a deterministic byte batch shared by the distributed tests (sizes chosen for a 2-core CI box)."""

from __future__ import annotations

import torch

from lowbit_amp.models.tiny_gpt import TinyGPT, TinyGPTConfig

CONFIG = TinyGPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
SEQ = 16


def make_model(seed: int = 0) -> TinyGPT:
    return TinyGPT(CONFIG, seed=seed)


def batch(step: int, index: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of optimizer step ``step``: ``rows`` sequences of a learnable pattern (so loss falls)."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    starts = torch.randint(0, 200, (rows, 1), generator=gen)
    seq = (starts + torch.arange(SEQ + 1) * 3) % 256
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
