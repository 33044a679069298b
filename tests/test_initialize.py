"""``amp.initialize`` end to end on CPU: conversion, eligibility report, errors, checkpoints, loss scaling."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit_amp as amp
from lowbit_amp.config import ConfigError


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 64, dtype=dtype)
        self.fc1 = nn.Linear(64, 128, dtype=dtype)
        self.odd = nn.Linear(128, 72 + 3, dtype=dtype)  # 75 outputs: not a multiple of 16
        self.fc2 = nn.Linear(75, 64, dtype=dtype)
        self.lm_head = nn.Linear(64, 32, dtype=dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        h = torch.relu(self.fc1(h))
        h = self.fc2(torch.relu(self.odd(h)))
        return self.lm_head(h)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (4, 8), generator=g)
    return x, (x * 7 + 3) % 32  # a learnable mapping


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for s in steps:
        x, y = batch(s)
        loss = nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_o1_converts_eligible_layers_and_reports_why_others_stay() -> None:
    torch.manual_seed(0)
    model = Net()
    weight = model.fc1.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model2, opt2 = amp.initialize(model, opt, opt_level="O1")
    assert model2 is model and opt2 is opt
    assert isinstance(model.fc1, amp.LowBitLinear) and model.fc1.weight is weight  # same Parameter object
    assert not isinstance(model.odd, amp.LowBitLinear) and not isinstance(model.fc2, amp.LowBitLinear)
    assert not isinstance(model.lm_head, amp.LowBitLinear)
    text = amp.summary(model)
    assert "1 of 4 linear layers converted" in text
    assert "not a multiple of 16" in text and "excluded by pattern 'lm_head'" in text
    assert "i:e4m3/delayed16,w:e4m3/delayed16,go:e5m2/delayed16" in repr(model)
    losses = train(model, opt, range(30))
    assert losses[-1] < losses[0]
    assert model.fc1.input_scaling._warm


def test_o0_is_the_same_path_and_bitwise_the_baseline() -> None:
    torch.manual_seed(0)
    base = Net()
    ours = copy.deepcopy(base)
    opt_b = torch.optim.AdamW(base.parameters(), lr=1e-3)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    amp.initialize(ours, opt_o, opt_level="O0")
    assert isinstance(ours.fc1, amp.LowBitLinear) and ours.fc1.lb_config.compute == "hp"
    assert train(base, opt_b, range(5)) == train(ours, opt_o, range(5))


def test_per_module_overrides_and_exclude() -> None:
    model = Net()
    amp.initialize(model, opt_level="O1", modules={"exclude": ["lm_head"], "alignment": 1, "overrides": [
        {"pattern": r"^fc2$", "linear": {"compute": "hp"}},
        {"pattern": r"^odd$", "linear": {"input": {"scaling": {"algo": "current"}}}},
    ]})
    assert model.fc2.lb_config.compute == "hp"
    assert model.odd.lb_config.input.scaling.algo == "current"
    assert model.fc1.lb_config.input.scaling.algo == "delayed"
    assert not isinstance(model.lm_head, amp.LowBitLinear)


def test_keyword_override_dotted_and_yaml_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cfg.yaml"
    path.write_text("opt_level: O1\nlinear:\n  grad_output:\n    format: e4m3\n")
    model = amp.initialize(Net(), opt_level=str(path), overrides={"linear.input.scaling.margin": 1})
    cfg = model.fc1.lb_config
    assert cfg.grad_output.format == "e4m3" and cfg.input.scaling.margin == 1


def test_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="Unknown opt_level"):
        amp.initialize(Net(), opt_level="O7")
    with pytest.raises(TypeError, match="nn.Module"):
        amp.initialize("not a model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        amp.initialize(Net(), optimizer=[1, 2])  # type: ignore[arg-type]
    model = amp.initialize(Net(), opt_level="O1")
    with pytest.raises(ConfigError, match="twice"):
        amp.initialize(model, opt_level="O1")
    with pytest.raises(amp.NoEligibleLayersError, match="not a multiple of 16"):
        amp.initialize(nn.Sequential(nn.Linear(10, 10)), opt_level="O1")
    with pytest.raises(ValueError, match="amp.initialize"):
        amp.summary(Net())


def test_checkpoint_resume_is_bit_exact() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp.initialize(model, opt, opt_level="O1")
    train(model, opt, range(4))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert any("input_scaling.amax_history" in k for k in ckpt["model"])
    after = train(model, opt, range(4, 8))

    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    fresh = Net()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    amp.initialize(fresh, fresh_opt, opt_level="O1")
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    assert train(fresh, fresh_opt, range(4, 8)) == after
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("level", ["int8", "configs/int8_row.yaml", "O3"])
def test_checkpoint_resume_is_bit_exact_at_other_levels(level: str) -> None:
    """The same resume check for the INT8 layouts (the weight quantization is a cache, rebuilt from the weights; the
    fallback fraction is a non-persistent monitoring buffer) and for O3's rebuilt optimizer."""
    model, opt = _init(level, 0)
    train(model, opt, range(4))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    after = train(model, opt, range(4, 8))
    fresh, fresh_opt = _init(level, 1)  # a different init: everything must come from the checkpoint
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    assert train(fresh, fresh_opt, range(4, 8)) == after
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def _init(level: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    return amp.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), opt_level=level)


