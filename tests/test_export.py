"""Export and serving: the student alone round-trips through the loader, ONNX matches PyTorch within
`ONNX_ATOL`, the loader needs no training code, bad runs are refused in one line, and the live FM path
that serve-bench times reproduces the teacher. Speed is never asserted."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmtransfer.config import load_config
from fmtransfer.integrity import record
from fmtransfer.serving.manifest import ONNX_ATOL, ExportError
from tests.conftest import REPO, TINY
from tests.test_cli import cli

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = "onnx,torchscript" if HAVE_ONNX else "torchscript"
REGRESSION = ["task.kind=regression", "student={name: mlrec, hidden: [16]}", "teachers.wide.model={name: mlrec}"]
"""A regression mlrec student: per-ID biases and the target-mean buffer (the offset path) must export too."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished tiny runs: classification with an `mlp` student, regression with an `mlrec` student."""
    from fmtransfer.runner import run_experiment

    base = tmp_path_factory.mktemp("runs")
    for kind, extra in (("cls", []), ("reg", REGRESSION)):
        run_experiment(load_config(TINY, [f"cache_dir={base / 'cache'}", *extra]), base / kind, quiet=True)
    return {"cls": base / "cls", "reg": base / "reg"}


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fmtransfer.export import export_run

    base = tmp_path_factory.mktemp("exports")
    for kind, run in runs.items():
        export_run(run, base / kind, FORMATS)
    return {k: base / k for k in runs}


def _task_and_reference(run: Path) -> tuple[object, torch.nn.Module]:
    """The run's task and its student rebuilt the training way (registry + the run's weights)."""
    from fmtransfer.registry import MODELS
    from fmtransfer.runner import build_task

    cfg = load_config(run / "config.yaml")
    task = build_task(cfg)
    model = MODELS.get(cfg.student.name).impl(cfg.student, task)
    model.load_state_dict(load_file(str(run / "student.safetensors")))
    return task, model.eval()


