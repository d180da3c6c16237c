"""The one epoch loop around a step, the one evaluation of M students, and what a training returns."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from beton_builder.base.errors import one_line
from ccfs_fast.data.loaders import epoch_order
from ccfs_fast.selection.difficulty import ForgettingTracker
from ccfs_fast.train.graphs import GraphedStep, StepRun
from ccfs_fast.train.losses import autocast, kd_losses
from ccfs_fast.train.optim import lr_schedule, make_optimizer, make_scheduler
from ccfs_fast.train.recipe import FastPath, TrainRecipe
from ccfs_fast.train.step import KDStep


def last_fifth_epochs(epochs: int) -> Callable[[int], bool]:
    """The paper's evaluation epochs: those with epoch > 0.8 * epochs (0-based), plus the last epoch
    (for runs of a few epochs, where the paper's rule alone would evaluate none)."""
    return lambda epoch: epoch > epochs * 0.8 or epoch == epochs - 1


@dataclass
class TrainResult:
    """Test top-1 (%) per evaluated epoch, best and last; wall-clock and images processed. For the
    capturable step's trainings (ccfs_fast.train.loop.train_students) also: `loop_s`, the epochs' steps
    alone; `eval_s`, the test evaluations; `setup_s`, everything else of `seconds` (model builds,
    fusion check, reading the train set, graph capture and warm-up); one record per epoch (`epochs`:
    epoch, loss, lr, seconds, img_per_s, test_acc or None)."""

    accs: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    loop_s: float = 0.0
    eval_s: float = 0.0
    epochs: list[dict] = field(default_factory=list)

    @property
    def setup_s(self) -> float:
        return max(0.0, self.seconds - self.loop_s - self.eval_s) if self.loop_s else 0.0

    @property
    def best_acc(self) -> float | None:
        return max(a for _, a in self.accs) if self.accs else None

    @property
    def last_acc(self) -> float | None:
        return self.accs[-1][1] if self.accs else None

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); a no-op elsewhere. For timing only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(model: nn.Module, loader, recipe: TrainRecipe, loss_of: Callable, test_loader=None,
        eval_epoch: Callable[[int], bool] = lambda e: False, desc: str = "train", fast: FastPath | None = None,
        evaluate_model: nn.Module | None = None, end_of_epoch: Callable[[], None] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None) -> TrainResult:
    """The epoch loop shared by every training: the recipe's optimiser (fused when the fast path
    says so) and per-epoch schedule, loss_of(batch) -> loss per batch, end_of_epoch() after each
    epoch, and test top-1 of `evaluate_model` (default `model`; the unwrapped module under DDP)
    after each epoch where eval_epoch(epoch). One record per epoch (result.epochs: the mean loss, the
    learning rate, seconds, images/s, test top-1), also given to on_epoch(0, record)."""
    optimizer = make_optimizer(model, recipe, fused=bool(fast and fast.fused_optimizer))
    scheduler = make_scheduler(optimizer, recipe)
    result = TrainResult()
    start = time.perf_counter()
    bar = tqdm(range(recipe.epochs), desc=desc, leave=False, dynamic_ncols=True)
    for epoch in bar:
        began, lr = time.perf_counter(), float(optimizer.param_groups[0]["lr"])
        model.train()
        loss_sum, seen = None, 0
        for batch in loader:
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            part = loss.detach().double() * len(batch[0])  # summed on the device: read once an epoch
            loss_sum = part if loss_sum is None else loss_sum + part
            seen += len(batch[0])
        result.images += seen
        loop_s = time.perf_counter() - began
        result.loop_s += loop_s
        if end_of_epoch is not None:
            end_of_epoch()
        scheduler.step()
        acc = None
        if test_loader is not None and eval_epoch(epoch):
            evaluated = time.perf_counter()
            acc = evaluate(evaluate_model or model, test_loader, fast)
            result.eval_s += time.perf_counter() - evaluated
            result.accs.append((epoch, acc))
            bar.set_postfix(acc=f"{acc:.2f}", best=f"{result.best_acc:.2f}")
        record = {"epoch": epoch, "loss": float(loss_sum) / max(1, seen) if loss_sum is not None else None, "lr": lr,
                  "seconds": loop_s, "img_per_s": seen / loop_s if loop_s else 0.0, "test_acc": acc}
        result.epochs.append(record)
        if on_epoch is not None:
            on_epoch(0, record)
    result.seconds = time.perf_counter() - start
    return result


