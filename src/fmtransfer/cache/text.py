"""Frozen text encoders through the cache: each text is encoded once per (encoder, layers, pooling).

Texts are sorted by length inside each shard so batches carry little padding; encoding runs under
inference mode, optionally in bf16. Several layers are captured in one pass (forward hooks). The encoder
runs through `backbones.text.TextBackbone`, the one text forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmtransfer.backbones.capture import Pooling, depth_paths
from fmtransfer.backbones.spec import BackboneSpec
from fmtransfer.backbones.text import TextBackbone, encoder_fingerprint, resolve_encoder_path
from fmtransfer.cache.store import FeatureStore, FieldSpec
from fmtransfer.utils import stable_hash

LAST = "last"


def _field(path: str) -> str:
    return "layer_" + path.replace(".", "_")


class TextEncoderCache:
    """Pooled states of chosen layers of a frozen text encoder, for a list of texts, stored once."""

    def __init__(self, texts: list[str], encoder: str, cache_dir: str | Path, *, layers: list[str] | None = None,
                 pooling: Pooling = "mean", max_length: int = 256, normalize: bool = True, dtype: str = "float16",
                 batch_size: int = 64, bf16: bool = False, device: str = "cpu", shard_rows: int = 4096,
                 augmentation: str = "none") -> None:
        """`augmentation` names replayable input transforms (with their parameters) applied before encoding;
        it is part of the key, so outputs of augmented inputs never mix with plain ones."""
        self.texts, self.encoder_spec = texts, encoder
        self.layers = layers or [LAST]
        self.pooling, self.max_length, self.normalize = pooling, max_length, normalize
        self.batch_size, self.bf16, self.device = batch_size, bf16, device
        self._fm: TextBackbone | None = None
        self._paths: list[str] | None = None
        key = stable_hash(["text-encoder", encoder_fingerprint(encoder), stable_hash(texts, 32), self.layers,
                           pooling, max_length, normalize, dtype, bf16, augmentation])
        self._dim = self._hidden_size()
        shape = (self._dim,) if pooling != "none" else (max_length, self._dim)
        self.store = FeatureStore(Path(cache_dir) / "features", key,
                                  {_field(p): FieldSpec(shape, dtype) for p in self.layers}, len(texts),
                                  shard_rows=shard_rows)

    def _hidden_size(self) -> int:
        import json

        cfg = json.loads((Path(resolve_encoder_path(self.encoder_spec)) / "config.json").read_text())
        return int(cfg.get("hidden_size") or cfg["d_model"])

    def _load(self) -> TextBackbone:
        if self._fm is None:
            spec = BackboneSpec(modality="text", encoder=self.encoder_spec, max_length=self.max_length,
                                l2_normalize=self.normalize, batch_size=self.batch_size, bf16=self.bf16)
            self._fm = TextBackbone(spec)
            self._fm.net.to(self.device).eval()
            self._paths = [depth_paths(self._fm.net, [1.0])[0] if p == LAST else p for p in self.layers]
        return self._fm

    @torch.inference_mode()
    def _produce(self, start: int, end: int) -> dict[str, np.ndarray]:
        fm = self._load()
        assert self._paths is not None
        got = fm.encode(self.texts[start:end], self._paths, order="longest", pooling=self.pooling,
                        padding="max_length" if self.pooling == "none" else True, device=self.device)
        return {_field(lp): g.cpu().numpy() for lp, g in zip(self.layers, got, strict=True)}

    def build(self, rank: int = 0, world: int = 1, barrier=None, desc: str = "encode") -> int:  # type: ignore[no-untyped-def]
        """Encode what is missing; returns the number of texts the encoder ran on (0 on a full hit)."""
        if self.store.is_complete():
            return 0
        return self.store.build(self._produce, rank=rank, world=world, barrier=barrier, desc=desc)

    def get(self, layer: str = LAST) -> torch.Tensor:
        return torch.from_numpy(self.store.load(_field(layer)).astype(np.float32))


def cached_text_embeddings(texts: list[str], encoder: str, cache_dir: str | Path, *, max_length: int = 256,
                           normalize: bool = True, device: str = "cpu", layers: list[str] | None = None,
                           shard_rows: int = 4096, bf16: bool = False,
                           desc: str = "encode") -> tuple[dict[str, torch.Tensor], int]:
    """{layer: (len(texts), D) embeddings}, encoding only what the cache lacks; and the texts encoded."""
    cache = TextEncoderCache(texts, encoder, cache_dir, layers=layers, max_length=max_length, normalize=normalize,
                             device=device, shard_rows=shard_rows, bf16=bf16)
    ran = cache.build(desc=desc)
    return {layer: cache.get(layer) for layer in cache.layers}, ran
