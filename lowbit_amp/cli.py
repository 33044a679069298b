"""``lowbit-amp``: train a tiny GPT on real text at one or more opt levels and compare them side by side.

    lowbit-amp                                  # O0 vs O1, 300 steps, ~1-2 min on 2 CPU cores
    lowbit-amp --levels O0,O1,O2 --steps 500    # any levels, level names or YAML files
    lowbit-amp --config configs/O2_per_module.yaml --set linear.input.scaling.algo=current --json out.json
    lowbit-amp --levels O0,O2 --seeds 3 --eval-batches 32   # every level at seeds 0, 1, 2; paired summary vs O0

The text is the running Python's own standard-library sources, read as bytes (no download). Each level trains a fresh
model from the same initial weights on the same batches; the table shows final train and validation loss, the median
step time, and memory. Exit status: 0 on success, 2 on a usage or configuration error (the message says what to fix).

Several seeds (``--seeds``): a seed sets the initial weights and the order of the training batches, so one seed's
gap between two levels mixes the levels' real difference with run-to-run noise. ``--seeds N`` trains every level at
seeds ``--seed``, ``--seed``+1, ..., ``--seed``+N-1 (``--seeds 0,3,7`` names them instead) and summarises each level
over the seeds: mean and sample standard deviation of the validation loss, and the *paired* relative difference
``val / val(base, same seed) - 1`` against the first level (the base), averaged over seeds with its standard error
(sample std of the per-seed differences / sqrt(N)), the worst seed and how many seeds were worse than the base.
Validation always uses the same held-out batches (``TrainSettings.eval_seed``, independent of the training seed), for
every level and every seed; ``--eval-batches`` sets how many (more batches, less evaluation noise).

JSON (``--json``): ``{"meta", "levels", "summary"}`` with one seed (``levels``: label -> result, as before);
``{"meta", "runs", "summary"}`` with several (``runs``: ``[{"seed", "levels"}]`` in seed order, ``meta["seeds"]``
lists them). ``summary`` is :func:`summarize` of the runs: relative differences are fractions (0.01 = 1%).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import torch

import lowbit_amp
from lowbit_amp.capability import fp8_gemm_supported
from lowbit_amp.config import ConfigError, LowBitConfig
from lowbit_amp.config_files import available_configs
from lowbit_amp.data.stdlib_text import DEFAULT_MAX_BYTES, load_stdlib_corpus
from lowbit_amp.level_pieces import MissingPieceError, check_pieces
from lowbit_amp.levels import PRESETS, resolve_config
from lowbit_amp.nn.swap import NoEligibleLayersError
from lowbit_amp.progress import ProgressBar
from lowbit_amp.train_loop import DTYPES, LevelResult, TrainSettings, resolve_device, train_level

__all__ = ["build_parser", "format_seed_table", "format_summary", "format_table", "main", "parse_seeds", "summarize"]

# O2/O3 need the FP8 weight-gradient cast and the low-bit optimizer, int8 the INT8 GEMM: add them here once they
# run in about the time O1 does, so the default run stays within a few minutes on 2 CPU cores.
DEFAULT_LEVELS = "O0,O1"
DEFAULT_STEPS = 300


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit-amp",
        description="Train a tiny GPT on the Python standard library's sources (as bytes) at several lowbit_amp opt "
        "levels and print loss, step time and memory side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--levels", default=None,
                        help=f"comma-separated opt levels ({', '.join(PRESETS)}) or YAML config paths "
                        f"[default: {DEFAULT_LEVELS}, or none when --config is given]")
    parser.add_argument("--config", action="append", default=[], metavar="PATH.yaml",
                        help="also run the config in this YAML file (repeatable); shipped configs: "
                        + ", ".join(available_configs()))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config override for every level, dotted key and YAML value "
                        "(e.g. linear.input.scaling.algo=current); repeatable; wins over level and YAML")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per level")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128, help="sequence length in bytes")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128, help="model width (a multiple of 16)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="validation batches after training (the same held-out batches for every level and "
                        "seed; raise for less evaluation noise)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="how much stdlib text to read")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="model dtype; auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="init and data seed (the same for every level)")
    parser.add_argument("--seeds", default="1", metavar="N|S1,S2,...",
                        help="run every level at N seeds (--seed, --seed+1, ...) or at the listed seeds, and print "
                        "a per-level summary: mean/std val loss and the paired difference vs the first level "
                        "(same seed) with its standard error; a list ignores --seed, '5,' is the single seed 5")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    parser.add_argument("--show-model", action="store_true", help="print each level's conversion summary")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--version", action="version", version=f"lowbit-amp {lowbit_amp.__version__}")
    return parser


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set linear.input.scaling.algo=current.")
        try:
            overrides[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
    return overrides


def _level_specs(args: argparse.Namespace) -> list[str]:
    levels = args.levels if args.levels is not None else ("" if args.config else DEFAULT_LEVELS)
    specs = [item.strip() for item in levels.split(",") if item.strip()] + list(args.config)
    if not specs:
        raise ConfigError("No levels to run: --levels is empty. Example: --levels O0,O1.")
    return specs


def _label(spec: str) -> str:
    if spec.endswith((".yaml", ".yml")):
        name = spec.replace("\\", "/").rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[0]
    return spec


def resolve_levels(
    specs: Sequence[str], overrides: dict[str, Any], device: torch.device | None = None
) -> list[tuple[str, LowBitConfig]]:
    """``(label, config)`` per spec, with every missing piece reported before anything trains.

    On CUDA, a config that leaves ``modules.min_gemm_size`` at ``auto`` gets 0: the shape policy would keep every layer
    of the demo's tiny model in bf16 (they are far below the size where FP8 pays), and the comparison would be empty.
    """
    resolved = []
    labels: set[str] = set()
    for spec in specs:
        label = _label(spec)
        while label in labels:
            label += "'"
        labels.add(label)
        config = resolve_config(spec, overrides)
        if device is not None and device.type == "cuda" and config.modules.min_gemm_size == "auto":
            config = resolve_config(config, {"modules.min_gemm_size": 0})
        resolved.append((label, config))
    for label, config in resolved:
        check_pieces(config, label)
        if device is not None and "fp8" in {config.linear.compute, *(o.linear.get("compute") for o in
                                                                   config.modules.overrides)}:
            ok, reason = fp8_gemm_supported(device)
            if not ok:  # the same check amp.initialize makes, but before any level has trained
                raise ConfigError(f"opt level {label!r} needs FP8 GEMMs, but {reason}.")
    return resolved


# ------------------------------------------------------------------------------------------------ output


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(results: Sequence[LevelResult]) -> str:
    """Metrics as rows, one column per level; the loss gap is relative to the first level."""
    base = results[0]
    rows: list[tuple[str, list[str]]] = [
        ("opt level", [r.opt_level for r in results]),
        ("low-bit linear layers", [f"{r.lowbit_layers}/{r.linear_layers}" for r in results]),
        ("final train loss", [f"{r.final_train_loss:.4f}" for r in results]),
        ("val loss", [f"{r.val_loss:.4f}" for r in results]),
        (f"val loss vs {base.label}", [f"{100 * (r.val_loss / base.val_loss - 1):+.2f}%" for r in results]),
        ("median step (ms)", [f"{r.median_step_ms:.1f}" for r in results]),
        ("tokens/s", [f"{r.tokens_per_s:,.0f}" for r in results]),
        ("weights+grads+optim (MiB)", [f"{r.state_mib:.2f}" for r in results]),
        ("saved activations (MiB)", [f"{r.saved_activations_mib:.2f}" for r in results]),
        ("peak allocated (MiB)", [_fmt(r.peak_allocated_mib, ".1f") + ("" if r.peak_allocated_mib else " (CPU)")
                                  for r in results]),
    ]
    if any(r.skipped_steps for r in results):
        rows.append(("skipped steps (loss scaler)", [str(r.skipped_steps) for r in results]))
    header = ("", [r.label for r in results])
    first_width = max(len(name) for name, _ in [header, *rows])
    widths = [max(len(row[1][i]) for row in [header, *rows]) for i in range(len(results))]
    lines = []
    for name, cells in [header, *rows]:
        lines.append(f"{name:<{first_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def parse_seeds(text: str, first: int = 0) -> list[int]:
    """``--seeds``: ``"N"`` -> ``[first, ..., first + N - 1]``; ``"0,3,7"`` (any comma) -> those seeds, in that order.

    A single explicit seed needs a trailing comma (``"5,"``); a plain integer is always a count.
    """
    text = text.strip()
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()] if "," in text else None
        count = int(text) if seeds is None else len(seeds)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--seeds {text!r}: expected a count >= 1 (--seeds 3) or a comma-separated list of seeds "
                         "(--seeds 0,1,2).")
    if seeds is None:
        seeds = list(range(first, first + count))
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text}: seed listed twice; each seed is one paired replicate.")
    return seeds


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-level statistics over seeds from ``runs`` = ``[{"seed": s, "levels": {label: result dict}}, ...]``.

    The base is the first level. For each level: ``val_loss`` (per seed, in run order), ``val_loss_mean``,
    ``val_loss_std`` (sample std, n-1; None for one seed), ``rel_vs_base`` (per seed ``val / base_val - 1`` with the
    base of the *same* seed), ``rel_vs_base_mean``, ``rel_vs_base_se`` (sample std of ``rel_vs_base`` / sqrt(n); None
    for one seed), ``rel_vs_base_t`` (mean / se: the paired t statistic, n-1 degrees of freedom; None when se is 0 or
    undefined), ``worst_seed`` (the seed with the largest ``rel_vs_base``, ties broken by the higher val loss — for
    the base itself: its highest-val-loss seed) with ``worst_rel_vs_base`` and ``worst_val_loss``,
    ``seeds_worse_than_base``, ``final_train_loss_mean`` and ``median_step_ms_mean``.
    """
    if not runs:
        raise ValueError("summarize: no runs.")
    labels = list(runs[0]["levels"])
    for run in runs:
        if list(run["levels"]) != labels:
            raise ValueError(f"summarize: seed {run['seed']} ran levels {list(run['levels'])}, not {labels}.")
    base = labels[0]
    seeds = [run["seed"] for run in runs]
    n = len(runs)
    levels: dict[str, Any] = {}
    for label in labels:
        results = [run["levels"][label] for run in runs]
        val = [float(r["val_loss"]) for r in results]
        rel = [float(r["val_loss"]) / float(run["levels"][base]["val_loss"]) - 1.0 for r, run in zip(results, runs)]
        rel_mean = statistics.fmean(rel)
        rel_se = statistics.stdev(rel) / math.sqrt(n) if n > 1 else None
        worst = max(range(n), key=lambda i: (rel[i], val[i]))
        levels[label] = {
            "opt_level": results[0].get("opt_level"),
            "val_loss": val,
            "val_loss_mean": statistics.fmean(val),
            "val_loss_std": statistics.stdev(val) if n > 1 else None,
            "rel_vs_base": rel,
            "rel_vs_base_mean": rel_mean,
            "rel_vs_base_se": rel_se,
            "rel_vs_base_t": rel_mean / rel_se if rel_se else None,
            "worst_seed": seeds[worst],
            "worst_rel_vs_base": rel[worst],
            "worst_val_loss": val[worst],
            "seeds_worse_than_base": sum(1 for value in rel if value > 0),
            "final_train_loss_mean": statistics.fmean(float(r["final_train_loss"]) for r in results),
            "median_step_ms_mean": statistics.fmean(float(r["median_step_ms"]) for r in results),
        }
    return {"base": base, "seeds": seeds, "n_seeds": n, "levels": levels}


