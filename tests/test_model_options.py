"""Student options that no shipped config sets, each at a non-default value: `small_card`, `interactions`
and `bias_features` of the ID/feature models, `init_std` of the n-gram model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fmtransfer.config import from_dict
from fmtransfer.data.synthetic import SyntheticConfig, build_synthetic
from fmtransfer.errors import ConfigError
from fmtransfer.models.ngram import NgramConfig, NgramModel
from fmtransfer.models.tabular import FeatureModel, FeatureModelConfig


def _task(kind: str = "regression") -> object:
    """The synthetic task plus a second categorical view `item` (13 values; `user` has 20)."""
    task = build_synthetic(SyntheticConfig(rows=200, kind=kind))
    item = (task.features["user"] * 7) % 13
    return dataclasses.replace(task, features={**task.features, "item": item},
                               cardinalities={**task.cardinalities, "item": 13})


def _model(task: object, **opts: object) -> FeatureModel:
    torch.manual_seed(0)
    return FeatureModel(from_dict(FeatureModelConfig, {"name": "mlrec", **opts}, "student"), task)


def test_small_card_decides_which_ids_are_large() -> None:
    task = _task()
    dims = {f: e.embedding_dim for f, e in _model(task, interactions=[]).embeds.items()}
    assert dims == {"user": 4, "item": 4}  # both at most 100 values: small_dim
    m = _model(task, small_card=15, interactions=[])
    assert {f: e.embedding_dim for f, e in m.embeds.items()} == {"user": 8, "item": 4} and m.large == ["user"]


def test_interactions_join_the_product_of_two_embeddings() -> None:
    task = _task()
    plain, paired = _model(task, small_card=10, interactions=[]), _model(task, small_card=10)
    assert paired.pairs == [("user", "item")] and paired.rep_dim == plain.rep_dim + 8
    batch = task.gather(task.splits["test"][:5])
    z = paired.body(batch)
    prod = paired.embeds["user"](batch["user"]) * paired.embeds["item"](batch["item"])
    assert torch.equal(z[:, -8:], prod)
    with pytest.raises(ConfigError, match="different sizes"):
        _model(task, small_card=15)  # user 8 wide, item 4


def test_bias_features_add_a_per_id_bias_to_a_regression_output() -> None:
    task = _task()
    assert set(_model(task).biases) == {"user", "item"}  # the default
    none, item = _model(task, bias_features=[]), _model(task, bias_features=["item"], interactions=[])
    assert set(none.biases) == set() and set(item.biases) == {"item"}
    batch = task.gather(task.splits["test"][:5])
    with torch.no_grad():
        item.biases["item"].weight.fill_(0.25)
    assert torch.allclose(item.offset(batch) - none.offset(batch), torch.full((5,), 0.25))
    assert set(_model(_task("classification"), bias_features=["item"]).biases) == set()


@pytest.mark.parametrize("std", [0.01, 0.5])
def test_init_std_sets_the_embedding_table_spread(std: float) -> None:
    task = _task("classification")
    ngrams = torch.randint(1, 50, (len(task.y), 6))
    task = dataclasses.replace(task, features={**task.features, "ngrams": ngrams})
    torch.manual_seed(0)
    model = NgramModel(NgramConfig(buckets=2000, dim=16, init_std=std, views=["ngrams"]), task)
    w = model.bag.weight.detach()
    assert torch.count_nonzero(w[0]) == 0 and w[1:].std().item() == pytest.approx(std, rel=0.05)
