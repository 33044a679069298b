"""The one configuration object: frozen dataclasses, built from an opt-level preset, a YAML file and keyword overrides.

Precedence (later wins): opt-level defaults < YAML file < keyword overrides. Every field of every opt level is an
ordinary field here, so users combine pieces freely (e.g. O1 GEMMs with the 8-bit optimizer). Unknown keys, wrong
types and values outside a field's choices raise :class:`ConfigError` naming the key, the valid choices and a close
match ("did you mean").
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "ActivationConfig",
    "CommConfig",
    "ConfigError",
    "Int8Config",
    "LinearConfig",
    "LossScalingConfig",
    "LowBitConfig",
    "ModuleOverride",
    "ModulePolicy",
    "MonitorConfig",
    "OperandConfig",
    "OptimizerConfig",
    "UnitScalingConfig",
    "ScalingConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
]


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message says which and how to fix it."""


def _choices(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


@dataclass(frozen=True)
class ScalingConfig:
    """How one operand's scale is chosen.

    ``delayed``: the scale comes from the amax history of earlier steps (one pass over the data; TE's default).
    ``current``: just-in-time, from this tensor's own amax (two passes, exact range). ``static``: a fixed
    ``static_scale`` (for unit-scaled models). Delayed scaling is tensorwise only; row/block granularities use current.
    """

    algo: str = _choices("delayed", "current", "static", default="delayed")
    history_len: int = 16
    amax_compute: str = _choices("max", "most_recent", default="max")
    margin: int = 0
    power_of_2: bool = False
    granularity: str = "tensor"
    static_scale: float = 1.0

    def __post_init__(self) -> None:
        from lowbit_amp.quant.granularity import Granularity

        try:
            gran = Granularity.parse(self.granularity)
        except ValueError as err:
            raise ConfigError(f"scaling.granularity: {err}") from None
        if self.history_len < 1:
            raise ConfigError(f"scaling.history_len must be >= 1, got {self.history_len}.")
        if self.algo == "delayed" and not gran.is_tensorwise:
            raise ConfigError(
                f"scaling.algo='delayed' needs granularity='tensor' (got {self.granularity!r}): per-row/block amax "
                "histories do not follow tokens across steps. Use algo='current' for row or block scaling."
            )
        if self.algo == "static" and not self.static_scale > 0:
            raise ConfigError(f"scaling.static_scale must be > 0 for algo='static', got {self.static_scale}.")

    def describe(self) -> str:
        if self.algo == "delayed":
            text = f"delayed{self.history_len}"
        elif self.algo == "static":
            text = "static"
        else:
            text = "current"
        if self.granularity not in ("tensor", "tensorwise"):
            text += f"/{self.granularity}"
        return text + ("/pow2" if self.power_of_2 else "")


@dataclass(frozen=True)
class OperandConfig:
    """Format, scaling and rounding of one GEMM operand.

    ``rounding``: ``nearest`` (round-to-nearest-even, torch's own conversion) or ``stochastic`` (up with probability
    equal to the remainder in ulps: unbiased, so small values are not systematically lost — arXiv 1905.12334 uses it
    for 8-bit training; here a cast option of every operand). Stochastic casts run the reference ops (the fused cast
    kernel rounds to nearest), drawing from torch's global generator.
    """

    format: str = "e4m3"
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    rounding: str = _choices("nearest", "stochastic", default="nearest")

    def __post_init__(self) -> None:
        from lowbit_amp.formats import get_format

        try:
            get_format(self.format)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class Int8Config:
    """INT8 GEMMs with dynamic fallback of outlier activation tiles (arXiv 2503.08040): row-scaled (the default:
    ``act_block``/``weight_block`` ``"row"``) or block-wise (e.g. ``"1x128"`` / ``"128x128"``).

    Row-scaled is the default since 2026-12-02: the same GEMM accuracy with fallback (docs/int8.md) and, on the
    4096-wide anchor step (H200), 43.95 ms per step against the block layout's 99.75 ms (bf16: 43.29 ms)."""

    act_block: str = "row"
    weight_block: str = "row"
    fallback: bool = True
    fallback_threshold: float = 6.0
    fallback_mode: str = _choices("residual", "hp", default="hp")  # measured better: docs/int8.md
    stochastic_grad: bool = False
    # The unit a fallback decision covers (rows x K-cols); its cols must equal act_block's, its rows are the kernel's
    # M tile, so a fallback costs one extra product for that tile only (see lowbit_amp/int8/fallback.py).
    fallback_block: str = "128x128"

    def __post_init__(self) -> None:
        from lowbit_amp.int8.layout import check_int8_config

        try:
            check_int8_config(self)
        except ValueError as err:
            raise ConfigError(f"linear.int8: {err}") from None


@dataclass(frozen=True)
class LinearConfig:
    """What a converted ``nn.Linear`` computes in (the per-module overridable part of the config)."""

    compute: str = _choices("hp", "fp8", "int8", default="fp8")
    input: OperandConfig = field(default_factory=lambda: OperandConfig("e4m3", ScalingConfig()))
    # Delayed like the other operands (Transformer Engine's default): the weight cast needs no amax pass before it,
    # which is what lets compiled O1 (one weight cast per forward) reach 1.44-1.45x over compiled bf16 instead of
    # 1.42-1.44x (H200, two runs); parity over 5 GPU seeds +0.51% vs O1-current +1.13% (docs/performance.md).
    weight: OperandConfig = field(default_factory=lambda: OperandConfig("e4m3", ScalingConfig()))
    grad_output: OperandConfig = field(default_factory=lambda: OperandConfig("e5m2", ScalingConfig()))
    fast_accum_forward: bool = True
    # Fused Triton casts on CUDA in eager mode (lowbit_amp/kernels/dispatch.py); False runs the reference ops.
    fused_cast: bool = True
    # Layers fed the same tensor object (SwiGLU's w1/w3, separate q/k/v) share one FP8 cast of it, each recording the
    # amax into its own state (lowbit_amp/nn/shared_input_cast.py); set up by amp.initialize.
    share_input_cast: bool = True
    # ``step``: FP8 W and Wᵀ are cast once per optimizer step and kept until it (the fastest with gradient
    # accumulation). ``none``: W is cast in every forward and dropped after its GEMM, and backward re-casts Wᵀ from the
    # weight with forward's scale (same codes) — no FP8 weight copy is held, 2 B/param less at the peak (eager; compiled
    # graphs never cache and keep Wᵀ alone, 1 B/param). The memory recipe: docs/recipes.md.
    weight_cache: str = _choices("step", "none", default="step")
    weight_grad: str = _choices("hp", "e4m3", "e5m2", default="hp")
    # With an FP8 ``weight_grad``: the dtype the weight-gradient GEMM writes before the FP8 encode. ``fp32`` (default):
    # one rounding, to FP8. ``bf16``: the GEMM's epilogue rounds to bf16 first (unit roundoff 2^-8, 16x finer than
    # E4M3's 2^-4), halving the transient full-size gradient and its write + read (docs/recipes.md: no measurable
    # quality change on CPU; on the H200 the same SQNR, no peak change, a 1.05x faster step). Ignored where
    # weight_grad is hp (that GEMM writes the weight's dtype), so a per-module hp override needs no change here.
    weight_grad_gemm: str = _choices("fp32", "bf16", default="fp32")
    # With an FP8 ``weight_grad``: how the backward's encode of the weight gradient rounds — ``nearest`` or
    # ``stochastic`` (unbiased; the reference ops, not the fused encode). Re-encodes while accumulating micro-batches
    # (``grad_accumulation: rescale``) round to nearest.
    weight_grad_rounding: str = _choices("nearest", "stochastic", default="nearest")
    grad_accumulation: str = _choices("rescale", "fp32", default="rescale")
    int8: Int8Config = field(default_factory=Int8Config)


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer rebuild at O2/O3: state formats per moment and master weights.

    ``exp_avg``: first moment (``fp32``, ``bf16``, ``e4m3``). ``exp_avg_sq``: second moment (``fp32``, ``fp16``, or
    ``e4m3_expand`` — E4M3 with COAT's dynamic range expansion; a plain-E4M3 second moment is not offered because it
    flushes small values to zero). ``master_weights``: ``none`` (update the model weights directly), ``fp32``,
    ``fp16`` (with a per-tensor scale) or ``bf16_sr`` (stochastic rounding on write-back).
    """

    enabled: bool = False
    exp_avg: str = _choices("fp32", "bf16", "e4m3", default="fp32")
    exp_avg_sq: str = _choices("fp32", "fp16", "e4m3_expand", default="fp32")
    master_weights: str = _choices("none", "fp32", "fp16", "bf16_sr", default="none")
    block_size: int = 128


@dataclass(frozen=True)
class CommConfig:
    """8-bit collectives (multi-rank runs only)."""

    grad_reduce: str = _choices("hp", "fp8", default="hp")
    weight_all_gather: str = _choices("hp", "fp8", default="hp")
    sync_amax: bool = True


@dataclass(frozen=True)
class ModuleOverride:
    """Fields of :class:`LinearConfig` to change for modules whose fully qualified name matches ``pattern`` (regex,
    ``re.search``). Later overrides win."""

    pattern: str = ""
    linear: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModulePolicy:
    """Which ``nn.Linear`` layers are converted.

    ``exclude``: regexes (``re.search`` on the fully qualified name) of layers kept in high precision — by default
    the LM head and embeddings. ``alignment``: FP8 tensor-core GEMMs need in/out features that are multiples of 16.
    ``min_gemm_size``: the shape-aware policy; layers with ``in_features * out_features`` below this stay in high
    precision because the casts cost more than the FP8 GEMM saves (0 disables; ``"auto"`` picks the measured
    threshold for the device and the layer's format: INT8's is higher, see ``lowbit_amp/nn/shape_policy.py``).
    """

    exclude: tuple[str, ...] = ("lm_head", "embed", r"(^|\.)head$", r"(^|\.)output$")
    alignment: int = 16
    min_gemm_size: Any = "auto"
    overrides: tuple[ModuleOverride, ...] = ()


@dataclass(frozen=True)
class LossScalingConfig:
    """apex-style dynamic loss scaling (needed for fp16 models; optional otherwise)."""

    mode: str = _choices("none", "dynamic", "static", default="none")
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0
    max_scale: float = 2.0**24
    # Enhanced loss scaling (Mellempudi et al., arXiv 1905.12334): ``[[step, floor], ...]`` raises the scale's lower
    # bound as training goes on, so a burst of overflows late in training cannot drive the scale down to where small
    # E5M2/fp16 gradients underflow again. Empty: the floor is ``min_scale`` throughout.
    floor_schedule: tuple = ()

    def __post_init__(self) -> None:
        from lowbit_amp.loss_scaler import normalize_floor_schedule

        try:
            object.__setattr__(self, "floor_schedule", normalize_floor_schedule(self.floor_schedule))
        except ValueError as err:
            raise ConfigError(f"loss_scaling.floor_schedule: {err}") from None


@dataclass(frozen=True)
class MonitorConfig:
    """Numerics monitor options (used when ``LowBitConfig.monitor`` is true; see docs/monitor.md).

    ``every``: sample one call of each layer out of ``every`` (counters, amax/scale); ``sqnr_every``: recompute the
    sampled GEMMs in float64 for an SQNR once per ``sqnr_every`` calls (0: never). ``auto_fallback``: move a layer to
    high precision after ``fallback_after`` consecutive samples with a saturated fraction above
    ``saturation_threshold`` on any operand. ``max_records``: samples kept per layer (oldest dropped).
    """

    every: int = 50
    sqnr_every: int = 200
    saturation_threshold: float = 1e-3
    auto_fallback: bool = False
    fallback_after: int = 3
    max_records: int = 1000

    def __post_init__(self) -> None:
        for name in ("every", "fallback_after", "max_records"):
            if getattr(self, name) < 1:
                raise ConfigError(f"monitor_options.{name} must be >= 1, got {getattr(self, name)}.")
        if self.sqnr_every < 0:
            raise ConfigError(f"monitor_options.sqnr_every must be >= 0 (0 disables), got {self.sqnr_every}.")
        if not 0.0 <= self.saturation_threshold < 1.0:
            raise ConfigError(f"monitor_options.saturation_threshold must be in [0, 1), got {self.saturation_threshold}.")


@dataclass(frozen=True)
class ActivationConfig:
    """Storage of the tensors autograd saves for backward (COAT FP8 activations; docs/recipes.md).

    ``storage``: ``hp`` (as the ops save them) or ``fp8`` (E4M3 with ``group_size`` consecutive elements per scale,
    two-stage group scaling; tensors below ``min_numel`` elements, parameters and attention/log-softmax saves stay
    exact; ``attention: fp8`` saves attention's q/k/v in FP8 too and recomputes attention in backward). Off by default
    at every level: it trades quantize/dequantize passes for activation memory. Eager mode only (a
    ``torch.compile``-d forward raises).
    """

    storage: str = _choices("hp", "fp8", default="hp")
    group_size: int = 16
    min_numel: int = 65536
    # With storage fp8: ``exact`` keeps everything attention saves in the model dtype; ``fp8`` saves q, k, v in FP8
    # and recomputes attention in backward (no output / logsumexp kept; lowbit_amp/recipes/fp8_attention.py).
    attention: str = _choices("exact", "fp8", default="exact")
    # With storage fp8: ``fused`` turns ``silu(a) * b`` / ``gelu(a) * b`` (SwiGLU, GeGLU) into nodes that save a and
    # b only (act(a) is recomputed) and whose backward decodes both in one pass, instead of three saved FP8 tensors
    # decoded to the model dtype (lowbit_amp/recipes/fp8_glu.py).
    glu: str = _choices("separate", "fused", default="separate")

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"activations.group_size must be >= 1, got {self.group_size}.")
        if self.min_numel < 0:
            raise ConfigError(f"activations.min_numel must be >= 0, got {self.min_numel}.")
        if self.attention == "fp8" and self.storage != "fp8":
            raise ConfigError("activations.attention='fp8' is part of FP8 activation storage (it saves attention's "
                              "q/k/v with that recipe's group scaling): set activations.storage: fp8 as well, or "
                              "leave activations.attention: exact.")
        if self.glu == "fused" and self.storage != "fp8":
            raise ConfigError("activations.glu='fused' is part of FP8 activation storage (it saves the gated "
                              "unit's inputs with that recipe's group scaling): set activations.storage: fp8 as well, or "
                              "leave activations.glu: separate.")


@dataclass(frozen=True)
class UnitScalingConfig:
    """Unit scaling (arXiv 2303.11257; docs/recipes.md): ``enabled`` re-initialises every ``nn.Linear`` weight to
    N(0, 1) after conversion and scales its ``y`` / ``dx`` / ``dW`` by ``1/sqrt(fan_in)`` / ``1/sqrt(fan_out)`` /
    ``1/sqrt(tokens)`` outside the GEMMs (``constrain``: the geometric mean for ``y`` and ``dx``), so every FP8 operand
    is near unit scale and the casts use a fixed scale — no amax, no history: the three operands' ``scaling.algo``
    must be ``static`` (``configs/unit_scaled_O1.yaml``). The loss's gradient must be unit-scaled too
    (``unit_scaled_cross_entropy``; a plain mean cross-entropy's gradients underflow the static E5M2 scale). It
    re-initialises the weights: for training from scratch (unit-variance weights may want a larger learning rate)."""

    enabled: bool = False
    constrain: bool = False


@dataclass(frozen=True)
class LowBitConfig:
    """Everything ``amp.initialize`` needs. Build one with :func:`lowbit_amp.levels.resolve_config`."""

    opt_level: str = "O1"
    linear: LinearConfig = field(default_factory=LinearConfig)
    modules: ModulePolicy = field(default_factory=ModulePolicy)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    loss_scaling: LossScalingConfig = field(default_factory=LossScalingConfig)
    monitor: bool = False
    monitor_options: MonitorConfig = field(default_factory=MonitorConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    unit_scaling: UnitScalingConfig = field(default_factory=UnitScalingConfig)

    def __post_init__(self) -> None:
        if self.unit_scaling.enabled:
            dynamic = [name for name in ("input", "weight", "grad_output")
                       if getattr(self.linear, name).scaling.algo != "static"]
            if dynamic and self.linear.compute == "fp8":
                raise ConfigError(
                    f"unit_scaling.enabled makes operands unit-scaled so FP8 casts need no dynamic scale, but "
                    f"linear.{{{', '.join(dynamic)}}}.scaling.algo is not 'static'. Set them to static (with "
                    f"static_scale: 1.0), e.g. start from configs/unit_scaled_O1.yaml, or disable unit scaling.")

    def replace(self, **changes: Any) -> "LowBitConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------- dict <-> dataclass


def _close(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Check ``value`` against field ``f``'s type and choices; convert lists to tuples and dicts to dataclasses."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if dataclasses.is_dataclass(default):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of {type(default).__name__} fields, got {value!r}.")
        return _merge(default, value, where)
    if f.name == "overrides":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of {{pattern: ..., linear: {{...}}}} entries, got {value!r}.")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, ModuleOverride):
                out.append(item)
                continue
            override = _merge(ModuleOverride(), item, f"{where}[{i}]")
            _merge(LinearConfig(), override.linear, f"{where}[{i}].linear")  # validate the fields now
            out.append(override)
        return tuple(out)
    if f.name == "min_gemm_size" and value == "auto":
        return value
    if f.name == "min_gemm_size":  # "auto" or a non-negative element count (the default's type, str, would reject 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where} must be 'auto' or an integer >= 0, got {value!r}.")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
    elif isinstance(default, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        value = tuple(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}={value!r} is not one of {list(choices)}.{_close(str(value), list(choices))}")
    return value


def _merge(base: Any, changes: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(base)}
    updates = {}
    for key, value in changes.items():
        if key not in fields:
            raise ConfigError(
                f"Unknown config key {where + '.' if where else ''}{key}; valid keys here are "
                f"{sorted(fields)}.{_close(key, list(fields))}"
            )
        if key == "linear" and isinstance(base, ModuleOverride):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.linear must be a mapping of LinearConfig fields, got {value!r}.")
            updates[key] = dict(value)
            continue
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            # merge into the value we already have (not the field default), so earlier layers survive
            updates[key] = _merge(current, value, f"{where + '.' if where else ''}{key}")
            continue
        updates[key] = _coerce(value, fields[key], f"{where + '.' if where else ''}{key}")
    try:
        return dataclasses.replace(base, **updates)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None


def apply_overrides(base: Any, changes: Mapping[str, Any], where: str = "") -> Any:
    """Return ``base`` with nested ``changes`` applied; dotted keys (``"linear.weight_grad"``) are expanded."""
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Config key {key!r} conflicts with another override of {part!r}.")
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return _merge(base, nested, where)


def config_from_dict(data: Mapping[str, Any], base: LowBitConfig | None = None) -> LowBitConfig:
    return apply_overrides(base or LowBitConfig(), data)


def config_to_dict(config: Any) -> Any:
    """Plain dict/list form (what the YAML files hold)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict; malformed files raise :class:`ConfigError` with the path."""
    import yaml

    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"Config file {os.fspath(path)!r} does not exist.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {os.fspath(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {os.fspath(path)!r} must hold a mapping at the top level, got {type(data).__name__}.")
    return data
