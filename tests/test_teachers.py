"""Teacher preparation: artifacts are reused, stale or corrupt ones rebuilt, text recipes run on a tiny BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.runner import build_task
from fmtransfer.teachers.base import load_teacher_weights, prepare_teacher
from tests.conftest import TINY


def _prepare(cfg, task, name="wide", seed=0):  # type: ignore[no-untyped-def]
    return prepare_teacher(name, cfg.teachers[name], task, cfg.cache_dir, seed=seed)


def test_artifact_is_reused_then_rebuilt_when_corrupt_or_changed(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(TINY, [f"cache_dir={tmp_path}"])
    task = build_task(cfg)
    first = _prepare(cfg, task)
    assert not first.from_cache and first.forward_rows_run == task.num_rows
    assert first.outputs.shape == (task.num_rows, 2)
    second = _prepare(cfg, task)
    assert second.from_cache and second.forward_rows_run == 0
    torch.testing.assert_close(first.outputs, second.outputs)

    # truncate the stored outputs: detected, rebuilt with a message, same result (same seed)
    out = first.path / "outputs.npy"
    out.write_bytes(out.read_bytes()[:100])
    third = _prepare(cfg, task)
    assert not third.from_cache and "unusable" in capsys.readouterr().out
    torch.testing.assert_close(first.outputs, third.outputs, atol=1e-5, rtol=0)

    # outputs of the wrong shape (a teacher that does not fit the task) are not used
    np.save(out, np.zeros((task.num_rows, 3), np.float32))
    assert not _prepare(cfg, task).from_cache

    # a different seed, config or dataset is a different artifact
    assert _prepare(cfg, task, seed=1).fingerprint != first.fingerprint
    cfg2 = load_config(TINY, [f"cache_dir={tmp_path}", "teachers.wide.train.lr=0.02"])
    assert _prepare(cfg2, task).fingerprint != first.fingerprint
    task2 = build_task(load_config(TINY, [f"cache_dir={tmp_path}", "task.labels=50"]))
    assert _prepare(cfg, task2).fingerprint != first.fingerprint


def test_teacher_metrics_match_its_outputs(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"cache_dir={tmp_path}"])
    task = build_task(cfg)
    t = _prepare(cfg, task)
    rows = task.splits["test"]
    assert t.metrics["test"]["accuracy"] == pytest.approx(task.score(t.outputs[rows], rows)["accuracy"])
    model = load_teacher_weights(t, cfg.teachers["wide"], task, cfg.cache_dir)
    with torch.no_grad():
        live = model(task.gather(rows))
    torch.testing.assert_close(live, t.outputs[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["probe", "hybrid", "finetune"])
def test_text_recipes_on_tiny_bert(recipe: str, tiny_bert: str, tmp_path: Path) -> None:
    extra = {"hybrid": ["teachers.fm.features={name: mlp, hidden: [8]}"], "finetune": ["teachers.fm.top_layers=1"],
             "probe": []}[recipe]
    cfg = load_config(TINY, [f"cache_dir={tmp_path}", f"teachers.fm={{recipe: {recipe}, encoder: {tiny_bert}}}",
                             "teachers.fm.proj_dim=8", "teachers.fm.hidden=[16]", "teachers.fm.max_length=16",
                             "teachers.fm.train={epochs: 5, batch_size: 32, steps_per_epoch: 10, lr: 0.02}", *extra])
    task = build_task(cfg)
    t = _prepare(cfg, task, name="fm")
    assert t.kind == "foundation" and t.outputs.shape == (task.num_rows, 2)
    assert torch.isfinite(t.outputs).all()
    # the texts carry the label's sign, so even a tiny encoder beats chance
    assert t.metrics["val"]["accuracy"] > 0.6
    if recipe == "finetune":
        assert t.trainable_params < t.params  # only the top layer (and head) trained
    else:
        assert t.encoder_forwards == task.num_rows  # each text embedded once...
        again = _prepare(cfg, task, name="fm")
        assert again.from_cache and again.encoder_forwards == 0  # ...and never again


def test_unknown_text_view_and_encoder_are_clear_errors(tmp_path: Path) -> None:
    from fmtransfer.errors import ConfigError

    cfg = load_config(TINY, [f"cache_dir={tmp_path}", "teachers.fm={recipe: probe, encoder: /nonexistent/model}"])
    task = build_task(cfg)
    with pytest.raises(ConfigError, match="nor a local folder with config.json"):
        _prepare(cfg, task, name="fm")
    cfg = load_config(TINY, [f"cache_dir={tmp_path}", "teachers.fm={recipe: probe, views: [title]}"])
    with pytest.raises(ConfigError, match="'title' is not a text view of task synthetic"):
        _prepare(cfg, task, name="fm")


def test_artifact_stores_the_teacher_representation(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"cache_dir={tmp_path}"])
    task = build_task(cfg)
    t = _prepare(cfg, task)
    assert t.reps.shape == (task.num_rows, 64) and t.reps.dtype == np.float16
    model = load_teacher_weights(t, cfg.teachers["wide"], task, cfg.cache_dir)
    rows = task.splits["val"][:20]
    with torch.no_grad():
        live = model.body(task.gather(rows))
    torch.testing.assert_close(torch.from_numpy(np.asarray(t.reps[rows.numpy()], np.float32)), live,
                               atol=2e-2, rtol=1e-2)  # fp16 storage
    (t.path / "reps.npy").unlink()
    assert not _prepare(cfg, task).from_cache  # a missing file makes the artifact unusable: rebuilt


def test_teacher_learns_from_another_teachers_pseudo_labels(tmp_path: Path) -> None:
    """`distill_from`: the source is prepared first; the student-like teacher fits its soft targets on the
    transfer rows too (so it moves toward them), and its artifact is keyed by the source's fingerprint."""
    from fmtransfer.errors import ConfigError
    from fmtransfer.runner import JsonlLog, prepare_teachers
    from fmtransfer.train.distributed import DistContext

    pl = ("teachers.pl={recipe: supervised, model: {name: mlp, hidden: [16]}, distill_from: wide, "
          "distill_weight: 4.0, train: {epochs: 4, batch_size: 32, steps_per_epoch: 10, lr: 0.01}}")
    plain = pl.replace("distill_from: wide, distill_weight: 4.0, ", "")
    cfg = load_config(TINY, [f"cache_dir={tmp_path}", pl])
    task = build_task(cfg)
    got = prepare_teachers(cfg, task, ["pl"], DistContext(), JsonlLog(None))
    assert list(got) == ["pl"] and not got["pl"].from_cache
    wide = _prepare(cfg, task)
    assert wide.from_cache  # prepared first, as pl's source
    base_cfg = load_config(TINY, [f"cache_dir={tmp_path}", plain])
    base = prepare_teachers(base_cfg, task, ["pl"], DistContext(), JsonlLog(None))["pl"]
    assert base.fingerprint != got["pl"].fingerprint
    transfer = task.splits["transfer"]
    gap = lambda t: float((t.outputs[transfer].softmax(-1) - wide.outputs[transfer].softmax(-1)).abs().mean())  # noqa: E731
    assert gap(got["pl"]) < gap(base)
    with pytest.raises(ConfigError, match="cycle"):
        load_config(TINY, [pl, "teachers.wide.distill_from=pl"])
    with pytest.raises(ConfigError, match="not a teacher"):
        load_config(TINY, [pl.replace("distill_from: wide", "distill_from: nobody")])
