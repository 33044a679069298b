"""Train a :class:`~lowbit_amp.models.tiny_gpt.TinyGPT` on the stdlib byte corpus at one opt level: the CLI's job.

Every level of a comparison starts from bit-identical weights (the model's private init generator) and sees the same
batches (a sampler generator seeded the same way), so the differences in the table come from the level alone. The
validation batches come from their own generator seeded with ``eval_seed``, not ``seed``: every level *and every seed*
is scored on the same held-out batches, so losses from different seeds are comparable too.

The loop is the one a user writes: ``amp.initialize`` once, then ``forward → scale_loss → backward → step →
zero_grad``. ``amp.scale_loss`` is a no-op unless the config (or an fp16 model) turns dynamic loss scaling on.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import lowbit_amp as amp
from lowbit_amp.config import LowBitConfig
from lowbit_amp.data.stdlib_text import DEFAULT_MAX_BYTES, BatchSampler, ByteCorpus, load_stdlib_corpus
from lowbit_amp.level_pieces import check_pieces
from lowbit_amp.memory import SavedTensorMeter, training_state_bytes
from lowbit_amp.models.tiny_gpt import TinyGPT, TinyGPTConfig
from lowbit_amp.nn.linear import LowBitLinear
from lowbit_amp.recipes.fp8_activations import storage_of

__all__ = ["LevelResult", "TrainSettings", "build_optimizer", "lr_factor", "resolve_device", "train_level"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 1024 * 1024


@dataclass(frozen=True)
class TrainSettings:
    """The run, shared by every level in a comparison (the CLI's flags)."""

    steps: int = 300
    batch_size: int = 16
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    max_bytes: int = DEFAULT_MAX_BYTES
    # The validation batches' seed, independent of ``seed`` (1 = what seed 0 used when the two were tied).
    eval_seed: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}.")
        if self.dtype == "float16":
            # Measured 2026-12-02 (CPU): the plain fp16 TinyGPT under torch's AdamW is NaN after one step at every level,
            # O0 included (Adam's eps = 1e-8 is 0 in fp16, so tiny second moments divide by zero); fused AdamW (FP32
            # math) avoids the NaN but the loss still diverges (3.9 -> 18 in 3 steps) without FP32 master weights.
            raise ValueError("dtype 'float16' trains pure-fp16 parameters, which this loop's AdamW cannot (NaN after one "
                             "step, with or without lowbit_amp): use 'bfloat16' (the CUDA default) or 'float32'.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}.")

    def model_config(self, unit_scaled_loss: bool = False) -> TinyGPTConfig:
        return TinyGPTConfig(block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                             unit_scaled_loss=unit_scaled_loss)


@dataclass
class LevelResult:
    """What one level's run measured (the CLI's table column and JSON entry)."""

    label: str
    opt_level: str
    lowbit_layers: int
    linear_layers: int
    losses: list[float] = field(repr=False)
    final_train_loss: float
    val_loss: float
    median_step_ms: float
    tokens_per_s: float
    state_mib: float
    saved_activations_mib: float
    peak_allocated_mib: float | None
    skipped_steps: int
    wall_s: float
    conversion: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup, then cosine decay to 10% of the peak (the nanoGPT recipe)."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: TinyGPT, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with two param groups (decay on matrices, none on norms/biases), as real recipes do — so the run also
    exercises ``initialize`` keeping the user's param groups."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: TinyGPT, sampler: BatchSampler, batches: int) -> float:
    model.eval()
    total = 0.0
    for _ in range(batches):
        x, y = sampler.sample()
        _, loss = model(x, y)
        total += float(loss)
    model.train()
    return total / batches


def train_level(
    label: str,
    config: LowBitConfig,
    settings: TrainSettings,
    corpus: ByteCorpus | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> LevelResult:
    """Train one fresh model at ``config`` and measure it.

    Args:
        label: the column name (level name or YAML file stem).
        config: the resolved lowbit_amp config.
        settings: the run's settings (the same for every level in a comparison).
        corpus: the byte corpus (read from the stdlib when None).
        on_step: called after every step with ``(step, loss, step_seconds)`` (the progress bar).
    """
    check_pieces(config, label)
    device = resolve_device(settings.device)
    corpus = corpus if corpus is not None else load_stdlib_corpus(settings.max_bytes)
    model = TinyGPT(settings.model_config(unit_scaled_loss=config.unit_scaling.enabled), seed=settings.seed,
                    device=device, dtype=DTYPES[settings.dtype])
    model, optimizer = amp.initialize(model, build_optimizer(model, settings), opt_level=config)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    train_batches = BatchSampler(corpus.train, settings.batch_size, settings.block_size,
                                 torch.Generator().manual_seed(settings.seed), device)
    val_batches = BatchSampler(corpus.val, settings.batch_size, settings.block_size,
                               torch.Generator().manual_seed(settings.eval_seed), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = SavedTensorMeter(model)
    measure_at = min(1, settings.steps - 1)  # step 1: delayed-scaling states are warm by then
    losses: list[float] = []
    step_times: list[float] = []
    state_bytes = saved_bytes = 0
    start = time.perf_counter()
    for step in range(settings.steps):
        factor = lr_factor(step, settings.steps, settings.warmup_fraction)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        x, y = train_batches.sample()
        _sync(device)
        step_start = time.perf_counter()
        if step == measure_at:
            with meter.measure():
                _, loss = model(x, y)
        else:
            _, loss = model(x, y)
        with amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        optimizer.step()
        if step == measure_at:
            counts = training_state_bytes(model, optimizer)
            state_bytes = counts["params"] + counts["grads"] + counts["optimizer"]
            fp8_storage = storage_of(model)
            if fp8_storage is not None:  # its hooks are innermost, so the meter's saw nothing: count what it kept
                saved_bytes = fp8_storage.stats.stored_bytes
            else:
                saved_bytes = meter.bytes
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        step_times.append(time.perf_counter() - step_start)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1], step_times[-1])
    wall = time.perf_counter() - start
    val_loss = evaluate(model, val_batches, settings.eval_batches)
    timed = step_times[1:] if len(step_times) > 1 else step_times  # the first step pays one-off allocation costs
    median_s = statistics.median(timed)
    tail = max(1, settings.steps // 10)
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    scaler = getattr(optimizer, "lowbit_loss_scaler", None)
    return LevelResult(
        label=label,
        opt_level=config.opt_level,
        lowbit_layers=sum(1 for m in layers if m.lb_config.compute != "hp"),
        linear_layers=len(amp.amp_state(model).report.decisions),
        losses=losses,
        final_train_loss=statistics.fmean(losses[-tail:]),
        val_loss=val_loss,
        median_step_ms=median_s * 1e3,
        tokens_per_s=settings.batch_size * settings.block_size / median_s,
        state_mib=state_bytes / MIB,
        saved_activations_mib=saved_bytes / MIB,
        peak_allocated_mib=torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None,
        skipped_steps=scaler.skipped_steps if scaler is not None else 0,
        wall_s=wall,
        conversion=amp.summary(model),
    )
