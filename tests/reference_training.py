"""A plain-PyTorch reference of KD training, written the way a training script is (a loader of batches,
the optimiser and the scheduler stepped by hand, the loss straight from its definition): the tests hold
the engine's one step and loop (ccfs_fast.train) against it, bit for bit."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccfs_fast.train.optim import make_optimizer, make_scheduler
from ccfs_fast.train.recipe import TrainRecipe


def reference_train_kd(student: nn.Module, teacher: nn.Module, loader, recipe: TrainRecipe, temperature: float) -> None:
    """`recipe.epochs` epochs of KD (labels unused): per batch the teacher's and the student's logits of the
    same augmented images, KLDiv(log_softmax(s/T), log_softmax(t/T), batchmean, log_target=True) * T^2,
    zero_grad / backward / step; the scheduler stepped once per epoch."""
    optimizer = make_optimizer(student, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    teacher.eval()
    for _ in range(recipe.epochs):
        student.train()
        for images, _, _ in loader:
            with torch.inference_mode():
                teacher_logits = teacher(images)
            student_logits = student(images)
            loss = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                            F.log_softmax(teacher_logits.clone() / temperature, dim=1), reduction="sum",
                            log_target=True) / len(images) * temperature ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
