"""Run a function on N gloo ranks (CPU) in forked processes and collect each rank's return value.

Fork, not spawn: a spawned child re-imports torch (~3 s per rank on the CI box); a forked one starts in ~50 ms, which
keeps the whole distributed suite inside its CPU budget. Safe here because nothing has touched CUDA. Rendezvous goes
through a file in a fresh temp dir (no fixed TCP port to collide with parallel runs).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]`` run concurrently on a gloo group of ``world`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(_worker, args=(world, init_file, tmp, fn, args), nprocs=world, start_method="fork")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
