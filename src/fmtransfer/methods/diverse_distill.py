"""`diverse_distill`: one student learns from a teaching committee (FM + complementary teachers).

Our reading of DiverseDistill (only the abstract was available; every choice is an option):
- Each teacher k has a learned embedding e_k; the student asks with a teacher-conditioned query
  q_k = W_q z_s + e_k.
- The answer module reads the teacher's representation h_k (stored with the prepared teacher) and
  the query: a_k = MLP_k([P_k h_k ; q_k]), in the student's representation space.
- Importance alpha(x) = softmax(G(z_s) / tau), computed from the student side only (so a teacher can be
  skipped before it runs), mixed with an entropy floor. G is NOT trained through the loss it weights
  (a prototype collapsed to one teacher that way): it learns, on labeled rows and with a stop-gradient,
  to predict which teacher is right about the row: target softmax(-loss_k(x) / target_tau).
- Filtering keeps teachers with alpha_k >= rho (default 1/(2K)) or the top m, renormalises, and counts
  the (row, teacher) pairs skipped.
- loss = task + l_align * sum_k alpha_k (1 - cos(z_s, a_k)) + l_ans * mean_k task_loss(S_head(a_k), y)
         + l_kd * sum_k alpha_k KD(t_k, s) + l_gate * CE(alpha_target, G)
All of it is dropped at export: `predict` runs the student alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import Method
from fmtransfer.methods.ca_mkd import per_row_kd
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.methods.multi_kd import committee
from fmtransfer.models.base import TaskModel, mlp
from fmtransfer.plots import lines, stacked_bars
from fmtransfer.registry import METHODS


@dataclass
class DiverseDistillConfig(MethodConfig):
    name: str = "diverse_distill"
    teachers: list[str] | None = None
    """Committee members (names under `teachers:`); null = all."""
    query_dim: int = 64
    answer_hidden: int = 128
    l_align: float = 1.0
    l_ans: float = 0.5
    l_kd: float = 1.0
    l_gate: float = 0.1
    temperature: float = 4.0
    importance: Literal["learned", "equal"] = "learned"
    """learned: G(z_s) predicts which teacher is right; equal: 1/K for every teacher and row."""
    tau: float = 1.0
    target_tau: float = 1.0
    """Temperature of the gate's target softmax(-teacher loss / target_tau)."""
    entropy_floor: float = 0.1
    """alpha = (1 - floor) * softmax(G / tau) + floor / K: no teacher's weight reaches zero by itself."""
    filter: bool = True
    rho: float | None = None
    """Keep teachers whose alpha >= rho (default 1 / (2K)); ignored when top_m is set."""
    top_m: int | None = None
    task_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.entropy_floor <= 1:
            raise ConfigError(f"method.entropy_floor: must be in [0, 1], got {self.entropy_floor}")
        if self.top_m is not None and self.top_m < 1:
            raise ConfigError(f"method.top_m: must be >= 1, got {self.top_m}")


