"""Configs from YAML files: a shipped preset, your own file with per-module overrides, and keyword precedence.

    python examples/yaml_config.py

Precedence, later wins: opt-level defaults < YAML file < keyword overrides. ``configs/NAME.yaml`` resolves to the
copy shipped inside the package when the working directory has no such file, so this runs from anywhere.
"""

from __future__ import annotations

import os
import tempfile

import torch

import lowbit_amp as amp
from lowbit_amp.models.tiny_gpt import TinyGPT, TinyGPTConfig

MY_CONFIG = r"""
opt_level: O1                      # the base preset; every other key overrides it
linear:
  input:
    scaling: {history_len: 32}     # longer amax history for every layer's input
modules:
  overrides:                       # per-module rules: regex on the module name, later rules win
    - pattern: '^blocks\.0\.attn\.'
      linear: {compute: hp}        # keep the first block's attention in high precision
    - pattern: '\.mlp\.fc_out$'
      linear:
        input: {scaling: {algo: current}}   # just-in-time scaling where SwiGLU outliers enter
"""


def main() -> None:
    # 1. A shipped preset, spelled out field by field.
    shipped = amp.resolve_config("configs/O2.yaml")
    print("configs/O2.yaml: weight_grad =", shipped.linear.weight_grad, "| optimizer.enabled =", shipped.optimizer.enabled)

    # 2. Your own file, plus a keyword override that wins over it.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "my_o1.yaml")
        with open(path, "w") as handle:
            handle.write(MY_CONFIG)
        model = TinyGPT(TinyGPTConfig(n_layer=2, n_embd=128), seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = amp.initialize(
            model, optimizer, opt_level=path,
            overrides={"linear.input.scaling.history_len": 8, "modules.min_gemm_size": 0},  # keyword > YAML
        )
    config = amp.amp_state(model).config
    print("history_len: level 16, YAML 32, keyword 8 ->", config.linear.input.scaling.history_len)
    print(amp.summary(model))

    # 3. Train a few steps: the user's loop is unchanged.
    tokens = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}  loss {loss.item():.4f}")

    # 4. Mistakes are errors that name the fix.
    try:
        amp.resolve_config("O1", {"linear.input.scaling.algoo": "current"})
    except amp.ConfigError as err:
        print("ConfigError:", err)


if __name__ == "__main__":
    main()
