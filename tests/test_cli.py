"""The ``lowbit-amp`` CLI, run in-process on a tiny model for a few steps (a few seconds on 2 CPU cores)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest

from lowbit_amp import cli, level_pieces
from lowbit_amp.config_files import available_configs, locate_config, packaged_config
from lowbit_amp.levels import PRESETS, resolve_config
from lowbit_amp.progress import ProgressBar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--batch-size", "4", "--block-size", "32", "--n-embd", "64", "--n-head", "4", "--eval-batches", "2",
         "--max-bytes", "65536", "--quiet"]
TINY = ["--steps", "6", *SHAPE]


def run_cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def o0_o1_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str, dict]:
    path = tmp_path_factory.mktemp("cli") / "out.json"
    code, out, err = run_cli("--levels", "O0,O1,O0", "--json", str(path), *TINY)
    payload = json.loads(path.read_text()) if path.exists() else {}
    return code, out, err, payload


def test_o0_o1_table_and_json(o0_o1_run: tuple[int, str, str, dict]) -> None:
    code, out, err, payload = o0_o1_run
    assert code == 0, err
    levels = payload["levels"]
    assert list(levels) == ["O0", "O1", "O0'"]  # a repeated level gets a distinct label
    o0, o1 = levels["O0"], levels["O1"]
    for result in levels.values():
        assert len(result["losses"]) == 6
        assert all(math.isfinite(v) for v in result["losses"])
        assert math.isfinite(result["val_loss"]) and result["median_step_ms"] > 0
        assert result["state_mib"] > 0 and result["saved_activations_mib"] > 0
        assert result["peak_allocated_mib"] is None  # CPU: no allocator statistics, reported as n/a
    # TinyGPT(n_embd=64): 2 blocks x (qkv, proj, fc_in, fc_out) convert at O1; lm_head stays (excluded by default).
    assert (o0["lowbit_layers"], o1["lowbit_layers"], o1["linear_layers"]) == (0, 8, 9)
    # Same init and data: the first losses agree closely, but O1 really ran in FP8 (not bit-identical to O0) ...
    assert o1["losses"][0] == pytest.approx(o0["losses"][0], rel=0.01)
    assert o1["losses"] != o0["losses"]
    # ... and a repeated level reproduces bit for bit (seeded init and data).
    assert levels["O0'"]["losses"] == o0["losses"]
    assert payload["meta"]["steps"] == 6 and payload["meta"]["device"] == "cpu"

    table = out[out.index("\n\n") + 2:].splitlines()
    assert table[0].split() == ["O0", "O1", "O0'"]
    rows = {line[:28].strip(): line[28:].split() for line in table[1:]}
    assert rows["low-bit linear layers"] == ["0/9", "8/9", "0/9"]
    assert rows["val loss"] == [f"{r['val_loss']:.4f}" for r in levels.values()]
    assert rows["median step (ms)"] == [f"{r['median_step_ms']:.1f}" for r in levels.values()]
    assert rows["val loss vs O0"][0] == "+0.00%"
    assert "weights+grads+optim (MiB)" in rows and "saved activations (MiB)" in rows


def test_json_to_stdout_keeps_stdout_pure_json() -> None:
    code, out, err = run_cli("--levels", "O0", "--json", "-", "--steps", "2", *SHAPE)
    assert code == 0, err
    assert json.loads(out)["levels"]["O0"]["opt_level"] == "O0"
    assert "val loss" in err  # the table went to stderr


def test_missing_piece_is_reported_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = level_pieces.importlib.import_module

    def fake_import(name: str):  # type: ignore[no-untyped-def]
        if name == "lowbit_amp.nn.int8_function":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name)

    monkeypatch.setattr(level_pieces.importlib, "import_module", fake_import)
    code, out, err = run_cli("--levels", "O0,int8", *TINY)
    assert code == 2
    assert "'int8'" in err and "lowbit_amp.nn.int8_function" in err and "--levels O0,O1" in err
    assert "val loss" not in out  # O0 did not train first and then crash


@pytest.mark.parametrize("level, module", [("O2", "lowbit_amp.optim.build"), ("O3", "lowbit_amp.grads.fp8_grad")])
def test_pieces_for_o2_o3(level: str, module: str) -> None:
    modules = [piece.module for piece in level_pieces.pieces_for(PRESETS[level])]
    assert module in modules
    assert level_pieces.pieces_for(PRESETS["O1"]) == []
    # A per-module override that asks for INT8 needs the INT8 GEMM even at O1.
    config = resolve_config("O1", {"modules": {"overrides": [{"pattern": "mlp", "linear": {"compute": "int8"}}]}})
    assert level_pieces.INT8_GEMM in level_pieces.pieces_for(config)


def test_unknown_level_and_bad_override_exit_2() -> None:
    code, _, err = run_cli("--levels", "O1,O9", *TINY)
    assert code == 2 and "Unknown opt_level 'O9'" in err and "'O0'" in err
    code, _, err = run_cli("--levels", "O1", "--set", "linear.input.scaling.algoo=current", *TINY)
    assert code == 2 and "Did you mean 'algo'" in err
    code, _, err = run_cli("--levels", "O1", "--set", "novalue", *TINY)
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = run_cli("--levels", "O1", "--steps", "2", "--n-embd", "72")
    assert code == 2 and "multiple of 16" in err


def test_set_overrides_win_over_levels_and_yaml() -> None:
    overrides = cli._parse_overrides(["linear.input.scaling.algo=current", "linear.input.scaling.history_len=4"])
    (_, config), = cli.resolve_levels(["configs/O2_per_module.yaml"], overrides)
    assert config.opt_level == "O2"
    assert config.linear.input.scaling.algo == "current" and config.linear.input.scaling.history_len == 4
    assert config.modules.overrides  # the YAML's own per-module rules survive


def test_shipped_configs_found_from_any_directory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"O0", "O1", "O2", "O3", "int8"} <= set(available_configs())
    monkeypatch.chdir(tmp_path)  # no configs/ here
    found = locate_config("configs/O1.yaml")
    with open(found) as got, open(os.path.join(REPO, "configs", "O1.yaml")) as want:
        assert got.read() == want.read()
    assert resolve_config("configs/O2_per_module.yaml").opt_level == "O2"
    assert packaged_config("O2_per_module").name == "O2_per_module.yaml"
    with pytest.raises(FileNotFoundError, match="shipped configs are"):
        packaged_config("O7")
    assert locate_config("elsewhere/O1.yaml") == "elsewhere/O1.yaml"  # only bare names and configs/ fall back


def test_progress_bar_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(8, "O1", stream=stream, interactive=False)
    for step in range(8):
        bar.update(1, f"loss {step}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("]")[1].split()[0] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert "\r" not in stream.getvalue() and "done in" in lines[-1]


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(3, "O0", stream=stream, interactive=True, refresh_s=0.0, width=6)
    for _ in range(3):
        bar.update()
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "[######] 3/3" in text


def test_module_entry_point_help() -> None:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "lowbit_amp", "--help"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--levels" in done.stdout and "O2_per_module" in done.stdout
