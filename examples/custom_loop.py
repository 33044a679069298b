"""Your own model and training loop in bf16 or fp16, with ``amp.initialize`` and ``amp.scale_loss``.

    python examples/custom_loop.py --dtype float16 --level O1

A small regression MLP stands in for "your model": every linear layer whose in/out features are multiples of 16 runs
its GEMMs in FP8; the 10-wide output layer does not qualify and stays in the model dtype (``amp.summary`` says why).
fp16 parameters turn on dynamic loss scaling automatically; ``amp.scale_loss`` multiplies the loss, unscales the
gradients after backward, and skips the step (weights and optimizer state untouched) if a gradient is inf/NaN.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lowbit_amp as amp


class MyModel(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, 10),  # 10 is not a multiple of 16: kept in high precision
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default="O1")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    torch.manual_seed(0)
    teacher = nn.Linear(64, 10).to(device)  # the function to learn
    model = MyModel().to(device=device, dtype=dtype)
    # Pure-fp16 Adam needs an eps that fp16 can hold: the default 1e-8 rounds to 0 in fp16, and a parameter whose
    # second moment underflows then gets m / 0 = inf (torch's own AdamW does this, with or without lowbit_amp).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4 if dtype == torch.float16 else 1e-8)
    model, optimizer = amp.initialize(model, optimizer, opt_level=args.level,
                                      overrides={"modules.min_gemm_size": 0})  # tiny layers: convert them anyway
    print(amp.summary(model))

    for step in range(args.steps):
        x = torch.randn(128, 64, device=device)
        target = teacher(x).detach()
        prediction = model(x.to(dtype)).float()
        loss = nn.functional.mse_loss(prediction, target)
        with amp.scale_loss(loss, optimizer) as scaled_loss:  # a no-op unless loss scaling is on (fp16)
            scaled_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.5f}")

    scaler = optimizer.lowbit_loss_scaler
    print(f"loss scaling: mode={scaler.config.mode} scale={scaler.scale:g} skipped steps={scaler.skipped_steps}")


if __name__ == "__main__":
    main()
