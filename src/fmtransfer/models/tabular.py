"""Feature-based models: embeddings for categorical views, dense views as they are, an MLP on top.

`mlrec` is the application model of recommendation tasks (the student, or with wide settings the
complementary teacher); `mlp` is the same idea for tasks whose only view is a dense vector; `tabular`
(the default student of `table`) also reads the hashed n-gram views of a table's text columns through
one embedding bag (the `ngram` model's folding), beside the categorical and numeric columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression
from fmtransfer.models.ngram import bucket_ids, pool
from fmtransfer.ranges import at_least
from fmtransfer.registry import MODELS


@dataclass
class FeatureModelConfig(ModelConfig):
    name: str = "mlrec"
    features: list[str] | None = None
    """Feature views to read (default: every view of the task)."""
    id_dim: int = 8
    """Embedding size of large categorical features (more than `small_card` values: users, items)."""
    small_dim: int = 4
    """Embedding size of small categorical features and of multi-hot/dense vector views."""
    small_card: int = 100
    """Categorical features with more values than this are large (`id_dim`, and `embed_l2` applies)."""
    hidden: list[int] = field(default_factory=lambda: [32])
    dropout: float = 0.0
    input_dropout: float = 0.0
    """Dropout on the embeddings before they are joined (regularises wide ID tables)."""
    embed_l2: float = 0.0
    """Per-occurrence L2 on the large ID embeddings and biases of the batch's rows (classic MF
    regularisation: frequent IDs are pulled as often as they are seen)."""
    bias_features: list[str] = field(default_factory=lambda: ["user", "item"])
    """Categorical features that also get a scalar bias added to a regression output."""
    interactions: list[list[str]] = field(default_factory=lambda: [["user", "item"]])
    """Pairs of same-size embeddings whose elementwise product joins the representation beside the MLP
    output (as in NeuMF): the head can then form a dot product, which an MLP learns poorly."""


class FeatureModel(TaskModel):
    """Embeds each view, concatenates, runs an MLP; regression adds per-ID biases and the target mean."""

    reads_ngrams = False
    """`tabular`: (N, L) int views (hashed n-grams) go through one embedding bag; `mlrec`/`mlp` leave them out."""

    def __init__(self, cfg: FeatureModelConfig, task: TaskData) -> None:
        super().__init__()
        names = cfg.features or [f for f in task.features if self.reads_ngrams or not _is_ngram(task.features[f])]
        missing = [f for f in names if f not in task.features]
        if missing:
            raise ConfigError(f"student.features: {missing[0]!r} is not a feature of task {task.name} "
                              f"(allowed: {', '.join(task.features)})")
        self.task_type = task.task_type
        self.embeds = nn.ModuleDict()
        self.dense = nn.ModuleDict()
        self.scalars: list[str] = []
        self.ngram_views: list[str] = []
        width = 0
        for f in names:
            t = task.features[f]
            if _is_ngram(t):
                if not self.reads_ngrams:
                    raise ConfigError(f"student.features: {f!r} is a hashed n-gram view; model {cfg.name} does not "
                                      "read text (student.name: tabular reads it beside the other columns)")
                self.ngram_views.append(f)
            elif not t.is_floating_point():
                card = task.cardinalities.get(f)
                if card is None:
                    raise ConfigError(f"task {task.name}: categorical feature {f!r} has no cardinality")
                dim = cfg.id_dim if card > cfg.small_card else cfg.small_dim
                self.embeds[f] = nn.Embedding(card, dim)
                nn.init.normal_(self.embeds[f].weight, std=0.05)
                width += dim
            elif t.dim() == 1:
                self.scalars.append(f)
                width += 1
            else:
                self.dense[f] = nn.Linear(t.shape[1], cfg.small_dim)
                width += cfg.small_dim
        self.bag: nn.EmbeddingBag | None = None
        if self.ngram_views:
            assert isinstance(cfg, TabularConfig)
            self.buckets, self.token_dropout = cfg.ngram_buckets, cfg.token_dropout
            self.bag = nn.EmbeddingBag(cfg.ngram_buckets + 1, cfg.ngram_dim, mode="mean", padding_idx=0)
            nn.init.normal_(self.bag.weight, std=0.1)
            with torch.no_grad():
                self.bag.weight[0].zero_()
            width += cfg.ngram_dim
        self.out_dim = output_dim(task)
        sizes = [width, *cfg.hidden]
        self.trunk = mlp(sizes, cfg.dropout) if cfg.hidden else nn.Identity()
        self.act = nn.GELU() if cfg.hidden else nn.Identity()
        self.pairs = [(a, b) for a, b in cfg.interactions if a in self.embeds and b in self.embeds]
        for a, b in self.pairs:
            if self.embeds[a].embedding_dim != self.embeds[b].embedding_dim:
                raise ConfigError(f"interactions: {a!r} and {b!r} have embeddings of different sizes")
        self.in_drop = nn.Dropout(cfg.input_dropout)
        self.embed_l2 = cfg.embed_l2
        self.large = [f for f, e in self.embeds.items() if e.num_embeddings > cfg.small_card]
        self.rep_dim = sizes[-1] + sum(self.embeds[a].embedding_dim for a, _ in self.pairs)
        self.out = nn.Linear(self.rep_dim, self.out_dim)
        self.biases = nn.ModuleDict()
        if self.task_type == "regression":
            for f in cfg.bias_features:
                if f in self.embeds:
                    self.biases[f] = nn.Embedding(task.cardinalities[f], 1)
                    nn.init.zeros_(self.biases[f].weight)
            train_y = task.y[task.splits["train"]].float()
            self.register_buffer("mean", train_y.mean().reshape(1))
        else:
            self.register_buffer("mean", torch.zeros(1))

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embs = {f: self.in_drop(emb(batch[f])) for f, emb in self.embeds.items()}
        parts = list(embs.values())
        parts += [batch[f].float().unsqueeze(-1) for f in self.scalars]
        parts += [lin(batch[f].float()) for f, lin in self.dense.items()]
        if self.bag is not None:
            ids = bucket_ids(batch, self.ngram_views, self.buckets, "model tabular")
            if self.training and self.token_dropout > 0:
                ids = ids * (torch.rand(ids.shape, device=ids.device) >= self.token_dropout)
            parts.append(pool(self.bag, ids))
        z = self.act(self.trunk(torch.cat(parts, dim=-1)))
        if self.pairs:
            z = torch.cat([z, *[embs[a] * embs[b] for a, b in self.pairs]], dim=-1)
        return z

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return squeeze_regression(self.out(z), self.task_type)

    def penalty(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if not self.embed_l2 or not self.training:
            return 0.0
        total = sum(self.embeds[f](batch[f]).pow(2).sum(-1).mean() for f in self.large)
        total = total + sum(self.biases[f](batch[f]).pow(2).mean() for f in self.biases)
        return self.embed_l2 * total

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if self.task_type != "regression":
            return 0.0
        total = self.mean.expand(next(iter(batch.values())).shape[0])  # shape[0], not len(): export keeps it dynamic
        for f, emb in self.biases.items():
            total = total + emb(batch[f]).squeeze(-1)
        return total


@dataclass
class MLPConfig(FeatureModelConfig):
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [20])
    bias_features: list[str] = field(default_factory=list)
    interactions: list[list[str]] = field(default_factory=list)


@dataclass
class TabularConfig(MLPConfig):
    name: str = "tabular"
    hidden: list[int] = field(default_factory=lambda: [32])
    dropout: float = 0.1
    ngram_buckets: int = field(default=16384, metadata=at_least(1))
    """Rows of the embedding bag that the text columns' n-gram hashes fold into (1 + hash % buckets)."""
    ngram_dim: int = 32
    token_dropout: float = 0.2
    """While training, drop each n-gram of a row with this probability (as `ngram` does)."""

    def __post_init__(self) -> None:
        if self.ngram_buckets < 1 or self.ngram_dim < 1:
            raise ConfigError(f"student.ngram_buckets and ngram_dim must be >= 1, got {self.ngram_buckets}, "
                              f"{self.ngram_dim}")
        if not 0 <= self.token_dropout < 1:
            raise ConfigError(f"student.token_dropout must be in [0, 1), got {self.token_dropout}")


class TabularModel(FeatureModel):
    """`mlp` plus one embedding bag over every hashed n-gram view (a table's text columns)."""

    reads_ngrams = True


def _is_ngram(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and t.dim() == 2


MODELS.register("mlrec", FeatureModelConfig, FeatureModel)
MODELS.register("mlp", MLPConfig, FeatureModel)
MODELS.register("tabular", TabularConfig, TabularModel)
