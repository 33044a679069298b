"""Config objects, presets, YAML mirroring, precedence and error messages."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

from lowbit_amp.config import ConfigError, LinearConfig, ScalingConfig, apply_overrides, config_to_dict
from lowbit_amp.levels import PRESETS, preset, resolve_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("level", list(PRESETS))
def test_yaml_files_mirror_presets_one_to_one(level: str) -> None:
    path = CONFIGS / f"{level}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data == config_to_dict(PRESETS[level]), f"{path} drifted; run: PYTHONPATH=. python tools/gen_configs.py"
    assert resolve_config(str(path)) == PRESETS[level]


def test_every_yaml_in_configs_loads() -> None:
    for path in CONFIGS.glob("*.yaml"):
        resolve_config(str(path))


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["O1"].opt_level = "O3"  # type: ignore[misc]


def test_precedence_keyword_over_yaml_over_level(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("opt_level: O2\nlinear:\n  weight_grad: e5m2\n  fast_accum_forward: false\n")
    cfg = resolve_config(str(path))
    assert cfg.opt_level == "O2" and cfg.linear.weight_grad == "e5m2" and cfg.optimizer.enabled
    assert cfg.linear.fast_accum_forward is False
    cfg = resolve_config(str(path), {"linear.weight_grad": "e4m3"})
    assert cfg.linear.weight_grad == "e4m3" and cfg.linear.fast_accum_forward is False


def test_unknown_opt_level() -> None:
    with pytest.raises(ConfigError, match=r"Unknown opt_level 'O4'.*valid levels.*'O0'"):
        preset("O4")
    with pytest.raises(ConfigError, match="Did you mean 'int8'"):
        preset("int9")
    assert preset("o2") is PRESETS["O2"]


@pytest.mark.parametrize("change,match", [
    ({"linear.wieght_grad": "e4m3"}, r"Unknown config key linear\.wieght_grad.*Did you mean 'weight_grad'"),
    ({"linear.weight_grad": "e3m4"}, r"linear\.weight_grad='e3m4' is not one of"),
    ({"linear.input.scaling.history_len": "16"}, r"history_len must be an integer"),
    ({"linear.input.scaling.history_len": 0}, r"history_len must be >= 1"),
    ({"linear.input.scaling.granularity": "row"}, r"algo='delayed' needs granularity='tensor'"),
    ({"linear.input.format": "e4m4"}, r"Unknown number format 'e4m4'"),
    ({"modules.exclude": "lm_head"}, r"modules\.exclude must be a list"),
    ({"monitor": "yes"}, r"monitor must be true or false"),
    ({"modules.overrides": [{"pattern": "x", "linear": {"computee": "hp"}}]}, r"Did you mean 'compute'"),
])
def test_bad_values_name_the_key_and_the_fix(change, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=match):
        resolve_config("O1", change)


def test_bad_yaml_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("linear: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("opt_level: O1\nlinaer:\n  compute: fp8\n")
    with pytest.raises(ConfigError, match="Did you mean 'linear'"):
        resolve_config(str(typo))


def test_nested_sections_merge_field_by_field() -> None:
    base = LinearConfig()
    changed = apply_overrides(base, {"input": {"scaling": {"margin": 2}}})
    assert changed.input.scaling.margin == 2
    assert changed.input.scaling.history_len == base.input.scaling.history_len
    assert changed.input.format == "e4m3"


def test_scaling_describe() -> None:
    assert ScalingConfig().describe() == "delayed16"
    assert ScalingConfig(algo="current", granularity="1x128", power_of_2=True).describe() == "current/1x128/pow2"
