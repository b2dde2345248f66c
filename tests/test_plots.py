"""The report's ID-vs-OOD scatter: written beside results.md when runs have OOD sets, skipped otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fmtransfer.benchmarking.suite import write_report

pytest.importorskip("matplotlib")


def _metrics(method: str, seed: int, acc: float, ood: dict[str, float]) -> dict[str, Any]:
    """A metrics.json as runner._metrics writes it (the fields suite.collect/aggregate read), one teacher."""
    ood_block = {s: {"accuracy": v, "n": 50} for s, v in ood.items()}
    teacher = {"kind": "foundation", "recipe": "probe", "fingerprint": f"fp{seed}", "params": 1000,
               "trainable_params": 10, "val": {"accuracy": 0.8, "n": 50}, "test": {"accuracy": 0.85, "n": 100},
               "ood": {s: {"accuracy": v - 0.02, "n": 50} for s, v in ood.items()}, "seconds": 1.5,
               "from_cache": False}
    return {"task": "synthetic", "method": method, "seed": seed, "metric": "accuracy", "higher_is_better": True,
            "test": {"accuracy": acc, "n": 100}, "val": {"accuracy": acc, "n": 50}, "ood": ood_block,
            "ood_mean": {"accuracy": sum(ood.values()) / len(ood)} if ood else None,
            "reference": {"student": 0.7, "teacher": 0.85, "teacher_name": "fm", "best_teacher": 0.85},
            "teachers": {"fm": teacher}, "params": {"student": 100, "teachers": {"fm": 1000}},
            "seconds": {"cache": 0.1, "train": 2.0, "eval": 0.1, "teacher_prepare": 1.5},
            "labels": {"train": 40, "transfer": 160}}


def _write(root: Path, ood: dict[str, float]) -> Path:
    for method, accs in (("student", (0.70, 0.72)), ("kd", (0.80, 0.79))):
        for seed, acc in enumerate(accs):
            d = root / method / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_metrics(method, seed, acc, ood)))
    return root


def test_report_writes_the_scatter_only_with_ood(tmp_path: Path) -> None:
    runs = _write(tmp_path / "with", {"shifted": 0.6, "rotated": 0.5})
    write_report([runs], tmp_path / "out")
    png = tmp_path / "out" / "id_vs_ood.png"
    assert (tmp_path / "out" / "results.md").exists()
    assert png.read_bytes()[:4] == b"\x89PNG"

    write_report([runs], tmp_path / "off", scatter=False)
    assert (tmp_path / "off" / "results.md").exists() and not (tmp_path / "off" / "id_vs_ood.png").exists()

    plain = _write(tmp_path / "without", {})
    write_report([plain], tmp_path / "plain")
    assert (tmp_path / "plain" / "results.md").exists() and not (tmp_path / "plain" / "id_vs_ood.png").exists()
