"""COAT FP8 activation storage: peak training memory and step time on the 4096-wide anchor workload, one fresh
process per variant.

Usage:
    PYTHONPATH=. python bench/bench_coat.py              # CUDA: anchor (Llama-style blocks d4096/ffn14336, 2 layers,
                                                         #   2x4096 = 8192 tokens, bf16, AdamW) + the tiny-GPT parity run
    PYTHONPATH=. python bench/bench_coat.py --tiny       # any device (CPU here): a small shape, a few steps, same code
    options: --sections e2e,parity   --steps N (timed steps per variant)   --variants bf16,O1,O1+fp8act,...

Variants (same batch, same data), named ``LEVEL[e][+fp8act][+nocache]``:
    bf16          the plain model, torch.optim.AdamW (fused on CUDA)
    O1            amp.initialize(..., "O1")
    O1+fp8act     O1 + activations.storage=fp8 (this recipe)
    O3, O3+fp8act the same with FP8 weight gradients and the 8-bit optimizer (its preset: E4M3 m, FP16 v), whose update
                  runs on its default path: the fused Triton AdamW kernel on CUDA. (An earlier version set
                  ``use_compile = False`` to skip compile time; that selects the eager reference update *and* turns the
                  fused kernel off, which is why O3 measured 147 ms/step against O1's 31 on the H200, 2026-12-01.)
    O3e+fp8act    O3+fp8act with the 8-bit second moment too (``optimizer.exp_avg_sq: e4m3_expand``)
    ...+nocache   ``linear.weight_cache: none``: no FP8 weight copy held (W cast per forward, Wᵀ re-cast in backward)
    ...+fp8attn   (with +fp8act) ``activations.attention: fp8``: q/k/v saved in FP8, attention recomputed in backward
    ...+glu       (with +fp8act) ``activations.glu: fused``: silu(a) * b saves a and b only, one fused backward pass
    ...+wgbf16    ``linear.weight_grad_gemm: bf16``: the weight-gradient GEMM writes bf16 before the FP8 encode

Each e2e variant runs in its own Python subprocess (``--one-variant``, which writes one JSON record the parent
collects): run one after another in one process, the memory held between steps grew 2.84 -> 15.74 GiB from the first
variant to the last (H200, 2026-12-01), so every later peak included earlier variants' leftovers. A fresh process
starts from an empty CUDA allocator, whatever a library keeps alive; the price: one torch import per variant (~5-10 s).

Per variant: peak memory over the timed steps (``torch.cuda.max_memory_allocated``, reset after 3 warm-up steps) and
from process start with model creation and warm-up included (bench_all.py's protocol, ``peak_with_setup_GiB``), the
memory held between steps (``memory_allocated`` after a step) and what holds it (``held_MiB``: parameters, buffers,
optimizer state, the FP8 weight caches of the low-bit linears, the input batch; on CUDA the rest as ``other``), whether
the optimizer moved the weights' version counters (``fp8_weight_cache_refreshed``: False means every forward reused a
stale FP8 weight cast, flagged under the table), the median step time (CUDA events; ``time.perf_counter`` on CPU) and
the bytes autograd saves for backward in one forward (distinct storages, parameters excluded; counted by a saved-tensor
hook, so it works on CPU too). Parity: the tiny GPT on the stdlib byte corpus in bf16 for ``--parity-steps`` steps per
variant, mean loss of the last 20 steps and a held-out loss, relative to bf16 (in the parent process: it measures no
memory). Prints tables; writes ``$OUT/bench_coat.json`` (``$OUT`` defaults to ./out).
Budget: about 140 s on one H200 (2026-12-01: 6 e2e processes x 11-13 s, of which ~8 s import and start-up; parity
63 s, 37 of them O1+fp8act). ``--sections e2e`` alone: ~75 s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_all import Block, anchor_step  # noqa: E402  (the anchor's block and training step, as bench_all.py)

import lowbit_amp as amp  # noqa: E402
from lowbit_amp.recipes.fp8_activations import storage_of, weight_cache_ptrs  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(os.getcwd(), "out")
ANCHOR = dict(dim=4096, heads=32, ffn=14336, layers=2, batch=2, seq=4096)
TINY = dict(dim=256, heads=4, ffn=896, layers=2, batch=2, seq=128)
VARIANTS = ["bf16", "O1", "O1+fp8act", "O3", "O3+fp8act", "O3e+fp8act", "O3e+nocache", "O3e+fp8act+nocache"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _initialize(model, opt, variant: str, **activations):  # type: ignore[no-untyped-def]
    """``amp.initialize`` for a variant named ``LEVEL[e][+fp8act][+nocache]`` (``bf16``: unchanged). Every block linear runs in
    FP8 on CPU and GPU alike (``min_gemm_size=0``); ``e`` stores the optimizer's second moment in E4M3 with range
    expansion; ``+fp8act`` stores saved activations in FP8, with ``activations`` as extra fields of that section.
    Dotted keys through ``overrides=``: the config's ``optimizer`` section cannot be a keyword of ``amp.initialize``,
    whose second parameter is named ``optimizer``."""
    if variant == "bf16":
        return model, opt
    level, *extras = variant.split("+")
    overrides: dict = {"modules.min_gemm_size": 0}
    if level.endswith("e"):
        level = level[:-1]
        overrides["optimizer.exp_avg_sq"] = "e4m3_expand"
    for extra in extras:
        if extra == "fp8act":
            overrides["activations.storage"] = "fp8"
            overrides.update({f"activations.{k}": v for k, v in activations.items()})
        elif extra == "nocache":
            overrides["linear.weight_cache"] = "none"
        elif extra == "fp8attn":  # with +fp8act: attention's q/k/v saved in FP8, attention recomputed in backward
            overrides["activations.attention"] = "fp8"
        elif extra == "glu":  # with +fp8act: silu(a) * b saves a and b only, one fused backward pass
            overrides["activations.glu"] = "fused"
        elif extra == "wgbf16":  # O2+: the weight-gradient GEMM writes bf16 before the FP8 encode
            overrides["linear.weight_grad_gemm"] = "bf16"
        else:
            raise ValueError(f"Unknown variant suffix {extra!r} in {variant!r}; known: '+fp8act', '+nocache', "
                             "'+fp8attn', '+glu', '+wgbf16'.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return amp.initialize(model, opt, opt_level=level, overrides=overrides)


def _build(variant: str, shape: dict, dev: torch.device):  # type: ignore[no-untyped-def]
    """The model is made on the device in bf16: the anchor's CPU init in fp32 took 3.5 s of each variant's process
    (H200 host), and a bf16 build holds no fp32 copy that would show in ``peak_with_setup_GiB``."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = torch.nn.Sequential(*[Block(shape["dim"], shape["heads"], shape["ffn"])
                                          for _ in range(shape["layers"])])
    finally:
        torch.set_default_dtype(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    return _initialize(model, opt, variant)


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


def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> dict[str, int]:
    """What the memory held between steps is made of, by distinct storage (each counted once, in the first category
    that holds it): parameters, buffers (norm weights' kin, the FP8 layers' amax histories and scales), optimizer state
    (every tensor in ``opt.state``: torch AdamW's moments and step counters, or the low-bit optimizer's codes, scales
    and master copies — the same walk as ``LowBitOptimizer.state_bytes``), the FP8 weight caches the low-bit linears
    keep between steps (``_weight_cache``: W and, once backward ran, Wᵀ in FP8 plus their scales) and the input
    batch."""
    seen: set[int] = set()

    def total(tensors) -> int:  # type: ignore[no-untyped-def]
        n = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                n += storage.nbytes()
        return n

    def state_tensors(value):  # type: ignore[no-untyped-def]
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from state_tensors(item)

    caches = (getattr(m, "_weight_cache", None) or () for m in model.modules())
    return {"params": total(model.parameters()), "buffers": total(model.buffers()),
            "optimizer_state": total(t for state in opt.state.values() for t in state_tensors(state)),
            "fp8_weight_cache": total(t for cache in caches for t in cache if isinstance(t, torch.Tensor)),
            "input": total([x])}


def e2e(variant: str, shape: dict, dev: torch.device, steps: int) -> dict:
    """One variant, in a process of its own (see the module docstring): nothing else has touched the allocator."""
    torch.manual_seed(0)
    model, opt = _build(variant, shape, dev)
    x = torch.randn(shape["batch"], shape["seq"], shape["dim"], device=dev, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        return anchor_step(model, opt, x)

    t0 = time.perf_counter()
    for _ in range(3):
        loss = step()
    _sync(dev)
    warm_s = time.perf_counter() - t0
    peak_with_setup = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # from here: the steady-state steps only
    # A stale FP8 weight cast (kept across an optimizer step) would skip the per-step cast (a faster step) and stop
    # training through the FP8 GEMMs: before commit 0aef669 torch's fused AdamW, which does not bump the weights'
    # version counter (the cache key), caused exactly that. The record says whether every cache was dropped at the step.
    cached = [m for m in model.modules() if hasattr(m, "_weight_cache")]
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
    if cached:  # after step() (which ends with the optimizer step): no layer may still hold a cast
        rec["fp8_weight_cache_refreshed"] = all(m._weight_cache is None for m in cached)
    held = {k: round(v / 2**20, 1) for k, v in held_bytes(model, opt, x).items()}
    if dev.type == "cuda":
        rec["peak_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)  # timed steps
        rec["peak_with_setup_GiB"] = round(max(peak_with_setup, torch.cuda.max_memory_allocated(dev)) / 2**30, 3)
        rec["between_steps_GiB"] = round(torch.cuda.memory_allocated(dev) / 2**30, 3)
        # The rest (64 MiB at bf16 on the H200, likely the cuBLAS workspaces, which come from the caching allocator):
        # the loss scalar, the fused optimizer step's pointer tables, allocator rounding (512-byte blocks).
        held["other"] = round(torch.cuda.memory_allocated(dev) / 2**20 - sum(held.values()), 1)
    rec["held_MiB"] = held
    # Saved-activation bytes of one forward (outside the timed and peak-measured region).
    storage = storage_of(model)
    if storage is None:
        rec["saved_MiB"] = round(saved_bytes(lambda: model(x), model) / 2**20, 1)
    else:
        model(x)
        s = storage.stats
        rec["saved_MiB"] = round(s.stored_bytes / 2**20, 1)
        rec["fp8_packed"] = {"tensors": s.packed_tensors, "hp_MiB": round(s.packed_bytes_in / 2**20, 1),
                             "fp8_MiB": round(s.packed_bytes_out / 2**20, 1), "kept_MiB": round(s.kept_bytes / 2**20, 1),
                             "reused": s.reused, "kept_reasons": s.kept_reasons,
                             "kept_MiB_by_reason": {k: round(v / 2**20, 1) for k, v in s.kept_bytes_by_reason.items()}}
    return rec


def one_variant(variant: str, shape: dict, dev: torch.device, steps: int, result: str) -> None:
    """The ``--one-variant`` child: runs :func:`e2e` and writes its record (or the error) to ``result``."""
    try:
        rec = e2e(variant, shape, dev, steps)
    except Exception as err:  # reported as the variant's record, like a crash the parent sees
        traceback.print_exc()
        rec = {"variant": variant, "error": f"{type(err).__name__}: {err}"[:500]}
    with open(result, "w") as f:
        json.dump(rec, f)


def e2e_subprocess(variant: str, tiny: bool, steps: int) -> dict:
    """Run ``variant`` in a fresh Python process (its output passes through) and return the record it wrote; a
    process that dies without one (killed for memory, a fatal CUDA error) becomes an error record."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "record.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one-variant", variant, "--result", result,
               "--steps", str(steps), *(["--tiny"] if tiny else [])]
        t0 = time.perf_counter()
        code = subprocess.run(cmd).returncode
        process_s = round(time.perf_counter() - t0, 1)  # the variant's share of the budget, torch import included
        if not os.path.exists(result):
            return {"variant": variant, "error": f"the variant's process exited with code {code} and wrote no record",
                    "process_s": process_s}
        with open(result) as f:
            return {**json.load(f), "process_s": process_s}


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
    # The tiny shape's tensors are below the default min_numel of FP8 activation storage.
    model, opt = _initialize(model, opt, variant, **({"min_numel": 4096} if tiny else {}))
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
    parser.add_argument("--one-variant", metavar="NAME", help=argparse.SUPPRESS)  # the child: see e2e_subprocess
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.tiny:
        raise SystemExit("No CUDA device: the anchor workload needs a GPU; use --tiny to run the small shape here.")
    shape = TINY if args.tiny else ANCHOR
    steps = args.steps or (3 if args.tiny else 20)
    if args.one_variant:
        one_variant(args.one_variant, shape, dev, steps, args.result)
        return
    parity_steps = args.parity_steps or (30 if args.tiny else 300)
    variants = [v for v in args.variants.split(",") if v]
    sections = args.sections.split(",")
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "tiny": args.tiny,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("GIT_COMMIT", "unknown"), "shape": shape, "timed_steps": steps,
            "e2e_isolation": "one subprocess per variant"}
    print(json.dumps(meta), flush=True)
    result: dict = {"meta": meta, "e2e": [], "parity": []}

    def save() -> None:
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "bench_coat.json"), "w") as f:
            json.dump(result, f, indent=1)

    if "e2e" in sections:
        for variant in variants:  # a failing variant loses no other's numbers: each runs in its own process
            rec = e2e_subprocess(variant, args.tiny, steps)
            print(json.dumps(rec), flush=True)
            result["e2e"].append(rec)
            save()
        base = next((r for r in result["e2e"] if r["variant"] == "bf16" and "error" not in r), None)
        tag = "d{dim}_ffn{ffn}_L{layers}_tok{t}".format(t=shape["batch"] * shape["seq"], **shape)
        print(f"\n== {tag}, bf16 weights, AdamW, same batch ({dev.type}) ==")
        print(f"{'variant':>12} {'step ms':>9} {'peak GiB':>9} {'bf16/peak':>10} {'w/ setup':>9} {'held GiB':>9} "
              f"{'saved MiB':>10} {'bf16/saved':>11}")
        fmt = lambda v, w, p=2: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
        for r in result["e2e"]:
            if "error" in r:
                print(f"{r['variant']:>12}  failed: {r['error']}")
                continue
            peak = r.get("peak_GiB")
            ratio_peak = base["peak_GiB"] / peak if base and peak else None
            r["peak_reduction_vs_bf16"] = round(ratio_peak, 3) if ratio_peak else None
            r["saved_reduction_vs_bf16"] = round(base["saved_MiB"] / r["saved_MiB"], 3) if base else None
            if base and r.get("peak_with_setup_GiB"):
                r["peak_with_setup_reduction_vs_bf16"] = round(base["peak_with_setup_GiB"] / r["peak_with_setup_GiB"], 3)
            print(f"{r['variant']:>12} {fmt(r['step_ms'], 9)} {fmt(peak, 9)} {fmt(ratio_peak, 10)} "
                  f"{fmt(r.get('peak_with_setup_GiB'), 9)} {fmt(r.get('between_steps_GiB'), 9)} {fmt(r['saved_MiB'], 10, 1)} "
                  f"{fmt(r['saved_reduction_vs_bf16'], 11)}")
            if r.get("fp8_weight_cache_refreshed") is False:
                print(f"{'':>12}  ! an FP8 weight cast survived the optimizer step: forwards reuse a stale cast (no "
                      "per-step cast in step ms; the FP8 GEMMs do not train)")
        parts = ("params", "buffers", "optimizer_state", "fp8_weight_cache", "input", "other")
        print(f"\n== held between steps, MiB ==\n{'variant':>12} {'params':>9} {'buffers':>9} {'opt state':>10} "
              f"{'fp8 W cache':>12} {'input':>9} {'other':>9}")
        for r in result["e2e"]:
            if "held_MiB" in r:
                print(f"{r['variant']:>12} " + " ".join(fmt(r["held_MiB"].get(k), w, 1)
                                                       for k, w in zip(parts, (9, 9, 10, 12, 9, 9))))
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