class DiverseDistill(Method):
    uses_transfer = True
    reads_reps = True

    def __init__(self, cfg: DiverseDistillConfig, student: TaskModel, task: TaskData,
                 teachers: dict[str, Any]) -> None:
        super().__init__(cfg, student, task, teachers)
        self.names = committee(cfg.teachers, list(teachers), "diverse_distill")
        self.c = cfg
        k, q, d = len(self.names), cfg.query_dim, student.rep_dim
        self.teacher_embed = nn.Parameter(torch.randn(k, q) * 0.02)
        self.w_q = nn.Linear(d, q)
        self.proj = nn.ModuleList([nn.Linear(self.teacher_info[n]["rep_dim"], q) for n in self.names])
        self.answer = nn.ModuleList([mlp([2 * q, cfg.answer_hidden, d]) for _ in self.names])
        self.gate = nn.Linear(d, k)
        self.rho = cfg.rho if cfg.rho is not None else 1.0 / (2 * k)
        self.register_buffer("pairs", torch.zeros(2, dtype=torch.long))  # (kept, skipped), summed over training
        self.register_buffer("alpha_sum", torch.zeros(k))
        self.register_buffer("alpha_rows", torch.zeros((), dtype=torch.long))

    @classmethod
    def required_teachers(cls, cfg: DiverseDistillConfig, available: list[str]) -> list[str]:  # type: ignore[override]
        return committee(cfg.teachers, available, "diverse_distill")

    def importance(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K) teacher weights from the student representation alone."""
        k = len(self.names)
        if self.c.importance == "equal":
            return torch.full((len(z), k), 1.0 / k, device=z.device)
        alpha = torch.softmax(self.gate(z.detach()) / self.c.tau, -1)
        return (1 - self.c.entropy_floor) * alpha + self.c.entropy_floor / k

    def keep_mask(self, alpha: torch.Tensor) -> torch.Tensor:
        if not self.c.filter:
            return torch.ones_like(alpha, dtype=torch.bool)
        if self.c.top_m is not None:
            top = alpha.topk(min(self.c.top_m, alpha.shape[1]), dim=-1).indices
            return torch.zeros_like(alpha, dtype=torch.bool).scatter_(1, top, True)
        keep = alpha >= self.rho
        keep[torch.arange(len(alpha)), alpha.argmax(-1)] = True  # never drop every teacher
        return keep

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c, labeled = self.c, batch["labeled"]
        z = self.student.body(batch)
        offset = self.student.offset(batch)
        pred = self.student.head(z) + offset
        task = masked_task_loss(pred, batch["y"], labeled, self.task_type)

        alpha = self.importance(z)
        keep = self.keep_mask(alpha.detach())
        w = alpha.detach() * keep
        w = w / w.sum(-1, keepdim=True)
        q = self.w_q(z)
        align, ans, kd = [], [], []
        for k, n in enumerate(self.names):
            a_k = self.answer[k](torch.cat([self.proj[k](batch[f"teacher_rep:{n}"]), q + self.teacher_embed[k]], -1))
            align.append(1 - F.cosine_similarity(z, a_k, dim=-1))
            ans.append(masked_task_loss(self.student.head(a_k) + offset, batch["y"], labeled, self.task_type))
            kd.append(per_row_kd(pred, batch[f"teacher:{n}"], self.task_type, c.temperature))
        align_t = (w * torch.stack(align, -1)).sum(-1).mean()
        kd_t = (w * torch.stack(kd, -1)).sum(-1).mean()
        ans_t = torch.stack(ans).mean()
        loss = c.task_weight * task + c.l_align * align_t + c.l_ans * ans_t + c.l_kd * kd_t
        out = {"task": task.detach(), "align": align_t.detach(), "answer": ans_t.detach(), "kd": kd_t.detach()}
        if c.importance == "learned":
            gate = self._gate_loss(z, batch, labeled)
            loss = loss + c.l_gate * gate
            out["gate"] = gate.detach()
        if self.training:
            with torch.no_grad():
                self.pairs += torch.stack([keep.sum(), (~keep).sum()])
                self.alpha_sum += alpha.detach().sum(0)
                self.alpha_rows += len(alpha)
        out.update({f"alpha:{n}": alpha[:, k].mean().detach() for k, n in enumerate(self.names)})
        return {"loss": loss, **out}

    def _gate_loss(self, z: torch.Tensor, batch: dict[str, torch.Tensor], labeled: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of G(z_s) to softmax(-teacher loss / target_tau) on labeled rows (stop-gradient into z)."""
        with torch.no_grad():
            per = []
            for n in self.names:
                t = batch[f"teacher:{n}"]
                if self.task_type == "regression":
                    per.append((t - batch["y"].float()) ** 2)
                else:
                    per.append(F.cross_entropy(t, batch["y"].long(), reduction="none"))
            target = torch.softmax(-torch.stack(per, -1) / self.c.target_tau, -1)
        logp = F.log_softmax(self.gate(z.detach()) / self.c.tau, -1)
        per_row = -(target * logp).sum(-1)
        m = labeled.float()
        return (per_row * m).sum() / m.sum().clamp(min=1.0)

    def diagnostics(self) -> dict[str, Any]:
        """Teacher pairs kept/skipped by filtering and the mean importance of each teacher over training."""
        rows = max(int(self.alpha_rows), 1)
        kept, skipped = (int(v) for v in self.pairs)
        return {"pairs_kept": kept, "pairs_skipped": skipped,
                "skipped_fraction": skipped / max(kept + skipped, 1),
                "mean_alpha": {n: float(self.alpha_sum[k]) / rows for k, n in enumerate(self.names)}}


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
            alphas.append(self.importance(self.student.body(batch)).cpu())
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


METHODS.register("diverse_distill", DiverseDistillConfig, DiverseDistill)