def test_cli_export_writes_the_student_alone_and_a_manifest(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    r = cli("export", str(runs["cls"]), "--format", "safetensors", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and "(run " in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "receipts.json", "student.safetensors"]
    man = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((runs["cls"] / "metrics.json").read_text())
    assert man["task"]["name"] == "synthetic" and man["task"]["type"] == "classification"
    assert man["inputs"] == ["x", "user"] and man["features"]["x"] == {"dtype": "float32", "shape": [8]}
    assert man["output"]["shape"] == [2] and man["model"]["class"] == "fmtransfer.models.tabular:FeatureModel"
    assert man["model"]["params"] == metrics["params"]["student"]
    assert man["teachers"]["taught"]["wide"]["fingerprint"] == metrics["teachers"]["wide"]["fingerprint"]
    assert man["metrics"]["run"]["test"] == metrics["test"]
    assert man["preprocessing"]["task_config"]["rows"] == 600
    keys = set(load_file(str(out / "student.safetensors")))
    _, ref = _task_and_reference(runs["cls"])
    assert keys == set(ref.state_dict())
    assert not [k for k in keys if k.startswith(("teacher", "module.", "student.")) or "_orig_mod" in k]


@pytest.mark.parametrize("kind", ["cls", "reg"])
def test_loader_round_trip_equals_the_runs_predictions(kind: str, runs: dict[str, Path],
                                                       exports: dict[str, Path]) -> None:
    from fmtransfer.serving.loader import load_predictor, load_student

    task, ref = _task_and_reference(runs[kind])
    loaded = load_student(exports[kind])
    assert type(loaded) is type(ref)
    rows = torch.arange(task.num_rows)  # every row of every split
    with torch.no_grad():
        expected = ref(task.gather(rows))
        assert torch.equal(loaded(task.gather(rows)), expected)
    pred = load_predictor(exports[kind], "safetensors")
    got = pred.predict_features({k: task.features[k].numpy() for k in pred.inputs})
    np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize("kind", ["cls", "reg"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_onnx_and_torchscript_match_pytorch_within_tolerance(kind: str, fmt: str, runs: dict[str, Path],
                                                             exports: dict[str, Path]) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        if not HAVE_ONNX:
            pytest.skip("onnx export needs onnx and onnxscript")
    from fmtransfer.serving.loader import load_predictor

    task, ref = _task_and_reference(runs[kind])
    pred = load_predictor(exports[kind], fmt)
    feats = {k: task.features[k].numpy() for k in pred.inputs}
    with torch.no_grad():
        expected = ref(task.gather(torch.arange(task.num_rows))).numpy()
    for bs in (1, 7, task.num_rows):  # the batch axis is dynamic: any batch size
        got = np.concatenate([pred.predict_features({k: v[s:s + bs] for k, v in feats.items()})
                              for s in range(0, min(task.num_rows, 50 * bs), bs)])
        np.testing.assert_allclose(got, expected[:len(got)], rtol=0, atol=ONNX_ATOL)


@pytest.mark.parametrize("kind", ["cls", "reg"])
def test_exported_test_metric_equals_the_runs_to_4_decimals(kind: str, runs: dict[str, Path],
                                                            exports: dict[str, Path]) -> None:
    from fmtransfer.serving.loader import load_predictor
    from fmtransfer.serving.manifest import read_manifest

    task, _ = _task_and_reference(runs[kind])
    metrics = json.loads((runs[kind] / "metrics.json").read_text())
    m, rows = metrics["metric"], task.splits["test"]
    manifest = read_manifest(exports[kind])
    assert set(manifest.files) == {"safetensors", *FORMATS.split(",")}
    for fmt in manifest.files:
        pred = load_predictor(exports[kind], fmt)
        out = pred.predict_features({k: task.features[k][rows].numpy() for k in pred.inputs})
        value = task.score(torch.from_numpy(out), rows)[m]
        assert f"{value:.4f}" == f"{metrics['test'][m]:.4f}", fmt
        assert f"{manifest.metrics['exported'][fmt]['test'][m]:.4f}" == f"{metrics['test'][m]:.4f}"


def test_loader_imports_no_training_code(exports: dict[str, Path]) -> None:
    code = (
        "import json, sys\nimport numpy as np\nfrom fmtransfer.serving import load_predictor\n"
        f"d = {str(exports['reg'])!r}\n"
        "p = load_predictor(d, 'safetensors')\n"
        "feats = {'x': np.zeros((3, 8), np.float32), 'user': np.arange(3)}\n"
        "outs = [load_predictor(d, f).predict_features(feats) for f in p.manifest.files]\n"
        "assert all(o.shape == (3,) for o in outs)\n"
        "bad = ('fmtransfer.train', 'fmtransfer.methods', 'fmtransfer.teachers', 'fmtransfer.runner',\n"
        "       'fmtransfer.export')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(bad))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_unfinished_run_and_corrupt_weights_are_refused_in_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    unfinished = _copy_run(runs["cls"], tmp_path / "unfinished")
    (unfinished / "metrics.json").unlink()
    corrupt = _copy_run(runs["cls"], tmp_path / "corrupt")
    w = corrupt / "student.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    for run, message in ((unfinished, "the run did not finish (no metrics.json)"),
                         (corrupt, "student.safetensors is corrupt")):
        r = cli("export", str(run), "--out", str(tmp_path / "never"))
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("metrics", "metrics.json is corrupt"),
        ("no-weights", "student.safetensors is missing"),
        ("nan-weights", "holds NaN or inf"),
        ("wrong-weights", "does not fit the student in config.yaml"),
        ("format", "--format: unknown format 'pickle'"),
        ("out", "already exists and is not empty"),
    ],
)
def test_other_bad_inputs_are_one_line_errors(damage: str, message: str, runs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from fmtransfer.cli import main

    run = _copy_run(runs["cls"], tmp_path / "run")
    out, fmt = tmp_path / "out", "safetensors"
    weights = run / "student.safetensors"
    if damage == "metrics":
        (run / "metrics.json").write_text("{")
    elif damage == "no-weights":
        weights.unlink()
    elif damage in ("nan-weights", "wrong-weights"):
        state = load_file(str(weights))
        key = next(iter(state))
        state[key] = torch.full_like(state[key], float("nan")) if damage == "nan-weights" else state[key][:1]
        save_file(state, str(weights))
        record(run, ["student.safetensors"])  # a consistent file (its receipt matches) that is still wrong
    elif damage == "format":
        fmt = "onnx,pickle"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_wrapper_prefixes_are_stripped(runs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fmtransfer.export import export_run, strip_wrappers

    assert list(strip_wrappers({"module._orig_mod.out.weight": torch.zeros(1), "trunk._orig_mod.0.bias":
                                torch.zeros(1)})) == ["out.weight", "trunk.0.bias"]
    # a student saved from inside DDP exports to the same plain keys and the same predictions
    run = _copy_run(runs["reg"], tmp_path / "ddp-run")
    state = load_file(str(run / "student.safetensors"))
    save_file({f"module.{k}": v for k, v in state.items()}, str(run / "student.safetensors"))
    record(run, ["student.safetensors"])  # as a run would have written it (receipt of the new bytes)
    export_run(run, tmp_path / "export", "safetensors")
    assert set(load_file(str(tmp_path / "export" / "student.safetensors"))) == set(state)


def test_loader_refuses_altered_files_and_bad_requests(exports: dict[str, Path], tmp_path: Path) -> None:
    from fmtransfer.serving.loader import load_predictor

    d = shutil.copytree(exports["cls"], tmp_path / "export")
    pred = load_predictor(d, "safetensors")
    with pytest.raises(ExportError, match="input 'user' is missing"):
        pred.predict_features({"x": np.zeros((2, 8), np.float32)})
    with pytest.raises(ExportError, match=r"ids outside \[0, 20\)"):
        pred.predict_features({"x": np.zeros((2, 8), np.float32), "user": np.array([0, 20])})
    with pytest.raises(ExportError, match="expected \\(N, 8\\)"):
        pred.predict_features({"x": np.zeros((2, 3), np.float32), "user": np.array([0, 1])})
    w = d / "student.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match its sha256"):
        load_predictor(d, "safetensors")
    (d / "manifest.json").write_text("{}")
    with pytest.raises(ExportError, match="manifest.json is corrupt or altered"):  # its receipt
        load_predictor(d, "safetensors")
    (d / "receipts.json").unlink()  # without receipts (a hand-made folder), the manifest's own checks
    with pytest.raises(ExportError, match="not an fmtransfer student manifest"):
        load_predictor(d, "safetensors")


def test_live_fm_path_reproduces_the_teacher_and_serve_bench_reports(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.benchmarking.serve import format_bench, serve_bench
    from fmtransfer.runner import run_experiment

    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'cache'}", f"teachers.fm={{recipe: hybrid, encoder: {tiny_bert}}}",
                             "teachers.fm.features={name: mlp, hidden: [8]}", "teachers.fm.proj_dim=8",
                             "teachers.fm.hidden=[16]", "teachers.fm.max_length=16",
                             "teachers.fm.train={epochs: 2, batch_size: 32, steps_per_epoch: 5, lr: 0.02}",
                             "method.teacher=fm"])
    run_experiment(cfg, tmp_path / "run", quiet=True)
    result = serve_bench(tmp_path / "run", requests=8, fm_requests=6, batch_size=16, batches=2, fm_batches=1)
    fm = next(r for r in result["rows"] if r["format"] == "fm")
    assert result["fm_teacher"] == "fm" and fm["checked_rows"] == 6
    # the live path is the teacher: same outputs as the artifact (which read float16-cached embeddings)
    assert fm["live_vs_artifact_max_abs_diff"] < 1e-2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert fm["params"] == metrics["params"]["teachers"]["fm"]
    students = [r for r in result["rows"] if r["format"] != "fm"]
    assert {r["format"] for r in students} == {"safetensors", *FORMATS.split(",")}
    assert all(f"{r['test']:.4f}" == f"{metrics['test']['accuracy']:.4f}" for r in students)
    text = format_bench(result)
    assert "FM teacher path / student" in text and "equal to 4 decimals: yes" in text
