"""Training and inference: the KD loop of docs/design.md §1.1 step 4.2, top-1 evaluation, prediction over an index
subset, and supervised teacher training with forgetting-event tracking."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import FastPath, TrainRecipe
from .difficulty import ForgettingTracker

OPTIMIZER_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    # weight decay on all parameters, as the paper's script (utils.set_weight_decay without norm
    # groups); `impl` is {"fused": True} (one kernel per step) or {"foreach": True}; `lr` a float or,
    # for fused SGD, a device tensor.
    "sgd": lambda p, r, lr, impl: torch.optim.SGD(p, lr=lr, momentum=r.momentum, weight_decay=r.weight_decay,
                                                  **impl),
    "sgd_nesterov": lambda p, r, lr, impl: torch.optim.SGD(p, lr=lr, momentum=r.momentum,
                                                           weight_decay=r.weight_decay, nesterov=True, **impl),
    "rmsprop": lambda p, r, lr, impl: torch.optim.RMSprop(p, lr=lr, momentum=r.momentum,
                                                          weight_decay=r.weight_decay, eps=0.0316, alpha=0.9,
                                                          foreach=True),  # no fused RMSprop
    "adamw": lambda p, r, lr, impl: torch.optim.AdamW(p, lr=lr, weight_decay=r.weight_decay, **impl),
}

SCHEDULER_FACTORIES: dict[str, Callable[[torch.optim.Optimizer, TrainRecipe], torch.optim.lr_scheduler.LRScheduler]] = {
    "cosineannealinglr": lambda o, r: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=r.epochs - r.lr_warmup_epochs, eta_min=0.0),
    "steplr": lambda o, r: torch.optim.lr_scheduler.StepLR(o, step_size=r.lr_step_size, gamma=r.lr_gamma),
    "exponentiallr": lambda o, r: torch.optim.lr_scheduler.ExponentialLR(o, gamma=r.lr_gamma),
}

WARMUP_FACTORIES = {
    "linear": lambda o, r: torch.optim.lr_scheduler.LinearLR(o, start_factor=r.lr_warmup_decay,
                                                             total_iters=r.lr_warmup_epochs),
    "constant": lambda o, r: torch.optim.lr_scheduler.ConstantLR(o, factor=r.lr_warmup_decay,
                                                                 total_iters=r.lr_warmup_epochs),
}


def make_optimizer(model: nn.Module, recipe: TrainRecipe, fused: bool = False,
                   lr: float | torch.Tensor | None = None) -> torch.optim.Optimizer:
    """The recipe's optimiser over `model`'s parameters; `lr` overrides recipe.lr (a device tensor
    for fused SGD inside a CUDA graph)."""
    impl = {"fused": True} if fused else {"foreach": True}
    return OPTIMIZER_FACTORIES[recipe.opt](model.parameters(), recipe, recipe.lr if lr is None else lr, impl)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm-up for lr_warmup_epochs, then the main schedule; call .step() once per epoch."""
    main = SCHEDULER_FACTORIES[recipe.lr_scheduler](optimizer, recipe)
    if recipe.lr_warmup_epochs == 0:
        return main
    warmup = WARMUP_FACTORIES[recipe.lr_warmup_method](optimizer, recipe)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[recipe.lr_warmup_epochs])


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


def last_fifth_epochs(epochs: int) -> Callable[[int], bool]:
    """The paper's evaluation epochs: those with epoch > 0.8 * epochs (0-based), plus the last epoch
    (for runs of a few epochs, where the paper's rule alone would evaluate none)."""
    return lambda epoch: epoch > epochs * 0.8 or epoch == epochs - 1


@dataclass
class TrainResult:
    """Test top-1 (%) per evaluated epoch, best and last; wall-clock and images processed. For the
    capturable step's trainings (ccfs_fast.step.train_students) also: `loop_s`, the epochs' steps
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


def autocast(images: torch.Tensor, fast: FastPath | None):
    """bf16 autocast on the images' device when the fast path asks for it (a no-op otherwise)."""
    return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bool(fast and fast.bf16))


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


class PredictionColumns:
    """(index int64, argmax int64, true-class logit float32) columns filled batch by batch into
    arrays made once (doubled if a loader yields more rows than it announced). Keeping each batch's
    few small result tensors instead fragments the C heap: every kept tensor is placed in the hole
    that the batch's large temporaries (logits [b, classes]) left, so the next batch's temporaries
    need fresh pages and the resident size grows with the pass (a 1.28 M-image teacher pass at
    1,000 classes: +2.5 GB)."""

    def __init__(self, rows: int):
        self.index, self.pred = np.empty(rows, np.int64), np.empty(rows, np.int64)
        self.logit = np.empty(rows, np.float32)
        self.filled = 0

    def put(self, index: torch.Tensor, pred: torch.Tensor, logit: torch.Tensor) -> None:
        stop = self.filled + len(index)
        if stop > len(self.index):
            size = max(stop, 2 * len(self.index))
            self.index, self.pred, self.logit = (np.resize(a, size) for a in (self.index, self.pred, self.logit))
        self.index[self.filled:stop] = index.cpu().numpy()
        self.pred[self.filled:stop] = pred.cpu().numpy()
        self.logit[self.filled:stop] = logit.cpu().numpy()
        self.filled = stop

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.index[:self.filled], self.pred[:self.filled], self.logit[:self.filled]


def _true_class_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, labels.view(-1, 1))[:, 0]


def _top2_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # noqa: ARG001 - a column's signature
    """(top-1 - top-2 logit) / max(1, |top-1|): how clear the argmax is, relative to the logits' size."""
    top = logits.topk(min(2, logits.shape[1]), dim=1).values
    gap = top[:, 0] - top[:, -1] if top.shape[1] > 1 else torch.full_like(top[:, 0], float("inf"))
    return gap / top[:, 0].abs().clamp_min(1.0)


# What predict's third column holds: name -> fn(logits float32 [b, C], labels [b]) -> [b].
PREDICTION_COLUMNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "logit": _true_class_logit,   # the coarse pass's audit and the `logits` score kind
    "margin": _top2_margin,       # the teacher-pass cache check (near-ties are not compared)
}


@torch.inference_mode()
def predict(model: nn.Module, loader, fast: FastPath | None = None, column: str = "logit"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over an index subset: (index int64 [m], argmax int64 [m], float32 [m]: the true-class logit,
    or with column="margin" the relative top-2 margin, PREDICTION_COLUMNS), in the loader's order. A
    row with a non-finite logit gets argmax -1 (the callers refuse it)."""
    third = PREDICTION_COLUMNS[column]
    model.eval()
    found = PredictionColumns(len(getattr(loader, "indices", ())))
    for images, labels, idx in loader:
        with autocast(images, fast):
            out = model(images)
        out = out.float()
        pred = torch.where(torch.isfinite(out).all(1), out.argmax(1), -1)
        found.put(idx, pred, third(out, labels))
    return found.columns()


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
