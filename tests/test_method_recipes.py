"""LEVI's remaining baselines as teacher recipes (teachers/method_recipes.py): each prepares a stored teacher
with its method's own model and objective, reloads to the same outputs, and teaches a KD student."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.runner import build_task, run_experiment
from fmtransfer.teachers.base import load_teacher_weights, prepare_teacher
from tests.conftest import TINY

TRAIN = {"epochs": 2, "batch_size": 16, "steps_per_epoch": 3, "lr": 0.001}


def _teacher(recipe: str, bert: str) -> dict[str, Any]:
    if recipe == "ensemble":
        return {"recipe": recipe, "small": {"name": "mlp", "hidden": [16]}, "method": {"encoder": bert},
                "train": TRAIN}
    method: dict[str, Any] = {"encoder": bert, "max_length": 16}
    if recipe != "finetune_full":
        method["probe_steps"] = 20
    if recipe == "wise_ft":
        method["curve_rows"] = 20
    return {"recipe": recipe, "method": method, "train": TRAIN}


@pytest.mark.parametrize("recipe", ["ensemble", "finetune_full", "lp_ft", "wise_ft", "lora"])
def test_baseline_recipe_prepares_a_teacher(recipe: str, tiny_bert: str, tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"cache_dir={tmp_path}", f"teachers.fm={json.dumps(_teacher(recipe, tiny_bert))}",
                             "method.teacher=fm", "train.epochs=1"])
    task = build_task(cfg)
    t = prepare_teacher("fm", cfg.teachers["fm"], task, tmp_path, seed=0)
    assert t.kind == "foundation" and t.outputs.shape == (task.num_rows, 2) and t.reps.shape[0] == task.num_rows
    assert 0.0 <= t.metrics["test"]["accuracy"] <= 1.0 and "shifted" in t.metrics["ood"]
    if recipe == "lora":
        assert 0 < t.trainable_params < t.params
    again = prepare_teacher("fm", cfg.teachers["fm"], task, tmp_path, seed=0)
    assert again.from_cache and torch.equal(again.outputs, t.outputs)
    model = load_teacher_weights(t, cfg.teachers["fm"], task, tmp_path)
    rows = task.splits["test"]
    with torch.no_grad():
        torch.testing.assert_close(model(task.gather(rows)), t.outputs[rows], atol=1e-4, rtol=1e-4)
    if recipe == "wise_ft":  # a KD student learns from the prepared teacher (one recipe: the others are alike)
        m = run_experiment(cfg, tmp_path / "kd", quiet=True)
        assert m["teachers"]["fm"]["recipe"] == "wise_ft" and m["teachers"]["fm"]["from_cache"]


def test_renamed_recipe_keeps_its_fingerprint_and_old_name(tiny_bert: str, tmp_path: Path) -> None:
    """`text_finetune` is the text recipe once called `finetune`: both names load the same config class and
    hash the same (artifacts prepared under the old name stay valid)."""
    from fmtransfer.registry import RECIPES
    from fmtransfer.teachers.base import teacher_fingerprint

    fps = []
    for name in ("finetune", "text_finetune"):
        t = {"recipe": name, "encoder": tiny_bert, "train": TRAIN}
        cfg = load_config(TINY, [f"cache_dir={tmp_path}", f"teachers.fm={json.dumps(t)}"])
        assert type(cfg.teachers["fm"]) is RECIPES.get("text_finetune").config_cls
        fps.append(teacher_fingerprint("fm", cfg.teachers["fm"], build_task(cfg), 0))
    assert fps[0] == fps[1]
    assert "finetune" not in RECIPES.names() and RECIPES.first_name("text_finetune") == "finetune"


def test_method_recipe_config_checks(tiny_bert: str) -> None:
    from fmtransfer.errors import ConfigError

    small = {"name": "mlp", "hidden": [8]}
    with pytest.raises(ConfigError, match=r"teachers.fm: small: recipe lp_ft's method holds no small model"):
        load_config(TINY, [f"teachers.fm={json.dumps({'recipe': 'lp_ft', 'small': small})}"])
    with pytest.raises(ConfigError, match=r"teachers.fm.method.rank: unknown key"):  # lp_ft's options only
        load_config(TINY, [f"teachers.fm={json.dumps({'recipe': 'lp_ft', 'method': {'rank': 2}})}"])
    cfg = load_config(TINY, [f"teachers.fm={json.dumps({'recipe': 'levi', 'small': small})}"])
    assert cfg.teachers["fm"].method.name == "levi" and cfg.teachers["fm"].small.name == "mlp"


def test_method_recipe_configs_round_trip() -> None:
    """A run folder's config.yaml (dump_config) loads back to the same teacher configs (export reads it)."""
    import yaml

    from fmtransfer.config import dump_config
    from fmtransfer.teachers.method_recipes import METHOD_RECIPES

    teachers = {f"t_{r}": {"recipe": r} for r in METHOD_RECIPES}
    cfg = load_config(TINY, [f"teachers={json.dumps(teachers)}"])
    again = load_config(raw=yaml.safe_load(dump_config(cfg)))
    assert again.teachers == cfg.teachers
