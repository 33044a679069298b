"""8-bit vs bf16 gradient reduction on NCCL, and a 2-GPU O3 training step vs bf16 DDP. GPU only; NOT RUN YET
(this session had one GPU). Run on 2+ GPUs:

    PYTHONPATH=. torchrun --nproc_per_node=2 bench/bench_comm.py --gib 1.0 --out bench/results/comm.jsonl

Part 1 times, with CUDA events (median of --iters after --warmup), on a ~``--gib`` GiB bf16 gradient buffer:
``bf16 all_reduce`` (NCCL ring, what DDP does) vs ``fp8 all-reduce`` (lowbit_amp: amax all-reduce + all_to_all of
FP8 + FP32 sum + all_gather of FP8). Target: >= 1.5x. It also checks the result is bit-identical on every rank and
prints its relative error vs the bf16 result. Part 2 times a DDP training step of a TinyGPT-like model (``--dim``,
``--layers``) at bf16 (no lowbit_amp) vs O3 (FP8 GEMMs + FP8 comm hook; the 8-bit optimizer when present) and reports
tokens/s and peak memory per GPU. One JSON line per measurement goes to ``--out`` with GPU name, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist

from lowbit_amp.distributed.fp8_allreduce import fp8_all_reduce_


def _time(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_reduce(args: argparse.Namespace, device: torch.device) -> list[dict]:
    numel = int(args.gib * 2**30 / 2)  # bf16 bytes
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    grads = (torch.randn(numel, device=device, generator=gen) * 1e-3).to(torch.bfloat16)
    world = dist.get_world_size()
    work_bf16 = grads.clone()

    def bf16_reduce() -> None:
        work_bf16.copy_(grads)
        dist.all_reduce(work_bf16)
        work_bf16.div_(world)

    work_fp8 = grads.clone()

    def fp8_reduce() -> None:
        work_fp8.copy_(grads)
        fp8_all_reduce_(work_fp8)

    rows = []
    for name, fn in (("bf16_all_reduce", bf16_reduce), ("fp8_all_reduce", fp8_reduce)):
        ms = _time(fn, args.iters, args.warmup)
        rows.append({"part": "reduce", "variant": name, "gib": args.gib, "ms": ms, "world": world})
    fp8_reduce()
    bf16_reduce()
    gathered = [torch.empty_like(work_fp8) for _ in range(world)]
    dist.all_gather(gathered, work_fp8)
    identical = all(torch.equal(g.view(torch.int16), gathered[0].view(torch.int16)) for g in gathered)
    rel = float((work_fp8.float() - work_bf16.float()).norm() / work_bf16.float().norm())
    for row in rows:
        row.update(bit_identical=identical, rel_err_vs_bf16=rel)
    rows.append({"part": "reduce", "variant": "speedup", "value": rows[0]["ms"] / rows[1]["ms"]})
    return rows


def bench_train(args: argparse.Namespace, device: torch.device) -> list[dict]:
    import lowbit_amp as amp
    from lowbit_amp.distributed import wrap_ddp
    from lowbit_amp.models.tiny_gpt import TinyGPT, TinyGPTConfig

    cfg = TinyGPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.dim // 128, n_embd=args.dim)
    rows = []
    for level in ("bf16", "O3"):
        torch.cuda.reset_peak_memory_stats(device)
        model = TinyGPT(cfg, seed=0, device=device, dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if level == "bf16":
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model)
        else:
            model, opt = amp.initialize(model, opt, opt_level="O3")
            net = wrap_ddp(model)
        x = torch.randint(0, 256, (args.batch, args.seq), device=device)

        def step() -> None:
            _, loss = net(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = _time(step, args.iters, args.warmup)
        rows.append({"part": "train", "variant": level, "ms": ms, "tokens_per_s": args.batch * args.seq / ms * 1e3,
                     "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "dim": args.dim,
                     "layers": args.layers})
        del model, net, opt
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="FP8 vs bf16 gradient reduction (NCCL)")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_comm.py needs CUDA GPUs (NCCL); run it with torchrun on 2+ GPUs.")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    device = torch.device("cuda", local_rank)
    rows = bench_reduce(args, device)
    if not args.skip_train:
        rows += bench_train(args, device)
    if dist.get_rank() == 0:
        meta = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "date": datetime.date.today().isoformat()}
        for row in rows:
            row.update(meta)
            print(json.dumps(row))
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "a") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
