"""`diverse_distill`: one student learns from a teaching committee (FM + complementary teachers).

Our reading of DiverseDistill (only the abstract was available; every choice is an option):
- Each teacher k has a learned embedding e_k; the student asks with a teacher-conditioned query
  q_k = W_q z_s + e_k.
- The answer module reads the teacher's representation h_k (stored with the prepared teacher, or computed
  live) and the query: a_k = MLP_k([P_k h_k ; q_k]), in the student's representation space; for the
  `token_teachers`, the query cross-attends over the teacher's cached token/patch states H_k instead:
  a_k = MLP_k([attn(q_k, P_k H_k) ; q_k]).
- Importance comes from the student side only, so a teacher can be skipped before it runs: a gate G(z_s)
  gives one score per teacher, alpha(x) = softmax(G(z_s) / tau) mixed with an entropy floor. G is NOT
  trained through the loss it weights (a prototype collapsed to one teacher that way); it learns with a
  stop-gradient, only from (row, teacher) pairs that ran:
    `gate_target: disagreement` (default) - regress G_k on the row's KD term for teacher k (any row, labeled
      or not): a teacher whose answer the student already gives teaches nothing there, so it is skipped;
    `gate_target: benefit` - regress G_k on the teacher's loss advantage over the student on labeled rows,
      loss(student) - loss(teacher k);
    `gate_target: correctness` - cross-entropy to softmax(-loss_k / target_tau) (which teacher is right).
  The default was chosen on movielens validation (seed 0): skipping 30% of pairs by predicted disagreement
  beat no skipping and random skipping; benefit-ranked skipping lost to random skipping (README).
- Filtering: `skip_fraction` (default 0.3, the paper's ~30%) skips that share of the batch's (row, teacher)
  pairs, lowest gate score first (a random `explore` share of pairs always runs, so the gate keeps getting
  feedback); or keep teachers with alpha_k >= rho (default 1/(2K)); or the top m. At least one teacher per
  row always runs.
  `filter_by: random` skips the same number of pairs at random (the ablation that says whether the gate's
  choice matters). Skipped pairs contribute to no term, and the gate learns only from pairs that ran, so a
  run on cached outputs trains exactly as a live one would; `teacher_source: live` runs each teacher's
  module on its kept rows only and counts the rows it really ran.
- loss = task + l_align * sum_k w_k (1 - cos(z_s, a_k)) + l_ans * mean_k task_loss(S_head(a_k), y | kept)
         + l_kd * sum_k w_k KD(t_k, s) + l_gate * gate_loss,  w = alpha over the kept teachers;
  `combine: product` replaces the KD sum by one term to the kept teachers' weighted product of experts.
  Defaults l_align 0.1, l_ans 0: on movielens validation the align and answer terms at 1.0 / 0.5 cost
  0.004 RMSE against the committee's KD terms alone.
- Options for a teacher far ahead of the student (issue 14; defaults keep every earlier result):
    `gate_signals` - what G reads besides the student's state: `uncertainty` (the student's own entropy and
      top probability), `pre_teachers` (the cached outputs of the `pre_teachers`, by default the
      committee's complementary members: their probabilities, entropy and KD term to the student). All
      are known before the FM runs, so filtering can still skip the FM;
    `teacher_temperature` - a KD temperature per teacher (others use `temperature`);
    `teacher_logit_bias` - a fixed prior on a teacher's gate score (where it weighs and ranks pairs);
    `foundation_warmup_steps` - teacher-assistant order: the foundation teachers' weights ramp 0 -> 1
      over that many steps, so the complementary teachers teach first;
    `gate_target: reliability` - G learns, on labeled rows whose teachers all ran, the blend of teachers
      whose mixed output fits the label (the task loss of sum_k alpha_k t_k), so it weighs teachers by
      how right they are, not by how much the student still disagrees with them (it fails where the
      teachers memorised the few labels: digits, docs/strong.md);
    `gate_target: confidence` - (classes) G regresses each teacher's negative entropy on the row, label-free;
    `l_hint` - a FitNets-strength hint per teacher, + l_hint * sum_k w_k MSE(LN(P_k z_s), LN(h_k)),
      weighted like the KD terms (FitNets from the FM is the best movielens baseline there).
All of it is dropped at export: `predict` runs the student alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import Built, Method, committee
from fmtransfer.methods.losses import (
    masked_mean,
    mixture_task_loss,
    per_row_hint,
    per_row_kd,
    per_row_task_loss,
    product_target,
)
from fmtransfer.models.base import TaskModel, mlp
from fmtransfer.plots import lines, stacked_bars
from fmtransfer.ranges import at_least
from fmtransfer.registry import METHODS


@dataclass
class DiverseDistillConfig(MethodConfig):
    name: str = "diverse_distill"
    teachers: list[str] | None = None
    """Committee members (names under `teachers:`); null = all."""
    query_dim: int = 64
    answer_hidden: int = 128
    token_teachers: list[str] = field(default_factory=list)
    """Teachers whose answer module cross-attends with the query over their token/patch states (from the
    cache, e.g. EfficientNet's tapped map as grid x grid patches) instead of reading the pooled state."""
    heads: int = 4
    """Attention heads of the token answer modules (query_dim must be divisible by it)."""
    l_align: float = 0.1
    l_ans: float = 0.0
    l_kd: float = 1.0
    l_gate: float = 0.1
    temperature: float = 4.0
    importance: Literal["learned", "equal"] = "learned"
    """learned: the gate G(z_s) weighs and filters teachers; equal: 1/K for every teacher and row."""
    gate_target: Literal["benefit", "disagreement", "correctness", "reliability", "confidence"] = "disagreement"
    """What G learns (stop-gradient, on pairs that ran): each teacher's loss advantage over the student
    (labeled rows), how far the teacher's output is from the student's (its per-row KD term: any row),
    which teacher is right (softmax(-loss / target_tau), labeled rows), or `reliability`: the blend of
    teachers that fits the label (the task loss of the alpha-weighted teacher mixture, labeled rows whose
    teachers all ran), or `confidence` (classification): the teacher's negative entropy on the row (any
    row: label-free, so it is not fooled by teachers that memorised the few labels)."""
    tau: float = 1.0
    target_tau: float = 1.0
    """Temperature of the correctness target softmax(-teacher loss / target_tau)."""
    entropy_floor: float = 0.1
    """alpha = (1 - floor) * softmax(G / tau) + floor / K: no teacher's weight reaches zero by itself."""
    filter: bool = True
    skip_fraction: float | None = 0.3
    """Skip this share of each batch's (row, teacher) pairs, lowest gate score first; null = use rho/top_m."""
    explore: float = 0.05
    """Share of pairs kept at random whatever the gate says (training only), so the gate keeps learning."""
    filter_by: Literal["gate", "random"] = "gate"
    rho: float | None = None
    """Keep teachers whose alpha >= rho (default 1 / (2K)); used when skip_fraction and top_m are null."""
    top_m: int | None = None
    teacher_source: Literal["cache", "live"] = "cache"
    """cache: read prepared outputs and representations; live: run each teacher on its kept rows only."""
    task_weight: float = 1.0
    gate_signals: list[str] = field(default_factory=lambda: ["state"])
    """What the gate reads (stop-gradient): `state` (the student representation), `uncertainty` (the
    student's entropy and top probability; its prediction for regression), `pre_teachers` (the outputs of
    `pre_teachers`, known before the FM runs). ["state"] is the original gate."""
    pre_teachers: list[str] | None = None
    """Teachers whose cached outputs `pre_teachers` reads; null = the committee's complementary members."""
    teacher_temperature: dict[str, float] = field(default_factory=dict)
    """KD temperature per teacher name (classification); teachers not named use `temperature`."""
    teacher_logit_bias: dict[str, float] = field(default_factory=dict)
    """A fixed prior added to a teacher's gate score where it weighs and ranks pairs (not in the gate's own
    regression): e.g. {fm: 2.0} trusts the FM more while the gate still varies the weights by row."""
    foundation_warmup_steps: int = field(default=0, metadata=at_least(0))
    """Teacher-assistant order: the foundation teachers' weights ramp linearly 0 -> 1 over this many training
    steps (the complementary teachers teach alone at first); 0 = off."""
    combine: Literal["mixture", "product"] = "mixture"
    """How the kept teachers' outputs combine into the student's KD target: `mixture` = sum_k w_k KD(t_k, s)
    (its minimiser is the w-weighted mixture of the teachers' distributions); `product` = one KD term to
    the w-weighted product of experts (geometric mean of the softened distributions: `losses.product_target`;
    for regression the weighted mean). The gate's targets are the per-teacher terms either way."""
    l_hint: float = field(default=0.0, metadata=at_least(0))
    """Weight of a FitNets-strength hint per teacher: sum_k w_k MSE(LN(P_k z_s), LN(h_k)) with a linear
    projector per teacher, weighted like the KD terms; 0 = off (no projector is built)."""

    def __post_init__(self) -> None:
        if not 0 <= self.entropy_floor <= 1:
            raise ConfigError(f"method.entropy_floor: must be in [0, 1], got {self.entropy_floor}")
        if self.top_m is not None and self.top_m < 1:
            raise ConfigError(f"method.top_m: must be >= 1, got {self.top_m}")
        if self.skip_fraction is not None and not 0 <= self.skip_fraction < 1:
            raise ConfigError(f"method.skip_fraction: must be in [0, 1), got {self.skip_fraction}")
        if self.token_teachers and self.query_dim % self.heads:
            raise ConfigError(f"method.heads: query_dim {self.query_dim} must be divisible by heads {self.heads}")
        if not 0 <= self.explore <= 1:
            raise ConfigError(f"method.explore: must be in [0, 1], got {self.explore}")
        bad = [g for g in self.gate_signals if g not in GATE_SIGNALS]
        if bad or not self.gate_signals or len(set(self.gate_signals)) != len(self.gate_signals):
            raise ConfigError(f"method.gate_signals: {self.gate_signals!r}: a non-empty list of distinct "
                              f"{', '.join(GATE_SIGNALS)}")
        if self.foundation_warmup_steps < 0:
            raise ConfigError(f"method.foundation_warmup_steps: must be >= 0, got {self.foundation_warmup_steps}")
        for n, t in self.teacher_temperature.items():
            if not t > 0:
                raise ConfigError(f"method.teacher_temperature.{n}: must be > 0, got {t}")


GATE_SIGNALS = ("state", "uncertainty", "pre_teachers")


class DiverseDistill(Method):
    uses_transfer = True
    reads_reps = True

    def __init__(self, cfg: DiverseDistillConfig, student: TaskModel, task: TaskData,
                 teachers: dict[str, Any], built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        self.names = committee(cfg.teachers, list(teachers), "diverse_distill")
        self.c = cfg
        k, q, d = len(self.names), cfg.query_dim, student.rep_dim
        self.teacher_embed = nn.Parameter(torch.randn(k, q) * 0.02)
        self.w_q = nn.Linear(d, q)
        self.proj = nn.ModuleList([nn.Linear(self.teacher_info[n]["rep_dim"], q) for n in self.names])
        self.answer = nn.ModuleList([mlp([2 * q, cfg.answer_hidden, d]) for _ in self.names])
        self._tokens: dict[str, torch.Tensor] = {}  # (rows, tokens, dim) fp16, not saved: it is the cache
        self.token_answer = nn.ModuleDict()
        for n in cfg.token_teachers:
            if n not in self.names:
                raise ConfigError(f"method.token_teachers: {n!r} is not in the committee ({', '.join(self.names)})")
            states = teachers[n].token_states(task) if hasattr(teachers[n], "token_states") else None
            if states is None:
                raise ConfigError(f"method.token_teachers: teacher {n!r} ({teachers[n].recipe}) offers no token or "
                                  "patch states; remove it from token_teachers (its pooled state is used)")
            if states.shape[0] != task.num_rows:
                raise ConfigError(f"method.token_teachers: teacher {n!r} has token states for {states.shape[0]} "
                                  f"rows, the task has {task.num_rows}; delete its cache entry to rebuild it")
            self._tokens[n] = states
            self.token_answer[n] = TokenAnswer(int(states.shape[-1]), q, cfg.heads, cfg.answer_hidden, d)
        self._pre = self._pre_teacher_outputs(teachers)
        self.gate = nn.Linear(self._gate_dim(d), k)
        self.rho = cfg.rho if cfg.rho is not None else 1.0 / (2 * k)
        # Live teachers are not submodules: DDP and the checkpoint hold trainable parts only.
        self._live: dict[str, TaskModel] = (
            {n: teachers[n].load_model(task) for n in self.names} if cfg.teacher_source == "live" else {})
        self.register_buffer("pairs", torch.zeros(2, dtype=torch.long))  # (kept, skipped), summed over training
        self.register_buffer("live_rows", torch.zeros(k, dtype=torch.long))  # rows each live teacher ran on
        self.register_buffer("alpha_sum", torch.zeros(k))
        self.register_buffer("alpha_rows", torch.zeros((), dtype=torch.long))
        unknown = [n for n in [*cfg.teacher_temperature, *cfg.teacher_logit_bias] if n not in self.names]
        if unknown:
            raise ConfigError(f"method.teacher_temperature / teacher_logit_bias: {unknown[0]!r} is not in the "
                              f"committee ({', '.join(self.names)})")
        if cfg.foundation_warmup_steps > 0:
            self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if cfg.gate_target == "confidence" and self.task_type == "regression":
            raise ConfigError("method.gate_target: confidence needs class outputs (a regression teacher has no "
                              "entropy); use reliability or disagreement")
        if cfg.l_hint > 0:  # built last and only when on: every other module's initialisation is unchanged
            self.hint_proj = nn.ModuleList([nn.Linear(d, self.teacher_info[n]["rep_dim"]) for n in self.names])

    @classmethod
    def required_teachers(cls, cfg: DiverseDistillConfig, available: list[str]) -> list[str]:  # type: ignore[override]
        names = committee(cfg.teachers, available, "diverse_distill")
        extra = [n for n in cfg.pre_teachers or [] if n not in names] if "pre_teachers" in cfg.gate_signals else []
        return names + [n for n in extra if n in available]

    def _pre_teacher_outputs(self, teachers: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The cached outputs (all rows) of the teachers the `pre_teachers` gate signal reads."""
        if "pre_teachers" not in self.c.gate_signals:
            return {}
        names = self.c.pre_teachers
        if names is None:
            names = [n for n in self.names if self.teacher_info[n]["kind"] != "foundation"]
        bad = [n for n in names if n not in teachers]
        if bad or not names:
            raise ConfigError(f"method.pre_teachers: {bad[0] if bad else names!r} - name teachers of the run "
                              f"({', '.join(teachers)}), or leave it null with a complementary member")
        return {n: teachers[n].outputs for n in names}

    def _gate_dim(self, d: int) -> int:
        sig, classes = self.c.gate_signals, 1 if self.task_type == "regression" else self._classes()
        per_pre = 2 if self.task_type == "regression" else classes + 2
        return ((d if "state" in sig else 0) + (0 if "uncertainty" not in sig else 1 if classes == 1 else 2)
                + per_pre * len(self._pre))

    def _classes(self) -> int:
        return int(next(iter(self.teacher_info.values()))["out_shape"][-1])

    def gate_extra(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, E) signals the gate reads beside the student state (None when it reads the state alone):
        all known before any foundation teacher runs."""
        sig = self.c.gate_signals
        if sig == ["state"]:
            return None
        pred = pred.detach().float()
        parts = []
        regression = self.task_type == "regression"
        if "uncertainty" in sig:
            if regression:
                parts.append(pred.reshape(len(pred), -1))
            else:
                logp = F.log_softmax(pred, -1)
                parts += [-(logp.exp() * logp).sum(-1, keepdim=True), logp.exp().amax(-1, keepdim=True)]
        rows = batch["row"].cpu()
        for n, outs in self._pre.items():
            t = outs[rows].to(pred.device).float()
            kd = per_row_kd(pred, t, self.task_type, self._temperature(n)).reshape(len(pred), 1)
            if regression:
                parts += [t.reshape(len(pred), -1), kd]
            else:
                logp = F.log_softmax(t, -1)
                parts += [logp.exp(), -(logp.exp() * logp).sum(-1, keepdim=True), kd]
        return torch.cat(parts, -1)

    def _temperature(self, name: str) -> float:
        return float(self.c.teacher_temperature.get(name, self.c.temperature))

    def gate_scores(self, z: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) raw gate scores from the student representation (stop-gradient into the student) and the
        optional pre-FM signals of `gate_extra`."""
        if "state" not in self.c.gate_signals:
            assert extra is not None
            return self.gate(extra)
        return self.gate(z.detach() if extra is None else torch.cat([z.detach(), extra], -1))

    def prior(self, g: torch.Tensor) -> torch.Tensor:
        """Gate scores plus each teacher's fixed `teacher_logit_bias` (unchanged when none is set)."""
        if not self.c.teacher_logit_bias:
            return g
        return g + torch.tensor([self.c.teacher_logit_bias.get(n, 0.0) for n in self.names], device=g.device)

    def foundation_ramp(self) -> torch.Tensor | None:
        """(K,) teacher-assistant multipliers: the foundation teachers' weight ramps 0 -> 1; None when off."""
        n = self.c.foundation_warmup_steps
        if n <= 0:
            return None
        r = min(1.0, float(self.step) / n)
        return torch.tensor([r if self.teacher_info[t]["kind"] == "foundation" else 1.0 for t in self.names],
                            device=self.step.device)

    def importance(self, z: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) teacher weights from the student side alone (its state and the pre-FM signals)."""
        k = len(self.names)
        if self.c.importance == "equal":
            return torch.full((len(z), k), 1.0 / k, device=z.device)
        alpha = torch.softmax(self.prior(self.gate_scores(z, extra)) / self.c.tau, -1)
        return (1 - self.c.entropy_floor) * alpha + self.c.entropy_floor / k

    def keep_mask(self, alpha: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) bool: which (row, teacher) pairs run. `score` ranks pairs for `skip_fraction` (default alpha)."""
        c = self.c
        if not c.filter or (c.importance == "equal" and c.filter_by == "gate"):  # equal: no score to rank by
            return torch.ones_like(alpha, dtype=torch.bool)
        score = alpha if score is None else score
        rows = torch.arange(len(alpha), device=alpha.device)
        if c.skip_fraction is not None:
            rank = torch.rand_like(score) if c.filter_by == "random" else score.clone()
            if self.training and c.explore > 0:
                rank = torch.where(torch.rand_like(rank) < c.explore, torch.full_like(rank, float("inf")), rank)
            rank[rows, rank.argmax(-1)] = float("inf")  # never drop every teacher of a row
            n_skip = min(int(c.skip_fraction * rank.numel()), int((rank != float("inf")).sum()))
            keep = torch.ones_like(alpha, dtype=torch.bool).flatten()
            if n_skip > 0:
                keep[rank.flatten().topk(n_skip, largest=False).indices] = False
            return keep.view_as(alpha)
        if c.top_m is not None:
            top = alpha.topk(min(c.top_m, alpha.shape[1]), dim=-1).indices
            return torch.zeros_like(alpha, dtype=torch.bool).scatter_(1, top, True)
        if c.filter_by == "random":
            raise ConfigError("method.filter_by: random needs method.skip_fraction (how many pairs to skip)")
        keep = alpha >= self.rho
        keep[rows, alpha.argmax(-1)] = True  # never drop every teacher
        return keep

    def teacher_states(self, batch: dict[str, torch.Tensor], keep: torch.Tensor
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each teacher's outputs and representations for the batch (zeros where its pair is skipped)."""
        outs, reps = [], []
        for k, n in enumerate(self.names):
            if n not in self._live:
                outs.append(batch[f"teacher:{n}"])
                reps.append(batch[f"teacher_rep:{n}"])
                continue
            model = self._live[n].to(keep.device)
            out = torch.zeros_like(batch[f"teacher:{n}"])
            rep = torch.zeros_like(batch[f"teacher_rep:{n}"])
            idx = keep[:, k].nonzero().squeeze(-1)
            if len(idx):
                sub = {key: v[idx] for key, v in batch.items()
                       if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == len(keep)}
                with torch.no_grad():
                    h = model.body(sub)
                    out[idx] = (model.head(h) + model.offset(sub)).to(out.dtype)
                    rep[idx] = h.to(rep.dtype)
                if self.training:
                    self.live_rows[k] += len(idx)
            outs.append(out)
            reps.append(rep)
        return outs, reps

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c, labeled = self.c, batch["labeled"]
        z = self.student.body(batch)
        offset = self.student.offset(batch)
        pred = self.student.head(z) + offset
        per_task = per_row_task_loss(pred, batch["y"], self.task_type)
        task = masked_mean(per_task, labeled.float())

        extra = self.gate_extra(pred, batch)
        alpha = self.importance(z, extra)
        score = self.prior(self.gate_scores(z, extra)) if c.importance == "learned" else alpha
        keep = self.keep_mask(alpha.detach(), score.detach())
        w = alpha.detach() * keep
        ramp = self.foundation_ramp()
        if ramp is None:
            w = w / w.sum(-1, keepdim=True)
        else:  # a row whose only kept teacher is a foundation one at ramp 0 gets no committee term
            w = w * ramp
            w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        t_outs, t_reps = self.teacher_states(batch, keep)
        q = self.w_q(z)
        align, ans, kd, t_loss, hint = [], [], [], [], []
        needs_t_loss = c.importance == "learned" and c.gate_target in ("benefit", "correctness")  # gate only
        for k, n in enumerate(self.names):
            if n in self._tokens:
                tokens = self._tokens[n][batch["row"].cpu()].to(z.device).float()
                a_k = self.token_answer[n](tokens, q + self.teacher_embed[k])
            else:
                a_k = self.answer[k](torch.cat([self.proj[k](t_reps[k]), q + self.teacher_embed[k]], -1))
            align.append(1 - F.cosine_similarity(z, a_k, dim=-1))
            with torch.set_grad_enabled(torch.is_grad_enabled() and c.l_ans != 0):  # at 0 it is only reported
                per_ans = per_row_task_loss(self.student.head(a_k) + offset, batch["y"], self.task_type)
            ans.append(masked_mean(per_ans, (labeled & keep[:, k]).float()))
            kd.append(per_row_kd(pred, t_outs[k], self.task_type, self._temperature(n)))
            if needs_t_loss:
                t_loss.append(per_row_task_loss(t_outs[k], batch["y"], self.task_type))
            if c.l_hint > 0:
                hint.append(per_row_hint(self.hint_proj[k](z), t_reps[k]))
        align_t = (w * torch.stack(align, -1)).sum(-1).mean()
        if c.combine == "product":  # one KD term per row, to the kept teachers' product of experts
            target = product_target(w, t_outs, self.task_type, [self._temperature(n) for n in self.names],
                                    c.temperature)
            ran = (w.sum(-1) > 0).float()  # a row with no kept teacher (warm-up at 0) gets no KD term
            kd_t = (ran * per_row_kd(pred, target, self.task_type, c.temperature).reshape(len(ran))).mean()
        else:
            kd_t = (w * torch.stack(kd, -1)).sum(-1).mean()
        ans_t = torch.stack(ans).mean()
        loss = c.task_weight * task + c.l_align * align_t
        if c.l_ans != 0:  # at 0 the term is reported, not trained (x + 0.0 == x: the same loss)
            loss = loss + c.l_ans * ans_t
        loss = loss + c.l_kd * kd_t
        out = {"task": task.detach(), "align": align_t.detach(), "answer": ans_t.detach(), "kd": kd_t.detach()}
        if c.l_hint > 0:
            hint_t = (w * torch.stack(hint, -1)).sum(-1).mean()
            loss = loss + c.l_hint * hint_t
            out["hint"] = hint_t.detach()
        if c.importance == "learned":
            if c.gate_target == "disagreement":  # any row that ran the teacher; the target is its KD term
                gate = masked_mean((self.gate_scores(z, extra) - torch.stack(kd, -1).detach()) ** 2, keep.float())
            elif c.gate_target == "confidence":  # any row that ran the teacher; the target is -entropy
                logp = torch.stack([F.log_softmax(o.detach().float(), -1) for o in t_outs], 1)
                gate = masked_mean((self.gate_scores(z, extra) - (logp.exp() * logp).sum(-1)) ** 2, keep.float())
            elif c.gate_target == "reliability":  # labeled rows whose teachers all ran: which blend fits y
                mix = mixture_task_loss(alpha, [o.detach() for o in t_outs], batch["y"], self.task_type)
                gate = masked_mean(mix, (labeled & keep.all(-1)).float())
            else:  # the gate learns only from labeled rows whose teachers ran
                seen = labeled.unsqueeze(-1) & keep
                gate = self._gate_loss(z, torch.stack(t_loss, -1).detach(), per_task.detach(), seen, extra)
            loss = loss + c.l_gate * gate
            out["gate"] = gate.detach()
        if self.training:
            with torch.no_grad():
                self.pairs += torch.stack([keep.sum(), (~keep).sum()])
                self.alpha_sum += alpha.detach().sum(0)
                self.alpha_rows += len(alpha)
                if ramp is not None:
                    self.step += 1
        out.update({f"alpha:{n}": alpha[:, k].mean().detach() for k, n in enumerate(self.names)})
        out["kept"] = keep.float().mean().detach()
        return {"loss": loss, **out}

    def _gate_loss(self, z: torch.Tensor, teacher_loss: torch.Tensor, student_loss: torch.Tensor,
                   seen: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The gate's own objective on the (row, teacher) pairs in `seen` (labeled rows whose teacher ran)."""
        g = self.gate_scores(z, extra)
        if self.c.gate_target == "benefit":
            return masked_mean((g - (student_loss.unsqueeze(-1) - teacher_loss)) ** 2, seen.float())
        # correctness: cross-entropy to softmax(-loss / target_tau) over the teachers, on rows where all ran
        target = torch.softmax(-teacher_loss / self.c.target_tau, -1)
        per_row = -(target * F.log_softmax(g / self.c.tau, -1)).sum(-1)
        return masked_mean(per_row, seen.all(-1).float())

    def diagnostics(self) -> dict[str, Any]:
        """Teacher pairs kept/skipped by filtering and the mean importance of each teacher over training."""
        rows = max(int(self.alpha_rows), 1)
        kept, skipped = (int(v) for v in self.pairs)
        out = {"pairs_kept": kept, "pairs_skipped": skipped,
               "skipped_fraction": skipped / max(kept + skipped, 1),
               "mean_alpha": {n: float(self.alpha_sum[k]) / rows for k, n in enumerate(self.names)}}
        if self._live:
            out["live_teacher_rows"] = {n: int(self.live_rows[k]) for k, n in enumerate(self.names)}
        return out

    @torch.no_grad()
    def report(self, task: TaskData, history: list[dict[str, Any]], out_dir: Path,
               device: torch.device) -> dict[str, Any]:
        """Teacher importance over training (from the epoch log) and per segment of the validation rows
        (genre, department, class), as numbers for metrics.json and as PNG plots in the run directory."""
        over = {n: [h["train"].get(f"alpha:{n}", float("nan")) for h in history] for n in self.names}
        rows = task.splits["val"]
        self.eval()
        alphas = []
        for s in range(0, len(rows), 4096):
            batch = {k: v.to(device) for k, v in task.gather(rows[s:s + 4096]).items()}
            z = self.student.body(batch)
            extra = self.gate_extra(self.student.head(z) + self.student.offset(batch), batch)
            alphas.append(self.importance(z, extra).cpu())
        alpha = torch.cat(alphas)
        segments = dict(task.segments)
        if not segments and task.task_type == "classification":
            segments = {"class": (task.y, [str(c) for c in range(int(task.num_classes or 0))])}
        by_segment: dict[str, dict[str, Any]] = {}
        plots = []
        if lines(out_dir / "importance_over_training.png", over, xlabel="epoch", ylabel="mean importance",
                 title="DiverseDistill: teacher importance during training"):
            plots.append("importance_over_training.png")
        for seg, (codes, labels) in segments.items():
            c = codes[rows]
            table = {}
            for code in torch.unique(c).tolist():
                m = c == code
                table[labels[code]] = {"rows": int(m.sum()),
                                       **{n: float(alpha[m, k].mean()) for k, n in enumerate(self.names)}}
            by_segment[seg] = table
            groups = list(table)
            if stacked_bars(out_dir / f"importance_by_{seg}.png", groups,
                            {n: [table[g][n] for g in groups] for n in self.names},
                            ylabel="mean importance (val rows)", title=f"DiverseDistill: importance by {seg}"):
                plots.append(f"importance_by_{seg}.png")
        return {"importance_over_training": over, "importance_by_segment": by_segment, "plots": plots}


class TokenAnswer(nn.Module):
    """Cross-attention answer: the teacher-conditioned query attends over the teacher's projected token or
    patch states; the attended context and the query map to the student's representation space."""

    def __init__(self, token_dim: int, query_dim: int, heads: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(token_dim, query_dim)
        self.attn = nn.MultiheadAttention(query_dim, heads, batch_first=True)
        self.out = mlp([2 * query_dim, hidden, out_dim])

    def forward(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        kv = self.proj(tokens)
        ctx, _ = self.attn(query.unsqueeze(1), kv, kv, need_weights=False)
        return self.out(torch.cat([ctx.squeeze(1), query], -1))


METHODS.register("diverse_distill", DiverseDistillConfig, DiverseDistill)