def test_bf16_model_trains() -> None:
    torch.manual_seed(0)
    model = Net(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    amp.initialize(model, opt, opt_level="O1")
    losses = train(model, opt, range(30))
    assert losses[-1] < losses[0] - 0.1


def test_fp16_loss_scaler_skips_nonfinite_steps_without_touching_state() -> None:
    torch.manual_seed(0)
    model = Net(torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)  # pure-fp16 Adam underflows v; not under test
    amp.initialize(model, opt, opt_level="O1")
    scaler = opt.lowbit_loss_scaler
    assert scaler.config.mode == "dynamic"  # automatic for fp16 models
    x, y = batch(0)
    with amp.scale_loss(nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten()), opt) as scaled:
        scaled.backward()
    opt.step()
    opt.zero_grad()
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    scale = scaler.scale
    loss = nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    with amp.scale_loss(loss * float("inf"), opt) as scaled:
        scaled.backward()
    opt.step()
    assert scaler.scale == scale / 2 and scaler.skipped_steps == 1
    for name, value in model.state_dict().items():
        if "scaling" not in name:
            assert torch.equal(value, weights[name]), name
    after = opt.state_dict()
    for pid, st in state["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][pid][key])), (pid, key)


def test_import_is_light_and_does_not_touch_cuda() -> None:
    code = (
        "import sys, torch; import lowbit_amp; "
        "bad = [m for m in ('triton', 'deepspeed', 'transformer_engine') if m in sys.modules]; "
        "assert not bad, bad; assert not torch.cuda.is_initialized(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_shape_policy_keeping_every_layer_warns_and_leaves_model_unchanged() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="min_gemm_size"):
        amp.initialize(model, opt_level="O1", modules={"min_gemm_size": 10**6})
    assert not any(isinstance(m, amp.LowBitLinear) for m in model.modules())
    assert "too small to gain" in amp.summary(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_fused_optimizer_updates_reach_the_fp8_weights(level: str) -> None:
    """torch's ``AdamW(fused=True)`` writes weights without bumping ``_version`` (the FP8 weight cache's key): the
    step post-hook must drop the caches, or every later forward multiplies the *initial* FP8 weights (a real bug:
    O1 loss stayed flat under fused AdamW, 2026-12-01). Fused and foreach AdamW must train the same model alike."""
    losses = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fused, foreach=None if fused else True)
        model, opt = amp.initialize(model, opt, opt_level=level, modules={"min_gemm_size": 0})
        losses[fused] = train(model, opt, range(12))
        layer = model.fc1
        assert layer._weight_cache is None, "the step post-hook leaves no stale FP8 weight cast behind"
    assert losses[True][-1] < 0.9 * losses[True][0], f"fused AdamW did not train: {losses[True]}"
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 1e-3 * abs(b), (losses[True], losses[False])


def test_optimizer_section_is_passed_as_optimizer_config() -> None:
    """The config's ``optimizer`` section cannot be a keyword of ``initialize`` (its second parameter is the torch
    optimizer): ``optimizer_config=`` is the keyword, and a dict given as the optimizer gets an error naming it."""
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, low = amp.initialize(model, opt, opt_level="O3", optimizer_config={"exp_avg_sq": "e4m3_expand"})
    assert low.exp_avg_sq_codec.name == "e4m3_expand"
    with pytest.raises(TypeError, match="optimizer_config"):
        amp.initialize(Net(), opt_level="O3", optimizer={"exp_avg_sq": "e4m3_expand"})


def test_summary_lists_the_model_wide_pieces() -> None:
    """``amp.summary`` shows, after the layers, what is not per layer: weight gradients, optimizer states, the FP8
    weight copy, activation storage (with the last forward's counts) and loss scaling."""
    plain = amp.initialize(nn.Sequential(nn.Linear(64, 64)), opt_level="O1", overrides={"modules.min_gemm_size": 0})
    text = amp.summary(plain)
    assert "weight gradients: model dtype" in text and "saved activations: as the ops save them" in text
    assert "FP8 weight copy between forward and backward: kept per step" in text

    model = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 64))
    model, _ = amp.initialize(model, torch.optim.AdamW(model.parameters()), "configs/O3_low_memory.yaml",
                              overrides={"modules.min_gemm_size": 0, "activations.min_numel": 1024})
    model(torch.randn(32, 64)).sum().backward()
    text = amp.summary(model)
    assert "weight gradients: e4m3 (nearest rounding, bf16 GEMM output)" in text
    assert "optimizer states: m e4m3, v e4m3_expand, master bf16_sr" in text
    assert "FP8 weight copy between forward and backward: none" in text
    assert "saved activations: FP8, 1x16 groups" in text and "attention fp8, gated units fused" in text
    assert "last forward: " in text


def test_fp16_params_with_unfused_adam_warn_and_the_warning_is_right() -> None:
    """fp16 parameters under torch's AdamW(eps=1e-8) go NaN after one step (eps is 0 in fp16); initialize says so."""
    import warnings

    def model_and_opt(fused: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).half()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)

    model, opt = model_and_opt(False)
    with pytest.warns(UserWarning, match="eps=1e-08.*float16"):
        model, opt = amp.initialize(model, opt, "O0")
    x = torch.randn(16, 32).half()
    for _ in range(2):
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # what the warning predicts
    model, opt = model_and_opt(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp.initialize(model, opt, "O0")  # fused: FP32 math inside, no warning
