"""The one KD loss every training computes, and the one autocast helper."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ccfs_fast.train.recipe import FastPath


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


def autocast(images: torch.Tensor, fast: FastPath | None):
    """bf16 autocast on the images' device when the fast path asks for it (a no-op otherwise)."""
    return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bool(fast and fast.bf16))
