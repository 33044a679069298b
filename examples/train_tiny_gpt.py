"""Train the tiny byte-level GPT on the Python standard library's sources at one opt level — the whole loop, spelled out.

    python examples/train_tiny_gpt.py --level O1 --steps 200

This is what ``lowbit-amp`` does per level, without the comparison table: build a model and an optimizer as usual,
call ``amp.initialize`` once, and train with an ordinary loop.
"""

from __future__ import annotations

import argparse
import time

import torch

import lowbit_amp as amp
from lowbit_amp.data.stdlib_text import BatchSampler, load_stdlib_corpus
from lowbit_amp.models.tiny_gpt import TinyGPT, TinyGPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default="O1", help="O0, O1, O2, O3, int8 or a YAML path")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    corpus = load_stdlib_corpus()  # a few MiB of real text, no download
    config = TinyGPTConfig(block_size=128, n_layer=2, n_embd=128)
    model = TinyGPT(config, seed=0, device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    # The one line. The tiny model's layers are far below the size where FP8 pays on a GPU, so the shape policy would
    # keep them all in bf16 there; min_gemm_size=0 converts them anyway (on a CPU nothing is excluded by size).
    model, optimizer = amp.initialize(model, optimizer, opt_level=args.level, overrides={"modules.min_gemm_size": 0})
    print(amp.summary(model))

    batches = BatchSampler(corpus.train, args.batch_size, config.block_size, torch.Generator().manual_seed(0), device)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = batches.sample()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()  # also advances the FP8 scaling histories
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:.1f}s")

    model.eval()
    val = BatchSampler(corpus.val, args.batch_size, config.block_size, torch.Generator().manual_seed(1), device)
    with torch.no_grad():
        val_loss = sum(float(model(*val.sample())[1]) for _ in range(8)) / 8
    print(f"val loss {val_loss:.4f} at opt level {args.level}")


if __name__ == "__main__":
    main()
