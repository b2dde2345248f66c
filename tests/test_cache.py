"""The teacher-output cache: shards + manifest, resume, corruption, layer capture, cached == fresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmtransfer.backbones.capture import LayerCapture, depth_paths, pool, resolve_modules
from fmtransfer.cache.store import FeatureStore, FieldSpec
from fmtransfer.errors import ArtifactError, ConfigError

ROWS = 10


def _values(start: int, end: int) -> dict[str, np.ndarray]:
    r = np.arange(start, end, dtype=np.float32)
    return {"a": np.stack([r, r * 2, r * 3], 1) / 7, "b": r.astype(np.int64)}


def _store(tmp_path: Path, key: str = "k1") -> FeatureStore:
    return FeatureStore(tmp_path, key, {"a": FieldSpec((3,), "float16"), "b": FieldSpec((), "int64")}, ROWS,
                        shard_rows=4)


def test_build_and_load(tmp_path: Path) -> None:
    s = _store(tmp_path)
    assert s.num_shards == 3 and not s.is_complete()
    assert s.build(_values) == ROWS
    assert s.is_complete()
    full = _values(0, ROWS)
    np.testing.assert_allclose(s.load("a"), full["a"], atol=1e-3)  # fp16 storage
    np.testing.assert_array_equal(s.load("b"), full["b"])
    assert s.load("a").dtype == np.float16
    assert s.build(_values) == 0  # complete: nothing recomputed


def test_interrupted_build_resumes_only_missing_shards(tmp_path: Path) -> None:
    s = _store(tmp_path)
    calls: list[int] = []

    def dies_on_third(start: int, end: int) -> dict[str, np.ndarray]:
        if start == 8:
            raise KeyboardInterrupt
        calls.append(start)
        return _values(start, end)

    with pytest.raises(KeyboardInterrupt):
        s.build(dies_on_third)
    assert not s.is_complete() and s.missing_shards() == [2]
    with pytest.raises(ArtifactError, match="incomplete or corrupt"):
        s.load("a")
    assert s.build(_values) == 2  # only the last shard (rows 8-9)
    assert s.is_complete()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_shard_is_detected_and_rebuilt(tmp_path: Path, damage: str, capsys) -> None:  # type: ignore[no-untyped-def]
    s = _store(tmp_path)
    s.build(_values)
    shard = s.dir / "a.00001.npy"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[:-6]))
    elif damage == "flip":
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    assert not s.is_complete() and s.missing_shards() == [1]
    assert s.build(_values) == 4
    if damage != "delete":
        assert "truncated or altered" in capsys.readouterr().out
    np.testing.assert_allclose(s.load("a"), _values(0, ROWS)["a"], atol=1e-3)


def test_ranks_write_their_own_shards(tmp_path: Path) -> None:
    r1, r0 = _store(tmp_path), _store(tmp_path)
    assert r1.build(_values, rank=1, world=2) == 4  # shard 1 only; rank 1 writes no manifest
    assert not r1.is_complete()
    assert r0.build(_values, rank=0, world=2) == 6  # shards 0 and 2, then the manifest
    assert r0.is_complete()


def test_changed_key_or_spec_is_a_new_entry(tmp_path: Path) -> None:
    _store(tmp_path).build(_values)
    assert not _store(tmp_path, "k2").is_complete()
    other = FeatureStore(tmp_path, "k1", {"a": FieldSpec((3,), "float32"), "b": FieldSpec((), "int64")}, ROWS, 4)
    assert not other.is_complete()  # same key, different dtype: not silently reused
    bad = FeatureStore(tmp_path, "k3", {"a": FieldSpec((4,), "float16")}, ROWS, 4)
    with pytest.raises(ArtifactError, match="do not fit"):
        bad.build(lambda s, e: {"a": np.zeros((e - s, 3))})


def test_pooling_golden() -> None:
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(states, "mean", mask), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(pool(states, "cls"), torch.tensor([[1.0, 2.0]]))
    maps = torch.arange(8.0).reshape(1, 2, 2, 2)
    torch.testing.assert_close(pool(maps, "gap"), torch.tensor([[1.5, 5.5]]))
    with pytest.raises(ConfigError, match="does not apply to feature maps"):
        pool(maps, "cls")


def test_capture_by_module_path(tiny_bert: str) -> None:
    from fmtransfer.backbones.text import load_encoder

    tok, model = load_encoder(tiny_bert)
    paths = depth_paths(model, [0.5, 1.0])
    assert paths == ["encoder.layer.0", "encoder.layer.1"]
    enc = tok(["good item 1", "bad poor"], padding=True, return_tensors="pt")
    with torch.no_grad(), LayerCapture(model, paths) as cap:
        out = model(**enc).last_hidden_state
    states = cap.pooled("none")
    torch.testing.assert_close(states["encoder.layer.1"], out)  # the last layer's output is last_hidden_state
    assert states["encoder.layer.0"].shape == out.shape
    assert not model.encoder.layer[0]._forward_hooks  # hooks removed on exit
    with pytest.raises(ConfigError, match=r"'encoder.layer.7' not found in BertModel \(available paths include: "):
        resolve_modules(model, ["encoder.layer.7"])


def test_text_cache_matches_fresh_encoding(tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.backbones.text import load_encoder, mean_pool
    from fmtransfer.cache.text import TextEncoderCache

    texts = [f"good item {k % 10}" if k % 3 else f"bad poor weak item {k % 10}" for k in range(50)]
    cache = TextEncoderCache(texts, tiny_bert, tmp_path, layers=["last", "encoder.layer.0"], max_length=16)
    assert cache.build() == 50
    again = TextEncoderCache(texts, tiny_bert, tmp_path, layers=["last", "encoder.layer.0"], max_length=16)
    assert again.build() == 0
    tok, model = load_encoder(tiny_bert)
    enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad(), LayerCapture(model, ["encoder.layer.0"]) as cap:  # by hand, in one unsorted batch
        last = model(**enc).last_hidden_state
    fresh = torch.nn.functional.normalize(mean_pool(last, enc["attention_mask"]), dim=-1)
    # fp16 storage of unit-norm vectors: agreement within 2e-3 (stated tolerance), not bitwise
    torch.testing.assert_close(again.get("last"), fresh, atol=2e-3, rtol=0)
    layer0 = torch.nn.functional.normalize(cap.pooled("mean", enc["attention_mask"])["encoder.layer.0"], dim=-1)
    torch.testing.assert_close(again.get("encoder.layer.0"), layer0, atol=2e-3, rtol=0)
    # a different text list is a different entry
    assert TextEncoderCache(texts[:-1], tiny_bert, tmp_path, max_length=16).build() == 49
