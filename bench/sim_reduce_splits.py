"""Measure the FP8 all-reduce's pre/post-scaling splits and output scalings for N = 2..64 simulated ranks (CPU).

    PYTHONPATH=. python bench/sim_reduce_splits.py [--length 65536] [--seed 0]

Two gradient models, both with log-normal element magnitudes (sigma 2.5, ~7 octaves either side):
``correlated`` — rank i holds ``signal + noise_i`` with equal signal and noise power (a data-parallel gradient);
``noise`` — independent per rank (the mean shrinks ~1/sqrt(N), the hard case for the output scale).
Metrics vs the float64 mean: relative L2 error and the fraction of non-zero entries that underflow to 0.
"""

from __future__ import annotations

import argparse

import torch

from lowbit_amp.distributed.fp8_allreduce import simulate_fp8_all_reduce

WORLD_SIZES = (2, 4, 8, 16, 32, 64)
VARIANTS = (("pre", "chunk"), ("sqrt", "chunk"), ("post", "chunk"), ("post", "shared"))


def make_grads(world: int, length: int, model: str, generator: torch.Generator) -> torch.Tensor:
    magnitude = torch.exp(2.5 * torch.randn(length, generator=generator, dtype=torch.float64))
    noise = torch.randn(world, length, generator=generator, dtype=torch.float64)
    if model == "correlated":
        signal = torch.randn(length, generator=generator, dtype=torch.float64)
        return (signal + noise) * magnitude
    return noise * magnitude


def measure(world: int, model: str, prescale: str, output_scaling: str, fmt: str, length: int, seed: int
            ) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed + world)
    grads = make_grads(world, length, model, generator)
    exact = grads.mean(0)
    got = simulate_fp8_all_reduce(grads.float(), fmt=fmt, prescale=prescale, output_scaling=output_scaling).double()
    rel_l2 = float((got - exact).norm() / exact.norm())
    underflow = float(((got == 0) & (exact != 0)).double().mean())
    return rel_l2, underflow


def table(model: str, fmt: str, length: int, seed: int) -> list[dict]:
    rows = []
    for world in WORLD_SIZES:
        row = {"N": world, "model": model, "fmt": fmt}
        for prescale, output_scaling in VARIANTS:
            row[f"{prescale}/{output_scaling}"] = measure(world, model, prescale, output_scaling, fmt, length, seed)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for fmt in ("e4m3", "e5m2"):
        for model in ("correlated", "noise"):
            print(f"\n{model} gradients, {fmt}: relative L2 error % / underflow %  (prescale/output_scaling)")
            print("| N | " + " | ".join(f"{p}/{o}" for p, o in VARIANTS) + " |")
            print("|---" * (len(VARIANTS) + 1) + "|")
            for row in table(model, fmt, args.length, args.seed):
                cells = [f"{100 * e:.2f} / {100 * u:.2f}" for e, u in (row[f"{p}/{o}"] for p, o in VARIANTS)]
                print(f"| {row['N']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
