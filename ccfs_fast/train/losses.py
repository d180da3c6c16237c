"""The training objectives (what a step's loss is made of), the one KD loss every distillation computes,
and the one autocast helper every forward uses."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def compute_autocast(device_type: str, bf16: bool, cache_enabled: bool = True):
    """The one autocast of every forward (training, evaluation, prediction): bf16 autocast on
    `device_type` when `bf16`, a no-op otherwise. Steps captured into CUDA graphs pass
    cache_enabled=False (autocast's weight-cast cache does not survive a replay)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache_enabled)


def kd_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The one KD loss of every training: per model, KLDiv(log_softmax(s/T), log_softmax(t/T),
    batchmean, log_target=True) * T^2 of logits [M, b, C] (student and teacher), each model over its
    own batch; returns [M]. Computed outside autocast in float32 at least, on both sides, whatever the
    compute dtype: logits out of bf16 autocast are cast up, the teacher's never down to the student's
    (at T = 20 a bf16 log_softmax of the teacher's logits makes the gradient's relative error 9-94%
    once the student is within 1.0-0.1 of its teacher). float64 logits stay float64."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    with torch.autocast(student_logits.device.type, enabled=False):
        student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        terms = F.kl_div(student, teacher, reduction="none", log_target=True)
        return terms.sum((-2, -1)) / student_logits.shape[-2] * temperature ** 2


def ce_losses(student_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per model, the mean cross-entropy of logits [M, b, C] against labels int64 [M, b] (label
    smoothing as torch's), each model over its own batch, in float32 at least; returns [M]."""
    with torch.autocast(student_logits.device.type, enabled=False):
        logits = student_logits.float() if student_logits.dtype in (torch.bfloat16, torch.float16) else student_logits
        return torch.stack([F.cross_entropy(logits[m], labels[m], label_smoothing=label_smoothing)
                            for m in range(logits.shape[0])])


@dataclass(frozen=True)
class Objective:
    """What a step's loss is made of: whether it runs the teacher on the augmented batch, whether it
    reads the images' labels, whether it reads fixed per-image targets (soft labels), and loss(student
    logits [M, b, C], the teacher's logits or the images' targets or None, labels [M, b] or None, the
    step's config) -> [M]."""

    name: str
    uses_teacher: bool
    uses_labels: bool
    loss: Callable[..., torch.Tensor]
    uses_targets: bool = False


OBJECTIVES: dict[str, Objective] = {
    # knowledge distillation from a live teacher (labels unused): the paper's filters and evaluations
    "kd": Objective("kd", True, False, lambda s, t, y, cfg: kd_losses(s, t, cfg.temperature)),
    # cross-entropy on the images' labels: a teacher's training, an evaluation with hard labels
    "hard": Objective("hard", False, True, lambda s, t, y, cfg: ce_losses(s, y, cfg.label_smoothing)),
    # KD against each image's soft label fixed once (the teacher's logits of the unaugmented image): no live teacher
    "soft": Objective("soft", False, False, lambda s, t, y, cfg: kd_losses(s, t, cfg.temperature), True),
}
