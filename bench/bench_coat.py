"""COAT FP8 activation storage: peak training memory and step time on the 4096-wide anchor workload, one process.

Usage:
    PYTHONPATH=. python bench/bench_coat.py              # CUDA: anchor (Llama-style blocks d4096/ffn14336, 2 layers,
                                                         #   2x4096 = 8192 tokens, bf16, AdamW) + the tiny-GPT parity run
    PYTHONPATH=. python bench/bench_coat.py --tiny       # any device (CPU here): a small shape, a few steps, same code
    options: --sections e2e,parity   --steps N (timed steps per variant)   --variants bf16,O1,O1+fp8act,...

Variants (same batch, same data, built one after the other and freed in between):
    bf16          the plain model, torch.optim.AdamW (fused on CUDA)
    O1            amp.initialize(..., "O1")
    O1+fp8act     O1 + activations.storage=fp8 (this recipe)
    O3, O3+fp8act the same with FP8 weight gradients and the 8-bit optimizer (its update left eager: no compile time)

Per variant: peak memory over the timed steps (``torch.cuda.max_memory_allocated``, reset after 3 warm-up steps) and
from an emptied allocator with model creation and warm-up included (bench_all.py's protocol, ``peak_with_setup_GiB``),
the memory held between steps (``memory_allocated`` after a step: weights, optimizer state, FP8 weight caches), the
median step time (CUDA events; ``time.perf_counter`` on CPU) and the bytes autograd saves for backward in one forward
(distinct storages, parameters excluded; counted by a saved-tensor hook, so it works on CPU too). Parity: the tiny GPT on
the stdlib byte corpus in bf16 for ``--parity-steps`` steps per variant, mean loss of the last 20 steps and a held-out
loss, relative to bf16. Prints tables; writes ``$OUT/bench_coat.json`` (``$OUT`` defaults to ./out).
Budget: about 60-100 s on one H200 (5 e2e variants x ~25 steps, 3 parity runs x 300 small steps).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_all import Block  # noqa: E402  (the anchor's Llama-style block, shared with bench_all.py)

import lowbit_amp as amp  # noqa: E402
from lowbit_amp.recipes.fp8_activations import storage_of, weight_cache_ptrs  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(os.getcwd(), "out")
ANCHOR = dict(dim=4096, heads=32, ffn=14336, layers=2, batch=2, seq=4096)
TINY = dict(dim=256, heads=4, ffn=896, layers=2, batch=2, seq=128)
VARIANTS = ["bf16", "O1", "O1+fp8act", "O3", "O3+fp8act"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _build(variant: str, shape: dict, dev: torch.device):  # type: ignore[no-untyped-def]
    model = torch.nn.Sequential(*[Block(shape["dim"], shape["heads"], shape["ffn"])
                                  for _ in range(shape["layers"])]).to(dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    if variant != "bf16":
        level, _, extra = variant.partition("+")
        overrides: dict = {"modules": {"min_gemm_size": 0}}  # every block linear in FP8, on CPU and GPU alike
        if extra == "fp8act":
            overrides["activations"] = {"storage": "fp8"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt = amp.initialize(model, opt, opt_level=level, **overrides)
        if hasattr(opt, "use_compile"):
            opt.use_compile = False  # eager optimizer update: no compile time inside the budget
    return model, opt


def saved_bytes(fn, model: torch.nn.Module) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the distinct storages autograd saves while ``fn()`` runs (parameters and leaves excluded), for the
    variants without FP8 storage. Saved-tensor hooks do not stack (the innermost pair alone sees the tensors), so the
    FP8 variants report their own storage's stats instead."""
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if isinstance(t, torch.nn.Parameter) or (t.requires_grad and t.grad_fn is None):
            return t
        if t.dtype == torch.float8_e4m3fn and t.untyped_storage().data_ptr() in weight_cache_ptrs(model.modules()):
            return t  # O1's cached FP8 weight: weight memory, not an activation (as the FP8 variants count it)
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def e2e(variant: str, shape: dict, dev: torch.device, steps: int) -> dict:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model, opt = _build(variant, shape, dev)
    x = torch.randn(shape["batch"], shape["seq"], shape["dim"], device=dev, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(3):
        loss = step()
    _sync(dev)
    warm_s = time.perf_counter() - t0
    peak_with_setup = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # from here: the steady-state steps only
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize(dev)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t) * 1000)
    rec = {"variant": variant, "step_ms": round(statistics.median(times), 2),
           "step_ms_min_max": [round(min(times), 2), round(max(times), 2)], "warm_s": round(warm_s, 1),
           "loss": round(loss.item(), 6), "loss_finite": bool(torch.isfinite(loss).item())}
    if dev.type == "cuda":
        rec["peak_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)  # timed steps
        rec["peak_with_setup_GiB"] = round(max(peak_with_setup, torch.cuda.max_memory_allocated(dev)) / 2**30, 3)
        rec["between_steps_GiB"] = round(torch.cuda.memory_allocated(dev) / 2**30, 3)
    # Saved-activation bytes of one forward (outside the timed and peak-measured region).
    storage = storage_of(model)
    if storage is None:
        rec["saved_MiB"] = round(saved_bytes(lambda: model(x), model) / 2**20, 1)
    else:
        model(x)
        s = storage.stats
        rec["saved_MiB"] = round((s.packed_bytes_out + s.kept_bytes) / 2**20, 1)
        rec["fp8_packed"] = {"tensors": s.packed_tensors, "hp_MiB": round(s.packed_bytes_in / 2**20, 1),
                             "fp8_MiB": round(s.packed_bytes_out / 2**20, 1), "kept_MiB": round(s.kept_bytes / 2**20, 1),
                             "reused": s.reused, "kept_reasons": s.kept_reasons,
                             "kept_MiB_by_reason": {k: round(v / 2**20, 1) for k, v in s.kept_bytes_by_reason.items()}}
    del model, opt, x, loss
    return rec


def parity(variant: str, dev: torch.device, steps: int, tiny: bool) -> dict:
    """Tiny GPT on the stdlib byte corpus, bf16 weights, same seed and batches for every variant."""
    from lowbit_amp.data import BatchSampler, load_stdlib_corpus
    from lowbit_amp.models import TinyGPT, TinyGPTConfig

    cfg = (TinyGPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64) if tiny else
           TinyGPTConfig(block_size=256, n_layer=6, n_head=8, n_embd=512))
    batch = 8 if tiny else 32
    data = load_stdlib_corpus(max_bytes=(1 << 20) if tiny else (8 << 20))
    torch.manual_seed(0)
    model = TinyGPT(cfg, seed=0, device=dev, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if variant != "bf16":
        level, _, extra = variant.partition("+")
        overrides: dict = {}
        if extra == "fp8act":  # the tiny shape's tensors are below the default min_numel
            overrides["activations"] = {"storage": "fp8", **({"min_numel": 4096} if tiny else {})}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt = amp.initialize(model, opt, opt_level=level, modules={"min_gemm_size": 0}, **overrides)
        if hasattr(opt, "use_compile"):
            opt.use_compile = False
    sampler = BatchSampler(data.train, batch, cfg.block_size, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        x, y = (t.to(dev) for t in sampler.sample())
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    val_sampler = BatchSampler(data.val, batch, cfg.block_size, torch.Generator().manual_seed(1))
    with torch.no_grad():
        val = sum(model(*(t.to(dev) for t in val_sampler.sample()))[1].float().item() for _ in range(8)) / 8
    tail = torch.stack(losses[-20:]).float().mean().item()
    return {"variant": variant, "train_last20": round(tail, 4), "val": round(val, 4),
            "finite": bool(all(torch.isfinite(v).item() for v in losses))}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shape and few steps (runs on CPU)")
    parser.add_argument("--sections", default="e2e,parity")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per e2e variant")
    parser.add_argument("--parity-steps", type=int, default=None)
    args = parser.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.tiny:
        raise SystemExit("No CUDA device: the anchor workload needs a GPU; use --tiny to run the small shape here.")
    shape = TINY if args.tiny else ANCHOR
    steps = args.steps or (3 if args.tiny else 20)
    parity_steps = args.parity_steps or (30 if args.tiny else 300)
    variants = [v for v in args.variants.split(",") if v]
    sections = args.sections.split(",")
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "tiny": args.tiny,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("GIT_COMMIT", "unknown"), "shape": shape, "timed_steps": steps}
    print(json.dumps(meta), flush=True)
    result: dict = {"meta": meta, "e2e": [], "parity": []}

    def save() -> None:
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "bench_coat.json"), "w") as f:
            json.dump(result, f, indent=1)

    if "e2e" in sections:
        for variant in variants:
            try:
                rec = e2e(variant, shape, dev, steps)
            except Exception as err:  # one failing variant must not lose the others' numbers
                traceback.print_exc()
                rec = {"variant": variant, "error": f"{type(err).__name__}: {err}"[:500]}
            print(json.dumps(rec), flush=True)
            result["e2e"].append(rec)
            save()
        base = next((r for r in result["e2e"] if r["variant"] == "bf16" and "error" not in r), None)
        tag = "d{dim}_ffn{ffn}_L{layers}_tok{t}".format(t=shape["batch"] * shape["seq"], **shape)
        print(f"\n== {tag}, bf16 weights, AdamW, same batch ({dev.type}) ==")
        print(f"{'variant':>12} {'step ms':>9} {'peak GiB':>9} {'bf16/peak':>10} {'w/ setup':>9} {'held GiB':>9} "
              f"{'saved MiB':>10} {'bf16/saved':>11}")
        for r in result["e2e"]:
            if "error" in r:
                print(f"{r['variant']:>12}  failed: {r['error']}")
                continue
            peak = r.get("peak_GiB")
            ratio_peak = base["peak_GiB"] / peak if base and peak else None
            r["peak_reduction_vs_bf16"] = round(ratio_peak, 3) if ratio_peak else None
            r["saved_reduction_vs_bf16"] = round(base["saved_MiB"] / r["saved_MiB"], 3) if base else None
            fmt = lambda v, w, p=2: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
            if base and r.get("peak_with_setup_GiB"):
                r["peak_with_setup_reduction_vs_bf16"] = round(base["peak_with_setup_GiB"] / r["peak_with_setup_GiB"], 3)
            print(f"{r['variant']:>12} {fmt(r['step_ms'], 9)} {fmt(peak, 9)} {fmt(ratio_peak, 10)} "
                  f"{fmt(r.get('peak_with_setup_GiB'), 9)} {fmt(r.get('between_steps_GiB'), 9)} {fmt(r['saved_MiB'], 10, 1)} "
                  f"{fmt(r['saved_reduction_vs_bf16'], 11)}")
        save()
    if "parity" in sections:
        for variant in [v for v in ("bf16", "O1", "O1+fp8act") if v in variants]:
            try:
                rec = parity(variant, dev, parity_steps, args.tiny)
            except Exception as err:
                traceback.print_exc()
                rec = {"variant": variant, "error": f"{type(err).__name__}: {err}"[:500]}
            print(json.dumps(rec), flush=True)
            result["parity"].append(rec)
            save()
        base = next((r for r in result["parity"] if r["variant"] == "bf16" and "error" not in r), None)
        print(f"\n== parity: tiny GPT, {parity_steps} steps, bf16 weights ==")
        for r in result["parity"]:
            if "error" in r or base is None:
                print(r)
                continue
            r["train_rel_vs_bf16"] = round(r["train_last20"] / base["train_last20"] - 1, 4)
            r["val_rel_vs_bf16"] = round(r["val"] / base["val"] - 1, 4)
            print(f"{r['variant']:>12} train {r['train_last20']:.4f} ({r['train_rel_vs_bf16']:+.2%})  "
                  f"val {r['val']:.4f} ({r['val_rel_vs_bf16']:+.2%})")
        save()
    print(f"\nwrote {os.path.join(OUT, 'bench_coat.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