def _grid(header: list[str], rows: Sequence[tuple[str, list[str]]]) -> str:
    first_width = max(len(name) for name, _ in [("", header), *rows])
    widths = [max(len(cells[i]) for _, cells in [("", header), *rows]) for i in range(len(header))]
    return "\n".join(f"{name:<{first_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
                     for name, cells in [("", header), *rows])


def format_seed_table(runs: Sequence[dict[str, Any]]) -> str:
    """Val loss per seed (rows) and level (columns), with the paired difference vs the first level in parentheses."""
    labels = list(runs[0]["levels"])
    rows = []
    for run in runs:
        base = run["levels"][labels[0]]["val_loss"]
        rows.append((f"seed {run['seed']}", [f"{run['levels'][label]['val_loss']:.4f}" + (
            "" if i == 0 else f" ({100 * (run['levels'][label]['val_loss'] / base - 1):+.2f}%)")
            for i, label in enumerate(labels)]))
    return _grid(labels, rows)


def _pct(value: float | None, sign: str = "+") -> str:
    return "n/a" if value is None else f"{100 * value:{sign}.2f}%"


def format_summary(summary: dict[str, Any]) -> str:
    """The per-level summary over seeds (see :func:`summarize`), one column per level."""
    base, n = summary["base"], summary["n_seeds"]
    stats = list(summary["levels"].values())
    rows: list[tuple[str, list[str]]] = [
        ("val loss mean", [f"{s['val_loss_mean']:.4f}" for s in stats]),
        ("val loss std", [_fmt(s["val_loss_std"], ".4f") for s in stats]),
        (f"val vs {base}, paired mean", [_pct(s["rel_vs_base_mean"]) for s in stats]),
        ("  standard error", [_pct(s["rel_vs_base_se"], "") for s in stats]),
        ("  paired t", [_fmt(s["rel_vs_base_t"], "+.2f") for s in stats]),
        (f"worst seed vs {base}", [f"{_pct(s['worst_rel_vs_base'])} (s{s['worst_seed']})" for s in stats]),
        (f"seeds worse than {base}", [f"{s['seeds_worse_than_base']}/{n}" for s in stats]),
        ("final train loss mean", [f"{s['final_train_loss_mean']:.4f}" for s in stats]),
        ("median step (ms) mean", [f"{s['median_step_ms_mean']:.1f}" for s in stats]),
    ]
    return _grid(list(summary["levels"]), rows)


