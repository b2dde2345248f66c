"""Per-row terms DiverseDistill adds for a teacher far ahead of the student (issue 14).

- `per_row_hint`: a FitNets-strength representation hint per (row, teacher), so the committee can weigh
  it by the gate like its KD terms. FitNets from the FM is the best movielens baseline in that regime,
  while DiverseDistill's answer/align term reaches the teacher's representation only through a
  learned answer module at weight 0.1.
- `mixture_task_loss`: the task loss of the gate-weighted mixture of the teachers' outputs, the gate's
  `reliability` target. The gate learns which blend of teachers fits the labels, instead of which
  teacher the student still disagrees with (`disagreement` rewards the weaker teacher once the student
  has learned the stronger one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_row_hint(student_proj: torch.Tensor, teacher_rep: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error between the layer-normed projected student state and teacher state.

    The same normalisation as `fitnet.hint_loss`; its mean over rows equals that loss.
    """
    s = F.layer_norm(student_proj.float(), student_proj.shape[-1:])
    t = F.layer_norm(teacher_rep.float(), teacher_rep.shape[-1:])
    return ((s - t) ** 2).mean(-1)


def mixture_task_loss(alpha: torch.Tensor, outs: list[torch.Tensor], y: torch.Tensor,
                      task_type: str) -> torch.Tensor:
    """(B,) task loss of the alpha-weighted teacher mixture: squared error of the mixed prediction
    (regression), or negative log of the mixed probability of the label (classification).

    `alpha` is (B, K) with rows summing to 1; `outs` are the K teachers' outputs (detached by the caller
    when only alpha should learn).
    """
    if task_type == "regression":
        mix = sum(alpha[:, k] * o.float().reshape(len(alpha)) for k, o in enumerate(outs))
        return (mix - y.float().reshape(len(alpha))) ** 2
    probs = torch.stack([F.softmax(o.float(), -1) for o in outs], 1)  # (B, K, C)
    mix = (alpha.unsqueeze(-1) * probs).sum(1)
    return -torch.log(mix.gather(1, y.long().view(-1, 1)).squeeze(1).clamp(min=1e-12))
