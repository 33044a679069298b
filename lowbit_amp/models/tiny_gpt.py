"""A small byte-level GPT: the model the CLI, the examples and the convergence tests train.

Why this shape:

* **Byte vocabulary (256).** The training text is raw bytes (``lowbit_amp.data.stdlib_text``), so there is no tokenizer
  to download and the vocabulary is a multiple of 16, like every other linear dimension here.
* **Every ``nn.Linear`` has in/out features that are multiples of 16**, the alignment FP8 tensor-core GEMMs need, so at
  O1+ every block linear is eligible for conversion. The config checks this instead of silently building a model whose
  layers would all stay in high precision.
* **Fused qkv** (one ``Linear(d, 3d)``) and, for SwiGLU, a fused gate+up projection (one ``Linear(d, 2h)``): fewer,
  larger GEMMs, as in production models.
* **Layer names the default module policy understands**: the output projection is ``lm_head`` and the embeddings are
  ``tok_embed`` / ``pos_embed``, so the default ``modules.exclude`` patterns keep them in high precision. Nothing is
  named ``output`` or ``head`` by accident.
* **Deterministic initialisation from a seed** through a private CPU ``torch.Generator``: the same seed gives
  bit-identical weights on every device and dtype and regardless of the global RNG, so each opt level starts from the
  same point.
* **RMSNorm computes in float32** whatever the model dtype: squaring fp16 activations overflows long before the
  activations themselves do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "TinyGPT", "TinyGPTConfig"]

ALIGNMENT = 16  # FP8 tensor-core GEMMs need every dimension to be a multiple of 16
BYTE_VOCAB = 256


@dataclass(frozen=True)
class TinyGPTConfig:
    """Shape of a :class:`TinyGPT`.

    Attributes:
        vocab_size: number of token ids; 256 for raw bytes.
        block_size: the longest sequence (learned position embeddings have this many rows).
        n_layer: transformer blocks.
        n_head: attention heads; ``n_embd`` must divide evenly into them.
        n_embd: model width (a multiple of 16).
        mlp: ``"swiglu"`` (gated, fused gate+up projection) or ``"gelu"`` (classic 2-layer MLP).
        mlp_hidden: MLP hidden width; ``None`` picks 4·d for GELU and ≈ 8/3·d rounded up to a multiple of 16 for SwiGLU
            (the same parameter count).
        tie_weights: share the ``lm_head`` weight with the token embedding.
        bias: give the linear layers a bias.
        unit_scaled_loss: the loss's gradient scaled to unit RMS (:func:`~lowbit_amp.recipes.unit_scaling.
            unit_scaled_cross_entropy`; same loss value). What unit scaling needs: with the mean cross-entropy's
            ~1/(tokens * sqrt(vocab)) gradients, static FP8 scales of 1 flush the output gradients (tiny GPT, CPU:
            +7.8% val loss vs +1.1% with it). ``amp.initialize``'s ``unit_scaling`` section does not change the model:
            the CLI and the parity recipe set this when it is on.
    """

    vocab_size: int = BYTE_VOCAB
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    mlp: str = "swiglu"
    mlp_hidden: int | None = None
    tie_weights: bool = True
    bias: bool = False
    unit_scaled_loss: bool = False

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"TinyGPTConfig: {message}")

        need(self.mlp in ("swiglu", "gelu"), f"mlp={self.mlp!r} is not one of ['swiglu', 'gelu'].")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}.")
        need(
            self.n_embd % self.n_head == 0,
            f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}; pick n_head among "
            f"{[h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]}.",
        )
        for name, value in (("n_embd", self.n_embd), ("vocab_size", self.vocab_size), ("mlp_hidden", self.hidden)):
            need(
                value % ALIGNMENT == 0,
                f"{name}={value} is not a multiple of {ALIGNMENT}; FP8 GEMMs need multiples of {ALIGNMENT} "
                f"(try {max(ALIGNMENT, round(value / ALIGNMENT) * ALIGNMENT)}).",
            )

    @property
    def hidden(self) -> int:
        """The MLP hidden width actually used."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return ALIGNMENT * math.ceil(8 * self.n_embd / 3 / ALIGNMENT)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; normalises in float32 and returns the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: one fused qkv projection, PyTorch's SDPA, an output projection."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """SwiGLU (``down(silu(gate) * up)``, gate and up in one fused GEMM) or GELU (``down(gelu(up))``)."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.fc_in = nn.Linear(config.n_embd, (2 if self.gated else 1) * config.hidden, bias=config.bias)
        self.fc_out = nn.Linear(config.hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc_in(x)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return self.fc_out(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    """A small GPT for byte-level language modelling.

    ``forward(idx)`` returns logits ``(B, T, vocab)``; ``forward(idx, targets)`` returns ``(logits, loss)`` with the
    mean cross-entropy computed in float32.

    Args:
        config: the shape (defaults to :class:`TinyGPTConfig`'s defaults).
        seed: initialisation seed (a private generator; the global RNG is neither read nor advanced).
        device, dtype: where and in what dtype to place the parameters after the (CPU, float32) initialisation.
    """

    def __init__(
        self,
        config: TinyGPTConfig | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or TinyGPTConfig()
        self.tok_embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_embed = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_embed.weight
        self._init_weights(seed)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """GPT-2 style: N(0, 0.02) for embeddings and projections, residual-output projections scaled by
        1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth; biases 0, norm gains 1."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        seen: set[int] = set()
        for name, param in self.named_parameters():  # named_parameters() yields a tied weight once
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                sigma = residual_std if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")) else std
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * sigma)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, seq = idx.shape
        if seq > self.config.block_size:
            raise ValueError(
                f"Sequence length {seq} exceeds block_size={self.config.block_size}; crop the input or build the "
                f"model with TinyGPTConfig(block_size={seq})."
            )
        positions = torch.arange(seq, device=idx.device)
        x = self.tok_embed(idx) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits
        flat_logits, flat_targets = logits.float().view(batch * seq, -1), targets.reshape(batch * seq)
        if self.config.unit_scaled_loss:
            from lowbit_amp.recipes.unit_scaling import unit_scaled_cross_entropy

            return logits, unit_scaled_cross_entropy(flat_logits, flat_targets)
        loss = F.cross_entropy(flat_logits, flat_targets)
        return logits, loss
