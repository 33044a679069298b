"""``lowbit-amp``: train a tiny GPT on real text at one or more opt levels and compare them side by side.

    lowbit-amp                                  # O0 vs O1, 300 steps, ~1-2 min on 2 CPU cores
    lowbit-amp --levels O0,O1,O2 --steps 500    # any levels, level names or YAML files
    lowbit-amp --config configs/O2_per_module.yaml --set linear.input.scaling.algo=current --json out.json

The text is the running Python's own standard-library sources, read as bytes (no download). Each level trains a fresh
model from the same initial weights on the same batches; the table shows final train and validation loss, the median
step time, and memory. Exit status: 0 on success, 2 on a usage or configuration error (the message says what to fix).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
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

__all__ = ["build_parser", "format_table", "main"]

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
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches after training")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="how much stdlib text to read")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="model dtype; auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="init and data seed (the same for every level)")
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
    # With --json - the table goes to stderr, so stdout is pure JSON.
    report = stderr if args.json == "-" else stdout
    report.write(
        f"lowbit-amp {lowbit_amp.__version__}: TinyGPT {num_params / 1e6:.2f}M params ({settings.n_layer} layers, "
        f"d={settings.n_embd}) on {corpus.num_bytes / 2**20:.1f} MiB of Python {platform.python_version()} stdlib "
        f"sources; {settings.steps} steps x {settings.batch_size}x{settings.block_size} tokens; {device} {settings.dtype}; "
        f"seed {settings.seed}\n"
    )
    results: list[LevelResult] = []
    for label, config in levels:
        bar = ProgressBar(settings.steps, f"{label:>6}", stream=stderr, enabled=not args.quiet)

        def on_step(step: int, loss: float, seconds: float, bar: ProgressBar = bar) -> None:
            bar.update(1, f"loss {loss:.3f}  {seconds * 1e3:.1f} ms/step")

        result = train_level(label, config, settings, corpus, on_step=on_step)
        bar.close()
        results.append(result)
        if args.show_model:
            report.write(f"[{label}] {result.conversion}\n")
    report.write("\n" + format_table(results) + "\n")
    if args.json:
        payload = {"meta": _meta(settings, device, corpus.num_bytes, num_params),
                   "levels": {r.label: r.to_dict() for r in results}}
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
