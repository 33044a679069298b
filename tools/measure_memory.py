"""Measure bytes per parameter of weights + gradients + optimizer state at O0..O3, from the tensors' real storages.

    PYTHONPATH=. python tools/measure_memory.py [--device cpu|cuda] [--dtype bf16|fp32] [--json OUT.json]

A stack of bias-free ``Linear(d, d)`` layers (every parameter in a converted layer, so the numbers are the per-parameter
asymptote) takes one training step under ``amp.initialize(model, AdamW, level)``; then, with the gradients still held,
every storage is counted once: parameters, ``p.grad`` (an ``Fp8Grad`` counts its FP8 codes + scale), and every tensor in
``optimizer.state`` (codes, scales, master copies, step counters). The FP8 weight copy each low-bit layer caches
between steps is reported in its own column (it is not optimizer state, but it is memory). On CUDA the
``torch.cuda.memory_allocated`` delta after the step is reported too, as a cross-check of the storage count.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch
from torch import nn

import lowbit_amp as amp
from lowbit_amp.grads import Fp8Grad
from lowbit_amp.nn.linear import LowBitLinear

LEVELS = ("O0", "O1", "O2", "O3")


def _storages(value: Any, seen: set[int]) -> int:
    """Bytes of storages reachable from ``value`` not counted before (shared storages count once)."""
    if isinstance(value, Fp8Grad):
        codes_or_sum = value._pending if value._pending is not None else value._codes
        return _storages(codes_or_sum, seen) + _storages(value._scale, seen)
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(_storages(item, seen) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_storages(item, seen) for item in value)
    return 0


def measure(level: str, device: torch.device, dtype: torch.dtype, width: int, depth: int) -> dict[str, Any]:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)]).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = amp.initialize(model, opt, level)
    if hasattr(opt, "use_compile"):
        opt.use_compile = False  # eager update: same state storages, no compile time spent on a memory count
    x = torch.randn(64, width, device=device, dtype=dtype)
    model(x).float().square().mean().backward()
    opt.step()
    del x
    n = sum(p.numel() for p in model.parameters())
    seen: set[int] = set()
    weights = _storages(list(model.parameters()), seen)
    grads = _storages([p.grad for p in model.parameters()], seen)
    state = _storages(list(opt.state.values()), seen)
    cache = sum(_storages(list(m._weight_cache[1:]), seen) for m in model.modules()
                if isinstance(m, LowBitLinear) and m._weight_cache is not None)
    row = {"level": level, "params": n, "weights": weights / n, "grads": grads / n, "optimizer_state": state / n,
           "total": (weights + grads + state) / n, "fp8_weight_cache": cache / n,
           "optimizer": type(opt).__name__, "formats": next(iter(opt.state.values())).get("format", "torch")}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["cuda_allocated_per_param"] = (torch.cuda.memory_allocated(device) - base) / n
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--width", type=int, default=None,
                        help="layer width; default 1024 on CPU, 4096 on CUDA (above the auto min_gemm_size, so converted)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    width = args.width or (4096 if device.type == "cuda" else 1024)
    rows = [measure(level, device, dtype, width, args.depth) for level in LEVELS]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bytes/param, {args.dtype} model, {rows[0]['params']} params, {device} ({gpu}), torch {torch.__version__}")
    print("| level | weights | grads | optimizer state | **total** | FP8 weight cache (extra) | state formats |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" (cuda alloc {r['cuda_allocated_per_param']:.2f})" if "cuda_allocated_per_param" in r else ""
        print(f"| {r['level']} | {r['weights']:.2f} | {r['grads']:.2f} | {r['optimizer_state']:.2f} | "
              f"**{r['total']:.2f}**{extra} | {r['fp8_weight_cache']:.2f} | {r['formats']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": gpu, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
