"""The one epoch loop around a step, the one evaluation of M students, and what a training returns."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from beton_builder.base.errors import one_line
from ccfs_fast.train.graphs import GraphedStep, StepRun
from ccfs_fast.train.losses import compute_autocast
from ccfs_fast.train.optim import lr_schedule
from ccfs_fast.train.recipe import TrainRecipe
from ccfs_fast.train.step import TrainStep


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


@torch.inference_mode()
def evaluate_students(students: nn.Module, loader, bf16: bool = False) -> list[float]:
    """The one evaluation: top-1 accuracy (%) of each of the M students (Single(model) for one model) over
    every batch of `loader` (the same images for every student)."""
    students.eval()
    correct, total = None, 0
    for images, labels, _ in loader:
        with compute_autocast(images.device.type, bf16):
            logits = students(images.unsqueeze(0).expand(students.count, *images.shape))
        hits = (logits.argmax(2) == labels.unsqueeze(0)).sum(1)
        correct = hits if correct is None else correct + hits
        total += len(labels)
    if correct is None:
        return [0.0] * students.count
    return [100.0 * int(c) / max(total, 1) for c in correct.cpu()]


def train_students(step: TrainStep, seeds: list[int], batch_size: int, recipe: TrainRecipe, test_loader=None,
                   eval_epoch: Callable[[int], bool] = lambda e: False, desc: str = "train", rank: int = 0,
                   world_size: int = 1, plan: StepRun | None = None,
                   make_graphed: Callable[..., GraphedStep] = GraphedStep,
                   on_epoch: Callable[[int, dict], None] | None = None,
                   after_epoch: Callable[[int], None] | None = None) -> tuple[list[TrainResult], StepRun]:
    """The one epoch loop of every training: per epoch the learning rate, the step's batches (each
    student's sample order from its generator, this rank's share: TrainStep.epoch), after_epoch(epoch),
    then test top-1 of every student where eval_epoch(epoch). Returns one TrainResult per student
    (seconds: the shared wall-clock; loop_s / eval_s: the steps alone / the test evaluations; images:
    that student's; one record per epoch) and how the step ran. `make_graphed(step, shapes, seeds)`
    captures the step (GraphedStep); a capture that fails falls back to the eager step, which then
    trains exactly as an eager-only run. `on_epoch(m, record)` receives student m's record after each
    epoch (curves, as training goes)."""
    plan = plan or StepRun(False)
    runner: Callable[[torch.Tensor], torch.Tensor] = step
    start = time.perf_counter()
    if plan.cuda_graphs:
        try:
            runner = make_graphed(step, step.batch_shapes(batch_size, world_size), seeds)
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
        loss_sum = torch.zeros(len(seeds), dtype=torch.float64, device=step.device)
        seen = 0
        for batch, width in step.epoch(batch_size, rank, world_size):
            loss_sum += runner(batch).double() * width  # read before the next replay overwrites it
            seen += width
        losses = (loss_sum / max(1, seen)).tolist()  # one wait for the device per epoch
        loop_s = time.perf_counter() - began
        if after_epoch is not None:
            after_epoch(epoch)
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
            result.images += seen
            result.loop_s += loop_s
            record = {"epoch": epoch, "loss": loss, "lr": lrs[epoch], "seconds": loop_s,
                      "img_per_s": seen / loop_s if loop_s else 0.0, "test_acc": acc}
            result.epochs.append(record)
            if on_epoch is not None:
                on_epoch(m, record)
    seconds = time.perf_counter() - start
    for result in results:
        result.seconds = seconds
    return results, plan
