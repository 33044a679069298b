"""Host time of one eager training step per opt level, and where it goes (cProfile), on the CLI's tiny GPT.

Why: at small widths a GPU step is host-bound — the Python and dispatch work per step, not the kernels, sets the step
time — so the per-step host cost of lowbit_amp's layers, hooks and optimizer is what separates O1–O3 from O0 there. On
a CPU the same loop with a tiny width measures that host cost directly (compute is negligible next to it), except that
the CPU runs the reference casts/GEMMs and the eager optimizer update where CUDA runs fused kernels.

    python tools/profile_host_step.py --device cpu --levels O0,O1,O2,O3,int8          # median ms per step
    python tools/profile_host_step.py --device cpu --levels O2 --profile 30           # + top 30 functions
    python tools/profile_host_step.py --device cuda --n-embd 512 --batch-size 32 --block-size 128 --levels O0,O2

Each level is timed in ``--repeats`` interleaved rounds (the median of each round's median), since a shared machine's
noise drifts over seconds. On CUDA, ``host`` is the time until ``zero_grad`` returns (what the Python enqueues) and
``step`` adds the synchronisation; a host-bound step has the two nearly equal.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import lowbit_amp as amp
from lowbit_amp.models import TinyGPT, TinyGPTConfig


def build(level: str, args: argparse.Namespace, device: torch.device) -> tuple:
    torch.manual_seed(0)
    config = TinyGPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = TinyGPT(config, seed=0, device=device, dtype=dtype)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95))
    overrides = {"modules.min_gemm_size": 0} if device.type == "cuda" else {}  # as the CLI does (tiny layers)
    model, optimizer = amp.initialize(model, optimizer, opt_level=level, overrides=overrides)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch_size, args.block_size), generator=generator).to(device)
    y = torch.randint(0, 256, (args.batch_size, args.block_size), generator=generator).to(device)

    def step() -> None:
        _, loss = model(x, y)
        with amp.scale_loss(loss, optimizer) as scaled:
            scaled.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int) -> tuple[float, float]:
    hosts, walls = [], []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        hosts.append(time.perf_counter() - start)
        sync(device)
        walls.append(time.perf_counter() - start)
    return statistics.median(hosts) * 1e3, statistics.median(walls) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="O0,O1,O2,O3,int8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per level")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: less noise)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N (by self time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    levels = args.levels.split(",")
    steps = {level: build(level, args, device) for level in levels}
    for step in steps.values():  # warm: delayed-scaling states, the optimizer's state, compiled/fused kernels
        for _ in range(5):
            step()
    sync(device)
    rounds: dict[str, list[tuple[float, float]]] = {level: [] for level in levels}
    for _ in range(args.repeats):
        for level in levels:
            rounds[level].append(time_steps(steps[level], device, args.steps))
    print(f"{'level':8s} {'host ms':>8s} {'step ms':>8s}   ({device}, {args.n_layer}x{args.n_embd}, "
          f"batch {args.batch_size}x{args.block_size}, median of {args.repeats} rounds of {args.steps} steps)")
    for level in levels:
        host = statistics.median(r[0] for r in rounds[level])
        wall = statistics.median(r[1] for r in rounds[level])
        print(f"{level:8s} {host:8.2f} {wall:8.2f}")
    if args.profile:
        for level in levels:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(20):
                steps[level]()
            sync(device)
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(args.profile)
            stats.sort_stats("cumulative").print_stats(args.profile)
            print(f"==== {level}: cProfile over 20 steps ====\n{out.getvalue()}")


if __name__ == "__main__":
    main()