def train_kd(student: nn.Module, teacher: nn.Module, loader, recipe: TrainRecipe, temperature: float,
             test_loader=None, eval_epoch: Callable[[int], bool] = lambda e: False, desc: str = "train",
             fast: FastPath | None = None, evaluate_model: nn.Module | None = None) -> TrainResult:
    """Trains `student` by knowledge distillation only (labels unused): the teacher sees the same
    augmented batch; bf16 autocast for both forwards when the fast path asks for it."""
    teacher.eval()

    def loss_of(batch):
        images = batch[0]
        with torch.inference_mode(), autocast(images, fast):
            teacher_logits = teacher(images)
        with autocast(images, fast):
            student_logits = student(images)
        return kd_losses(student_logits.unsqueeze(0), teacher_logits.clone().unsqueeze(0), temperature)[0]

    return fit(student, loader, recipe, loss_of, test_loader, eval_epoch, desc, fast, evaluate_model)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, fast: FastPath | None = None) -> float:
    """Top-1 accuracy in percent over every batch of `loader`."""
    model.eval()
    correct = total = 0
    for images, labels, _ in loader:
        with autocast(images, fast):
            logits = model(images)
        correct += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def train_supervised(model: nn.Module, loader, recipe: TrainRecipe, test_loader=None,
                     tracker: ForgettingTracker | None = None, label_smoothing: float = 0.0,
                     desc: str = "teacher", fast: FastPath | None = None, evaluate_model: nn.Module | None = None,
                     gather: Callable | None = None, on_epoch: Callable[[int, dict], None] | None = None
                     ) -> TrainResult:
    """Cross-entropy training (a teacher). Forgetting events are recorded on the augmented
    presentations, once per epoch; `gather` merges every rank's (index, correct) under DDP."""
    seen_index: list[np.ndarray] = []
    seen_correct: list[np.ndarray] = []

    def loss_of(batch):
        images, labels, index = batch
        with autocast(images, fast):
            logits = model(images)
        if tracker is not None:
            seen_index.append(index.cpu().numpy())
            seen_correct.append((logits.argmax(1) == labels).cpu().numpy())
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

    def record_presentations():
        if tracker is not None and seen_index:
            presented = (np.concatenate(seen_index), np.concatenate(seen_correct))
            tracker.update(*(gather(presented) if gather else presented))
        seen_index.clear()
        seen_correct.clear()

    return fit(model, loader, recipe, loss_of, test_loader, last_fifth_epochs(recipe.epochs), desc, fast,
               evaluate_model, record_presentations, on_epoch)


@torch.inference_mode()
def evaluate_students(students: nn.Module, loader, bf16: bool = False) -> list[float]:
    """Top-1 accuracy (%) of each of the M students over every batch of `loader` (the same images
    for every student)."""
    students.eval()
    correct, total = None, 0
    for images, labels, _ in loader:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = students(images.unsqueeze(0).expand(students.count, *images.shape))
        hits = (logits.argmax(2) == labels.unsqueeze(0)).sum(1)
        correct = hits if correct is None else correct + hits
        total += len(labels)
    if correct is None:
        return [0.0] * students.count
    return [100.0 * int(c) / max(total, 1) for c in correct.cpu()]


def train_students(step: KDStep, seeds: list[int], batch_size: int, recipe: TrainRecipe, test_loader=None,
                   eval_epoch: Callable[[int], bool] = lambda e: False, desc: str = "train", rank: int = 0,
                   world_size: int = 1, plan: StepRun | None = None,
                   make_graphed: Callable[..., GraphedStep] = GraphedStep,
                   on_epoch: Callable[[int, dict], None] | None = None) -> tuple[list[TrainResult], StepRun]:
    """The epoch loop around a step: per epoch the learning rate, each student's sample order (its
    generator), the steps over this rank's share, then test top-1 of every student where
    eval_epoch(epoch). Returns one TrainResult per student (seconds: the shared wall-clock; loop_s /
    eval_s: the steps alone / the test evaluations; images: that student's; one record per epoch) and
    how the step ran. `make_graphed(step, shapes, seeds)` captures the step (GraphedStep); a capture
    that fails falls back to the eager step, which then trains exactly as an eager-only run.
    `on_epoch(m, record)` receives student m's record after each epoch (curves, as training goes)."""
    plan = plan or StepRun(False)
    n = step.size
    per_rank = -(-n // world_size)
    shapes = [batch_size] + ([per_rank % batch_size] if per_rank % batch_size else [])
    runner: Callable[[torch.Tensor], torch.Tensor] = step
    start = time.perf_counter()
    if plan.cuda_graphs:
        try:
            runner = make_graphed(step, shapes, seeds)
        except (RuntimeError, AssertionError) as exc:  # CaptureFailed, or torch refusing to capture
            plan = StepRun(False, f"cuda graphs: capture failed ({one_line(exc)}); running eagerly", True,
                           plan.train_data)
        plan.capture_s = time.perf_counter() - start
    if plan.asked and plan.note:
        tqdm.write(plan.note, file=sys.stderr)
    results = [TrainResult() for _ in seeds]
    lrs = lr_schedule(recipe)
    bar = tqdm(range(recipe.epochs), desc=desc, leave=False, dynamic_ncols=True)
    for epoch in bar:
        began = time.perf_counter()
        step.set_lr(lrs[epoch])
        step.students.train()
        orders = torch.stack([epoch_order(n, g, rank, world_size) for g in step.generators])
        loss_sum = torch.zeros(len(seeds), dtype=torch.float64, device=step.device)
        for begin in range(0, orders.shape[1], batch_size):
            rows = orders[:, begin:begin + batch_size]
            loss_sum += runner(rows).double() * rows.shape[1]  # read before the next replay overwrites it
        losses = (loss_sum / max(1, orders.shape[1])).tolist()  # one wait for the device per epoch
        loop_s = time.perf_counter() - began
        accs: list[float | None] = [None] * len(seeds)
        if test_loader is not None and eval_epoch(epoch):
            evaluated = time.perf_counter()
            accs = evaluate_students(step.students, test_loader, step.cfg.bf16)
            eval_s = time.perf_counter() - evaluated
            for result, acc in zip(results, accs):
                result.accs.append((epoch, acc))
                result.eval_s += eval_s
            bar.set_postfix(acc=f"{max(accs):.2f}")
        for m, (result, loss, acc) in enumerate(zip(results, losses, accs)):
            result.images += orders.shape[1]
            result.loop_s += loop_s
            record = {"epoch": epoch, "loss": loss, "lr": lrs[epoch], "seconds": loop_s,
                      "img_per_s": orders.shape[1] / loop_s if loop_s else 0.0, "test_acc": acc}
            result.epochs.append(record)
            if on_epoch is not None:
                on_epoch(m, record)
    seconds = time.perf_counter() - start
    for result in results:
        result.seconds = seconds
    return results, plan
