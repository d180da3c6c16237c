"""Supervised training of a model on an index subset (a teacher): the one step (TrainStep, objective
`hard`: cross-entropy on the images' labels) in the one loop (train_students), with the images' forgetting
events recorded on their augmented presentations when asked."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ccfs_fast.data.augment import DEFAULT_SCALE
from ccfs_fast.data.loaders import norm_tensors
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.selection.difficulty import ForgettingTracker
from ccfs_fast.train.distributed import DistContext, gather_concat
from ccfs_fast.train.loop import TrainResult, last_fifth_epochs, train_students
from ccfs_fast.train.recipe import FastPath, TrainRecipe
from ccfs_fast.train.step import Single, StepConfig, TrainStep


def train_supervised(model: nn.Module, space: IndexSpace, indices: np.ndarray, batch_size: int, recipe: TrainRecipe,
                     fast: FastPath, device: torch.device, seed: int, workers: int, test_loader=None,
                     label_smoothing: float = 0.0, tracker: ForgettingTracker | None = None,
                     dist: DistContext | None = None, on_epoch: Callable[[int, dict], None] | None = None,
                     desc: str = "teacher", scale: tuple[float, float] = DEFAULT_SCALE) -> TrainResult:
    """Trains `model` (built, on `device`) by cross-entropy on the images `indices` of `space`, read once
    into a resident uint8 tensor and augmented on the device (RandomResizedCrop + flip) from one
    generator seeded with `seed`; test top-1 on the last fifth of the epochs. Under torchrun (`dist`)
    the model is wrapped in DDP and each rank trains a strided share of every epoch (`batch_size`: per
    rank); `tracker` receives every epoch's presentations, gathered from every rank; `scale`: the crops'
    share of each image (RandomResizedCrop's)."""
    dist = dist or DistContext()
    images, labels, index = space.read_resident(indices, device, workers)
    students = Single(model, bool(fast.channels_last))
    trained = students
    if dist.enabled:
        trained = DistributedDataParallel(students, device_ids=[device.index] if device.type == "cuda" else None)
    inv_std255, shift = norm_tensors(space.norm, device)
    cfg = StepConfig(recipe, 1.0, objective="hard", label_smoothing=label_smoothing,
                     fused_optimizer=bool(fast.fused_optimizer), channels_last=bool(fast.channels_last),
                     bf16=bool(fast.bf16), scale=scale)
    step = TrainStep(students, trained, None, images, [torch.Generator(device=device).manual_seed(seed)], inv_std255,
                     shift, cfg, space.crop_sizes(index), labels, index)
    presented: list[tuple[torch.Tensor, torch.Tensor]] = []
    if tracker is not None:  # which image each step saw, and whether the model classified it correctly
        step.watch = lambda rows, logits, y: presented.append((index.index_select(0, rows[0]),
                                                               logits[0].argmax(1) == y[0]))

    def record_presentations(epoch: int) -> None:
        if tracker is not None and presented:
            seen = (torch.cat([i for i, _ in presented]).cpu().numpy(),
                    torch.cat([c for _, c in presented]).cpu().numpy())
            tracker.update(*gather_concat(seen, dist))
        presented.clear()

    (result,), _ = train_students(step, [seed], batch_size, recipe, test_loader, last_fifth_epochs(recipe.epochs), desc,
                                  dist.rank, dist.world_size, on_epoch=on_epoch, after_epoch=record_presentations)
    return result