def _meta(settings: TrainSettings, device: torch.device, corpus_bytes: int, num_params: int) -> dict[str, Any]:
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "lowbit_amp": lowbit_amp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "corpus_bytes": corpus_bytes,
        "model_parameters": num_params,
    }
    meta.update({key: value for key, value in vars(settings).items()})
    return meta


def _write_json(path: str, payload: dict[str, Any], stdout: TextIO) -> None:
    text = json.dumps(payload, indent=2)
    if path == "-":
        stdout.write(text + "\n")
        return
    with open(path, "w") as handle:
        handle.write(text + "\n")


class UsageError(ValueError):
    """A flag value the run cannot use (the message names the flag)."""


def _settings(args: argparse.Namespace) -> tuple[TrainSettings, torch.device]:
    """Validate the flags up front; only these checks turn ValueError into a usage error (exit 2), so a genuine bug
    during training still shows its traceback."""
    try:
        device = resolve_device(args.device)
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        settings = TrainSettings(
            steps=args.steps, batch_size=args.batch_size, block_size=args.block_size, n_layer=args.n_layer,
            n_head=args.n_head, n_embd=args.n_embd, lr=args.lr, eval_batches=args.eval_batches, seed=args.seed,
            device=str(device), dtype=dtype, max_bytes=args.max_bytes,
        )
        settings.model_config()  # TinyGPTConfig checks widths / heads / alignment
    except ConfigError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from None
    return settings, device


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    settings, device = _settings(args)
    seeds = parse_seeds(args.seeds, settings.seed)
    levels = resolve_levels(_level_specs(args), _parse_overrides(args.overrides), device)
    try:
        corpus = load_stdlib_corpus(settings.max_bytes)
        from lowbit_amp.models.tiny_gpt import TinyGPT

        num_params = TinyGPT(settings.model_config()).num_parameters()
        if corpus.val.numel() < settings.block_size + 1:
            raise ValueError(f"--max-bytes {settings.max_bytes} leaves too little validation text for "
                             f"--block-size {settings.block_size}; read more text.")
    except ValueError as err:
        raise UsageError(str(err)) from None
    multi = len(seeds) > 1
    # With --json - the table goes to stderr, so stdout is pure JSON.
    report = stderr if args.json == "-" else stdout
    seed_text = f"seeds {', '.join(map(str, seeds))}" if multi else f"seed {seeds[0]}"
    report.write(
        f"lowbit-amp {lowbit_amp.__version__}: TinyGPT {num_params / 1e6:.2f}M params ({settings.n_layer} layers, "
        f"d={settings.n_embd}) on {corpus.num_bytes / 2**20:.1f} MiB of Python {platform.python_version()} stdlib "
        f"sources; {settings.steps} steps x {settings.batch_size}x{settings.block_size} tokens; {device} {settings.dtype}; "
        f"{seed_text}\n"
    )
    runs: list[tuple[int, list[LevelResult]]] = []
    for seed in seeds:
        seed_settings = dataclasses.replace(settings, seed=seed)
        results: list[LevelResult] = []
        for label, config in levels:
            name = f"{label:>6}" + (f" s{seed}" if multi else "")
            bar = ProgressBar(seed_settings.steps, name, stream=stderr, enabled=not args.quiet)

            def on_step(step: int, loss: float, seconds: float, bar: ProgressBar = bar) -> None:
                bar.update(1, f"loss {loss:.3f}  {seconds * 1e3:.1f} ms/step")

            result = train_level(label, config, seed_settings, corpus, on_step=on_step)
            bar.close()
            results.append(result)
            if args.show_model and seed == seeds[0]:
                report.write(f"[{label}] {result.conversion}\n")
        if multi:
            report.write(f"\nseed {seed}\n" + format_table(results) + "\n")
        runs.append((seed, results))
    run_dicts = [{"seed": seed, "levels": {r.label: r.to_dict() for r in results}} for seed, results in runs]
    summary = summarize(run_dicts)
    if multi:
        report.write(f"\nval loss per seed (paired difference vs {summary['base']}, same seed)\n"
                     + format_seed_table(run_dicts) + "\n")
        report.write(f"\nsummary over {len(seeds)} seeds (std: sample, n-1; standard error of the mean paired "
                     f"difference: its sample std / sqrt({len(seeds)}))\n" + format_summary(summary) + "\n")
    else:
        report.write("\n" + format_table(runs[0][1]) + "\n")
    if args.json:
        meta = _meta(dataclasses.replace(settings, seed=seeds[0]), device, corpus.num_bytes, num_params)
        payload: dict[str, Any] = {"meta": meta}
        if multi:
            del meta["seed"]
            meta["seeds"] = seeds
            payload["runs"] = run_dicts
        else:
            payload["levels"] = run_dicts[0]["levels"]
        payload["summary"] = summary
        _write_json(args.json, payload, stdout)
    return 0


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Entry point of the ``lowbit-amp`` console script; returns the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return run(args, stdout, stderr)
    except (ConfigError, MissingPieceError, NoEligibleLayersError, UsageError, FileNotFoundError) as err:
        stderr.write(f"lowbit-amp: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
