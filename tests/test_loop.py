"""The loop: it learns, it selects on validation, and a killed run resumes to the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fmtransfer.config import load_config
from fmtransfer.errors import ArtifactError
from fmtransfer.train.batches import BatchPlan
from tests.conftest import REPO, TINY


def test_batch_plan_is_deterministic_and_splits_ranks() -> None:
    labeled, transfer = torch.arange(10), torch.arange(100, 140)
    full = BatchPlan(labeled, transfer, batch_size=8, labeled_batch_size=4, seed=3)
    assert len(full) == 5
    b0 = full.epoch(0)
    assert [len(r) for r, _ in b0] == [12] * 5
    rows, mask = b0[0]
    assert set(rows[mask].tolist()) <= set(labeled.tolist()) and set(rows[~mask].tolist()) <= set(transfer.tolist())
    again = BatchPlan(labeled, transfer, batch_size=8, labeled_batch_size=4, seed=3).epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(b0, again, strict=True))
    assert not torch.equal(full.epoch(1)[0][0], b0[0][0])
    r0 = BatchPlan(labeled, transfer, batch_size=8, labeled_batch_size=4, seed=3, rank=0, world=2).epoch(0)
    r1 = BatchPlan(labeled, transfer, batch_size=8, labeled_batch_size=4, seed=3, rank=1, world=2).epoch(0)
    for (a, _), (b, _), (full_rows, _) in zip(r0, r1, b0, strict=True):
        assert sorted(torch.cat([a, b]).tolist()) == sorted(full_rows.tolist())


def test_run_learns_and_selects_on_validation(tmp_path: Path) -> None:
    from fmtransfer.runner import run_experiment

    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'c'}", "method={name: student}", "train.epochs=6"])
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    hist = [__import__("json").loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [h for h in hist if h.get("phase") == "train"]
    assert len(train) == 6
    val = [h["val"]["accuracy"] for h in train]
    assert m["best_epoch"] == 1 + max(range(6), key=lambda k: (val[k], -k))
    assert m["val"]["accuracy"] == max(val)
    assert train[-1]["train"]["loss"] < train[0]["train"]["loss"]
    assert m["test"]["accuracy"] > 0.6  # chance is 0.5 on this task


def test_score_last_false_skips_the_second_evaluation(tmp_path: Path) -> None:
    from fmtransfer.runner import run_experiment

    out = {}
    for flag in ("true", "false"):  # lr 0.1, constant: the tiny task's best epoch is the first of six
        cfg = load_config(TINY, [f"cache_dir={tmp_path / 'c'}", "method={name: student}", "train.epochs=6",
                                 "train.lr=0.1", "train.lr_schedule=constant", f"train.score_last={flag}"])
        out[flag] = run_experiment(cfg, tmp_path / flag, quiet=True)
    assert out["true"]["best_epoch"] < 6, "precondition: the last epoch must not be the best"
    assert out["true"]["last_epoch"]["test"] != out["true"]["test"]  # the last weights were scored apart ...
    assert out["false"]["last_epoch"] is None  # ... or not at all, with the best epoch's scores unchanged
    assert out["false"]["test"] == out["true"]["test"] and out["false"]["ood"] == out["true"]["ood"]


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=300)


def test_kill_and_resume_gives_the_same_weights(tmp_path: Path) -> None:
    common = [str(TINY), "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=5",
              "--set", "student.dropout=0.2"]
    ref = _cli(["run", *common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    killed = _cli(["run", *common, "--out", str(tmp_path / "run")], {"FMTRANSFER_DEBUG_EXIT_AFTER_EPOCH": "2"})
    assert killed.returncode == 17
    assert (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "metrics.json").exists()
    again = _cli(["run", *common, "--out", str(tmp_path / "run")])
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = _cli(["run", *common, "--out", str(tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "ref" / "student.safetensors"))
    b = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert sum('"phase": "train"' in line for line in log) == 5  # epochs 1-2, then 3-5 after the resume


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    from fmtransfer.train.checkpoint import load_checkpoint, save_checkpoint

    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, {"config_hash": "abc", "epoch": 0})
    assert load_checkpoint(p, "abc")["epoch"] == 0
    import pytest

    with pytest.raises(ArtifactError, match="different config"):
        load_checkpoint(p, "xyz")
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="is corrupt"):
        load_checkpoint(p, "abc")
