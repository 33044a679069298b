"""The ``lowbit-amp`` CLI, run in-process on a tiny model for a few steps (a few seconds on 2 CPU cores)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

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


# ------------------------------------------------------------------------------------------------ several seeds


@pytest.fixture(scope="module")
def multi_seed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str, dict]:
    path = tmp_path_factory.mktemp("cli") / "seeds.json"
    code, out, err = run_cli("--levels", "O0,O1", "--seed", "3", "--seeds", "3", "--json", str(path), *TINY)
    payload = json.loads(path.read_text()) if path.exists() else {}
    return code, out, err, payload


def _sample_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _summary_rows(out: str) -> dict[str, list[str]]:
    lines = out[out.index("\nsummary over"):].strip().splitlines()[2:]  # skip the title and the header
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines)}


def test_multi_seed_json_and_summary_match_per_seed_numbers(multi_seed_run: tuple[int, str, str, dict]) -> None:
    code, out, err, payload = multi_seed_run
    assert code == 0, err
    assert set(payload) == {"meta", "runs", "summary"}  # several seeds: "runs" replaces the single-seed "levels"
    assert payload["meta"]["seeds"] == [3, 4, 5] and "seed" not in payload["meta"]
    runs = payload["runs"]
    assert [run["seed"] for run in runs] == [3, 4, 5]
    assert all(list(run["levels"]) == ["O0", "O1"] for run in runs)
    summary = payload["summary"]
    assert summary["base"] == "O0" and summary["seeds"] == [3, 4, 5] and summary["n_seeds"] == 3

    for label in ("O0", "O1"):
        val = [run["levels"][label]["val_loss"] for run in runs]
        base = [run["levels"]["O0"]["val_loss"] for run in runs]
        rel = [v / b - 1 for v, b in zip(val, base)]
        stats = summary["levels"][label]
        assert stats["val_loss"] == val and stats["rel_vs_base"] == pytest.approx(rel, rel=1e-12, abs=1e-15)
        assert stats["val_loss_mean"] == pytest.approx(sum(val) / 3, rel=1e-12)
        assert stats["val_loss_std"] == pytest.approx(_sample_std(val), rel=1e-9)
        assert stats["rel_vs_base_mean"] == pytest.approx(sum(rel) / 3, rel=1e-9, abs=1e-15)
        assert stats["rel_vs_base_se"] == pytest.approx(_sample_std(rel) / math.sqrt(3), rel=1e-9, abs=1e-15)
        worst = max(range(3), key=lambda i: (rel[i], val[i]))
        assert stats["worst_seed"] == [3, 4, 5][worst] and stats["worst_rel_vs_base"] == pytest.approx(rel[worst])
        assert stats["seeds_worse_than_base"] == sum(r > 0 for r in rel)
        final = [run["levels"][label]["final_train_loss"] for run in runs]
        assert stats["final_train_loss_mean"] == pytest.approx(sum(final) / 3, rel=1e-12)
    o0 = summary["levels"]["O0"]
    assert o0["rel_vs_base"] == [0.0, 0.0, 0.0] and o0["rel_vs_base_t"] is None
    assert o0["worst_seed"] == [3, 4, 5][max(range(3), key=lambda i: o0["val_loss"][i])]  # base: highest val loss

    rows = _summary_rows(out)
    o1 = summary["levels"]["O1"]
    assert rows["val loss mean"] == [f"{o0['val_loss_mean']:.4f}", f"{o1['val_loss_mean']:.4f}"]
    assert rows["val loss std"][1] == f"{o1['val_loss_std']:.4f}"
    assert rows["val vs O0, paired mean"] == ["+0.00%", f"{100 * o1['rel_vs_base_mean']:+.2f}%"]
    assert rows["standard error"][1] == f"{100 * o1['rel_vs_base_se']:.2f}%"
    assert rows["worst seed vs O0"][1] == f"{100 * o1['worst_rel_vs_base']:+.2f}% (s{o1['worst_seed']})"
    assert rows["seeds worse than O0"][1] == f"{o1['seeds_worse_than_base']}/3"
    assert "val loss per seed" in out and out.count("\nseed 4\n") == 1  # the per-seed full tables are printed too


def test_seeds_differ_and_a_seed_reproduces_exactly(multi_seed_run: tuple[int, str, str, dict], tmp_path) -> None:
    code, _, err, payload = multi_seed_run
    assert code == 0, err
    by_seed = {run["seed"]: run["levels"] for run in payload["runs"]}
    for label in ("O0", "O1"):
        first_losses = [by_seed[s][label]["losses"][0] for s in (3, 4, 5)]
        assert len(set(first_losses)) == 3  # a seed changes the init and the batches
        assert len({by_seed[s][label]["val_loss"] for s in (3, 4, 5)}) == 3
    # Seed 4 alone (a separate run, single-seed schema) reproduces seed 4 of the multi-seed run bit for bit.
    path = tmp_path / "one.json"
    code, _, err = run_cli("--levels", "O0,O1", "--seed", "4", "--json", str(path), *TINY)
    assert code == 0, err
    single = json.loads(path.read_text())
    assert set(single) == {"meta", "levels", "summary"} and single["meta"]["seed"] == 4
    for label in ("O0", "O1"):
        assert single["levels"][label]["losses"] == by_seed[4][label]["losses"]
        assert single["levels"][label]["val_loss"] == by_seed[4][label]["val_loss"]
    assert single["summary"]["n_seeds"] == 1 and single["summary"]["levels"]["O1"]["val_loss_std"] is None
    assert single["summary"]["levels"]["O1"]["rel_vs_base"] == [
        single["levels"]["O1"]["val_loss"] / single["levels"]["O0"]["val_loss"] - 1]


def test_single_seed_json_gains_only_a_summary(o0_o1_run: tuple[int, str, str, dict]) -> None:
    code, out, err, payload = o0_o1_run
    assert code == 0, err
    assert set(payload) == {"meta", "levels", "summary"} and payload["meta"]["seed"] == 0
    assert "summary over" not in out  # one seed: the table alone, as before
    levels, summary = payload["levels"], payload["summary"]
    assert list(summary["levels"]) == list(levels) and summary["seeds"] == [0]
    assert summary["levels"]["O1"]["val_loss_mean"] == levels["O1"]["val_loss"]


def test_validation_batches_are_the_same_for_every_level_and_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit_amp import train_loop
    from lowbit_amp.data.stdlib_text import load_stdlib_corpus

    seen: list[list[torch.Tensor]] = []
    real_evaluate = train_loop.evaluate

    def recording_evaluate(model, sampler, batches):  # type: ignore[no-untyped-def]
        real_sample, got = sampler.sample, []
        seen.append(got)

        def sample():  # type: ignore[no-untyped-def]
            x, y = real_sample()
            got.append(x.clone())
            return x, y

        sampler.sample = sample
        return real_evaluate(model, sampler, batches)

    monkeypatch.setattr(train_loop, "evaluate", recording_evaluate)
    corpus = load_stdlib_corpus(65536)
    first_batch = []
    for seed in (0, 7):
        settings = train_loop.TrainSettings(steps=1, batch_size=4, block_size=32, n_embd=64, eval_batches=3,
                                            seed=seed, max_bytes=65536)
        for level in ("O0", "O1"):
            train_loop.train_level(level, resolve_config(level), settings, corpus,
                                   on_step=lambda step, loss, s: first_batch.append(loss))
    assert len(seen) == 4 and all(len(batches) == 3 for batches in seen)
    for batches in seen[1:]:
        assert all(torch.equal(a, b) for a, b in zip(batches, seen[0]))
    assert first_batch[0] != first_batch[2]  # ... while the training seed did change the run


@pytest.mark.parametrize("text, first, want", [("3", 0, [0, 1, 2]), ("2", 5, [5, 6]), ("4,1,9", 5, [4, 1, 9]),
                                               ("7,", 0, [7]), ("1", 3, [3])])
def test_parse_seeds(text: str, first: int, want: list[int]) -> None:
    assert cli.parse_seeds(text, first) == want


@pytest.mark.parametrize("text", ["0", "-1", "x", "1,1", ",", "1.5"])
def test_bad_seeds_exit_2(text: str) -> None:
    code, out, err = run_cli("--levels", "O0", "--seeds", text, *TINY)
    assert code == 2 and "--seeds" in err and out == ""


def test_summarize_arithmetic_on_known_numbers() -> None:
    def result(val: float) -> dict:
        return {"opt_level": "x", "val_loss": val, "final_train_loss": val + 0.5, "median_step_ms": 10.0}

    runs = [{"seed": s, "levels": {"A": result(a), "B": result(b)}}
            for s, a, b in [(10, 2.0, 2.02), (11, 4.0, 3.96), (12, 2.5, 2.6)]]
    b = cli.summarize(runs)["levels"]["B"]
    rel = [0.01, -0.01, 0.04]
    mean = sum(rel) / 3
    se = math.sqrt(sum((r - mean) ** 2 for r in rel) / 2) / math.sqrt(3)
    assert b["rel_vs_base"] == pytest.approx(rel)
    assert b["rel_vs_base_mean"] == pytest.approx(0.04 / 3)
    assert b["rel_vs_base_se"] == pytest.approx(se) and se == pytest.approx(0.0145297, rel=1e-5)
    assert b["rel_vs_base_t"] == pytest.approx(mean / se)
    assert b["val_loss_mean"] == pytest.approx(8.58 / 3) and b["val_loss_std"] == pytest.approx(
        _sample_std([2.02, 3.96, 2.6]))
    assert (b["worst_seed"], b["worst_rel_vs_base"], b["worst_val_loss"]) == (12, pytest.approx(0.04), 2.6)
    assert b["seeds_worse_than_base"] == 2
    assert cli.summarize(runs)["levels"]["A"]["worst_seed"] == 11  # the base: its highest val loss
    with pytest.raises(ValueError, match="ran levels"):
        cli.summarize([runs[0], {"seed": 13, "levels": {"B": result(1.0), "A": result(1.0)}}])


def test_float16_training_is_refused_with_the_reason() -> None:
    """Pure-fp16 parameters under the loop's AdamW go NaN after one step at every level (eps underflows in fp16)."""
    from lowbit_amp.train_loop import TrainSettings

    with pytest.raises(ValueError, match="use 'bfloat16'"):
        TrainSettings(dtype="float16")
