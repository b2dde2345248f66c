"""`talking`: Talking Models - the student asks, the teacher answers, through learned messages.

Our reading (the paper's full text was unavailable; every choice is an option, see docs/talking.md):
- Each side owns an encoder E (state -> message of `message_dim`) and a decoder D (message -> its own
  state), one pair per state width (`messages.Codec`); `shared_codec` gives both sides one codec.
- One round: question q = E_g(s_g[l_g]) from the student's state at `student_question`; the teacher runs
  live with D_h(q) ADDED at `teacher_inject` (l_h) and answers r = E_h(t[h_h]) from `teacher_answer`;
  the student adds D_g(r) at `student_inject` (h_g) and runs on: the interactive output y~. Round k+1
  asks from the student's states of round k. Terms are averaged over `rounds`.
- The teacher is frozen (eval, no parameter gradients) but differentiable, so the question's encoder
  learns through the teacher's upper layers; `teacher_lr_scale > 0` trains it at train.lr * scale.
- loss = task_weight L_task(plain) + w_interact L_task(y~) + w_mc ||E_g(s_g[h_g]) - sg(r)||^2
         + w_sc (||D_g(E_g(s)) - s||^2 + ||D_h(E_h(t)) - t||^2)          (DESIGN.md section 3)
         + w_state ||s_g[h_g] - sg(target)||^2   target = s_g[h_g] + D_g(r) ("injected") or D_g(r)
         + ramp * w_self KD(plain, sg(y~))          ramp: 0 -> 1 over self_warmup_steps
         + kd_weight KD(plain, cached teacher output)
  The last three carry what the conversation found into the student's own weights (the plain path; why
  they are needed: docs/talking.md).
- predict() is the plain student alone: selected on validation, evaluated and exported. y~ (teacher in
  the loop) is reported beside it in metrics.json["method_diagnostics"]["interactive"].
- `query_rows > 0`: synthetic unlabeled questions (a row with `query_mix` views from another row) whose
  KD target comes from the live teacher: a live teacher can be asked about inputs no cached output covers.
The teacher runs whole each step (its states below l_h could be cached): for the teachers used here its
lower part is embedding lookups, cached FM features or two small conv stages (docs/talking.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import Built, Method, pick_teacher
from fmtransfer.methods.losses import distill_loss, masked_task_loss
from fmtransfer.methods.messages import BODY, Codec, auto_inject_path, run_model, scale_learning_rate, state_dims
from fmtransfer.models.base import TaskModel
from fmtransfer.registry import METHODS


@dataclass
class TalkingConfig(MethodConfig):
    name: str = "talking"
    teacher: str | None = None
    """The teacher to talk to (a name under `teachers:`); null = the first one. It runs live."""
    message_dim: int = 32
    codec_hidden: int = 0
    """Hidden width of each encoder/decoder MLP; 0 = linear maps."""
    shared_codec: bool = False
    """One codec for both sides (pairs of equal state width are shared; others stay per side)."""
    normalize: bool = True
    """Encoders read a parameter-free layer norm of the state."""
    student_question: str = BODY
    """l_g: module path of the student state the question is encoded from (`body` = its representation)."""
    student_inject: str = BODY
    """h_g: where the decoded answer is added to the student (`body`: to the representation, before the head)."""
    teacher_inject: str | None = None
    """l_h: where the decoded question is added to the teacher; null = auto (middle transformer layer,
    first Linear of an MLP trunk, middle conv stage, else body)."""
    teacher_answer: str = BODY
    """h_h: the teacher state the answer is encoded from."""
    answer_output: bool = False
    """Append the teacher's prediction (with the question injected) to the state the answer is encoded from:
    a body state lacks what a model adds after its head (e.g. the per-user and per-item rating biases)."""
    rounds: int = 1
    task_weight: float = 1.0
    w_interact: float = 1.0
    """w1: task loss of y~."""
    w_mc: float = 0.5
    """w2: message consistency ||E_g(s_g[h_g]) - sg(r)||^2."""
    w_sc: float = 0.1
    """w3: self-consistency of both codecs."""
    w_state: float = 0.0
    """Pull the student's own h_g state toward `state_target` (stop-gradient on the target)."""
    state_target: Literal["injected", "decoded"] = "injected"
    """injected: s + D_g(r), the state y~ was computed from; decoded: D_g(r) itself."""
    w_self: float = 1.0
    """Self-distillation of the plain output toward y~ (stop-gradient), on every row of the batch."""
    self_warmup_steps: int = 100
    kd_weight: float = 0.0
    """Plain KD from the teacher's cached output (0 = off)."""
    temperature: float = 4.0
    query_rows: float = 0.0
    """Synthetic questions per step, as a fraction of the batch (0 = none): rows whose `query_mix` features
    come from another row of the batch (e.g. a user with another row's movie). They join the batch as
    unlabeled rows; the live teacher gives their KD target. Training only."""
    query_mix: list[str] = field(default_factory=lambda: ["item", "genres"])
    """Feature views taken from another row to form a synthetic question."""
    teacher_lr_scale: float = 0.0
    """0: frozen teacher. > 0: the teacher trains too, at train.lr * teacher_lr_scale."""
    codec_lr_scale: float = 1.0
    """The message modules train at train.lr * codec_lr_scale."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"method.rounds: must be >= 1, got {self.rounds}")
        if self.message_dim < 1:
            raise ConfigError(f"method.message_dim: must be >= 1, got {self.message_dim}")
        if self.teacher_lr_scale < 0 or self.codec_lr_scale <= 0:
            raise ConfigError("method.teacher_lr_scale must be >= 0 and method.codec_lr_scale > 0")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature: must be > 0, got {self.temperature}")
        if self.query_rows < 0:
            raise ConfigError(f"method.query_rows: must be >= 0, got {self.query_rows}")


class Talking(Method):
    uses_transfer = True

    def __init__(self, cfg: TalkingConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        self.c = cfg
        self.teacher_name = pick_teacher(cfg.teacher, list(teachers), "talking")
        teacher = teachers[self.teacher_name].load_model(task, torch.device("cpu"))
        self.l_g, self.h_g = cfg.student_question, cfg.student_inject
        self.l_h = cfg.teacher_inject or auto_inject_path(teacher)
        self.h_h = cfg.teacher_answer
        probe = task.gather(task.splits["train"][:2])
        self.dim_g = state_dims(student, probe, [self.l_g, self.h_g])
        self.dim_h = state_dims(teacher, probe, [self.l_h, self.h_h])
        answer_dim = self.dim_h[self.h_h] + (int(teacher.out_dim) if cfg.answer_output else 0)
        m, hid = cfg.message_dim, cfg.codec_hidden
        if cfg.shared_codec:
            self.codec_g = Codec([*self.dim_g.values(), self.dim_h[self.l_h], answer_dim], m, hid, cfg.normalize)
            self.codec_h = self.codec_g
        else:
            self.codec_g = Codec(list(self.dim_g.values()), m, hid, cfg.normalize)
            self.codec_h = Codec([self.dim_h[self.l_h], answer_dim], m, hid, cfg.normalize)
        for codec in {id(c): c for c in (self.codec_g, self.codec_h)}.values():
            scale_learning_rate(codec, cfg.codec_lr_scale)
        self.teacher_trainable = cfg.teacher_lr_scale > 0
        if self.teacher_trainable:
            teacher.requires_grad_(True)
            scale_learning_rate(teacher, cfg.teacher_lr_scale)
            self.teacher_model = teacher  # a submodule: trained and checkpointed (never exported)
            self._frozen: list[TaskModel] = []
        else:
            self._frozen = [teacher]  # not a submodule: no gradients, not in checkpoints
        if cfg.query_rows:
            missing = [f for f in cfg.query_mix if f not in task.features]
            if missing or not cfg.query_mix:
                raise ConfigError(f"method.query_mix: {missing[0] if missing else 'empty'!r} is not a feature of "
                                  f"task {task.name} (allowed: {', '.join(task.features)})")
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("live_teacher_rows", torch.zeros((), dtype=torch.long))

    @classmethod
    def required_teachers(cls, cfg: TalkingConfig, available: list[str]) -> list[str]:  # type: ignore[override]
        return [pick_teacher(cfg.teacher, available, "talking")]

    @property
    def teacher(self) -> TaskModel:
        """The live teacher. A frozen one is no submodule (not trained, checkpointed or wrapped by DDP), so it
        follows the student's device here, when it is used."""
        if not self._frozen:
            return self.teacher_model
        t = self._frozen[0]
        device = next(self.student.parameters()).device
        if next(t.parameters()).device != device:
            t.to(device)
        return t

    def train(self, mode: bool = True) -> Talking:
        super().train(mode)
        self.teacher.eval()  # the teacher never runs dropout or updates batch-norm statistics
        return self

    # ------------------------------------------------------------------------------------------ one talk

    def converse(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The plain student pass and `rounds` rounds of question/answer; returns every state the losses use."""
        pred, s_plain, _ = run_model(self.student, batch, capture=[self.l_g, self.h_g])
        asked_from = s_plain
        rounds = []
        for _ in range(self.c.rounds):
            q = self.codec_g.encode(asked_from[self.l_g])
            t_pred, t_states, t_before = run_model(
                self.teacher, batch, inject={self.l_h: self.codec_h.decode(q, self.dim_h[self.l_h])},
                capture=[self.h_h])
            t_answer = t_states[self.h_h]
            if self.c.answer_output:
                t_answer = torch.cat([t_answer, t_pred.reshape(len(t_answer), -1)], -1)
            r = self.codec_h.encode(t_answer)
            answer = self.codec_g.decode(r, self.dim_g[self.h_g])
            if self.h_g == BODY and self.l_g == BODY:  # the representation is the state: no second student pass
                z = s_plain[BODY] + answer
                y_tilde = self.student.head(z) + self.student.offset(batch)
                asked_from = {BODY: z}
            else:
                y_tilde, asked_from, _ = run_model(self.student, batch, inject={self.h_g: answer},
                                                   capture=[self.l_g, self.h_g])
            rounds.append({"q": q, "r": r, "answer": answer, "y_tilde": y_tilde,
                           "t_inject_state": t_before[self.l_h], "t_answer_state": t_states[self.h_h]})
        return {"pred": pred, "states": s_plain, "rounds": rounds}

    @torch.no_grad()
    def with_queries(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch plus synthetic unlabeled rows (`query_mix` views from another row), with the live
        teacher's output on them as their `teacher:<name>` target."""
        n = len(batch["y"])
        k = max(1, round(self.c.query_rows * n))
        src = torch.randint(n, (k,), device=batch["y"].device)
        other = torch.randint(n, (k,), device=batch["y"].device)
        q = {key: v[src] for key, v in batch.items()}
        for f in self.c.query_mix:
            q[f] = batch[f][other]
        q["labeled"] = torch.zeros(k, dtype=torch.bool, device=batch["y"].device)
        q[f"teacher:{self.teacher_name}"] = self.teacher(q).to(batch[f"teacher:{self.teacher_name}"].dtype)
        self.live_teacher_rows += k
        return {key: torch.cat([v, q[key]]) for key, v in batch.items()}

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training and self.c.query_rows:
            batch = self.with_queries(batch)
        c, labeled, y = self.c, batch["labeled"], batch["y"]
        talk = self.converse(batch)
        pred, s_h = talk["pred"], talk["states"][self.h_g]
        task = masked_task_loss(pred, y, labeled, self.task_type)
        ramp = min(1.0, float(self.step) / c.self_warmup_steps) if c.self_warmup_steps > 0 else 1.0
        sums: dict[str, torch.Tensor] = {}
        for rd in talk["rounds"]:
            terms = {
                "interact": masked_task_loss(rd["y_tilde"], y, labeled, self.task_type),
                "mc": F.mse_loss(self.codec_g.encode(s_h), rd["r"].detach()),
                "sc": self.codec_g.self_consistency(s_h.detach())
                + self.codec_h.self_consistency(rd["t_inject_state"].detach()),
                "self": distill_loss(pred, rd["y_tilde"].detach(), self.task_type, c.temperature),
            }
            target = s_h + rd["answer"] if c.state_target == "injected" else rd["answer"]
            terms["state"] = F.mse_loss(s_h, target.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / len(talk["rounds"])
        loss = (c.task_weight * task + c.w_interact * sums["interact"] + c.w_mc * sums["mc"] + c.w_sc * sums["sc"]
                + c.w_state * sums["state"] + ramp * c.w_self * sums["self"])
        out = {"task": task.detach(), **{k: v.detach() for k, v in sums.items()}}
        if c.kd_weight:
            kd = distill_loss(pred, batch[f"teacher:{self.teacher_name}"], self.task_type, c.temperature)
            loss = loss + c.kd_weight * kd
            out["kd"] = kd.detach()
        if self.training:
            with torch.no_grad():
                self.step += 1
                self.live_teacher_rows += len(y) * c.rounds
        return {"loss": loss, **out}

    # ------------------------------------------------------------------------------------------ reports

    def diagnostics(self) -> dict[str, Any]:
        """Where the messages went and how much live teacher work training cost."""
        return {"teacher": self.teacher_name, "paths": {"student_question": self.l_g, "student_inject": self.h_g,
                                                        "teacher_inject": self.l_h, "teacher_answer": self.h_h},
                "state_dims": {"student": self.dim_g, "teacher": self.dim_h}, "rounds": self.c.rounds,
                "teacher_trainable": self.teacher_trainable, "teacher_live_rows": int(self.live_teacher_rows),
                "steps": int(self.step)}

    @torch.no_grad()
    def interactive_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """y~ of the last round: the student with the teacher in the loop."""
        return self.converse(batch)["rounds"][-1]["y_tilde"]

    @torch.no_grad()
    def report(self, task: TaskData, history: list[dict[str, Any]], out_dir: Path,
               device: torch.device) -> dict[str, Any]:
        """Scores of y~ (teacher in the loop) on val, test and every OOD suite, beside the plain path's."""
        self.eval()
        out: dict[str, Any] = {}
        names = ["val", "test", *[f"ood/{s}" for s in task.ood_suites]]
        for split in names:
            rows = task.splits[split]
            preds = []
            for s in range(0, len(rows), 4096):
                batch = {k: v.to(device) for k, v in task.gather(rows[s:s + 4096]).items()}
                preds.append(self.interactive_predict(batch).float().cpu())
            out[split] = task.score(torch.cat(preds), rows)
        interactive = {"val": out["val"], "test": out["test"],
                       "ood": {s: out[f"ood/{s}"] for s in task.ood_suites}}
        return {"interactive": interactive}


METHODS.register("talking", TalkingConfig, Talking)
