"""The capturable knowledge-distillation train step (docs/design.md §4) and the epoch loop that drives it.

One step, on every device: batch rows come from a static index buffer into the resident uint8 train
set; each student's augmentation is drawn on the device from its own generator; teacher forward,
student forward and backward, the KD loss and the optimiser step follow, with the learning rate a
device tensor set once per epoch; nothing inside a step waits for the host. On CUDA the step is
captured into CUDA graphs (one per batch shape, the last partial batch has its own) and replayed;
elsewhere it runs eagerly. M >= 1 students train side by side: one model (`Single`) or a fused bank
(ccfs_fast.fused.FusedBank), each with the data order and augmentation it would have alone.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .augment import augment_batch, draw_augmentation, flips_from
from .config import TrainRecipe
from .data import IndexSpace, elementwise_threads, epoch_order
from .errors import one_line
from .processes import CpuShare
from .train import TrainResult, kd_losses, make_optimizer, make_scheduler

GRAPH_OPTIMIZERS = ("sgd", "sgd_nesterov")  # fused SGD takes the learning rate as a device tensor
WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN / cuBLAS set themselves up)


class Single(nn.Module):
    """One model behind the students interface: forward(images [1, b, 3, S, S]) -> logits [1, b, C]."""

    def __init__(self, model: nn.Module, channels_last: bool = False):
        super().__init__()
        self.model, self.channels_last, self.count = model, channels_last, 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images[0]
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.model(batch).unsqueeze(0)


class Separate(nn.Module):
    """M models of one architecture side by side, unfused: forward(images [M, b, 3, S, S]) -> logits
    [M, b, C], model m on images[m]. On CUDA each model's forward runs on its own stream (forked from
    and joined to the caller's, so a CUDA graph captures M parallel branches; autograd runs each
    backward on its forward's stream); elsewhere one after another. Each model computes exactly what
    it computes alone."""

    def __init__(self, models: list[nn.Module], channels_last: bool = False):
        super().__init__()
        self.models, self.channels_last, self.count = nn.ModuleList(models), channels_last, len(models)
        device = next(models[0].parameters()).device
        self.streams = [torch.cuda.Stream(device) for _ in models] if device.type == "cuda" else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batches = [images[m].contiguous(memory_format=torch.channels_last) if self.channels_last else images[m]
                   for m in range(self.count)]
        if self.streams is None:
            return torch.stack([model(batch) for model, batch in zip(self.models, batches)])
        main = torch.cuda.current_stream(images.device)
        outs = []
        for model, batch, stream in zip(self.models, batches, self.streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(model(batch))
        for out, stream in zip(outs, self.streams):
            main.wait_stream(stream)
            out.record_stream(main)
        return torch.stack(outs)

    def model(self, m: int) -> nn.Module:
        return self.models[m]


@dataclass(frozen=True)
class StepConfig:
    """What a step needs besides its tensors: the recipe's optimiser, the KD temperature, the
    augmentation's crop scale / ratio, the fast-path switches and the compute dtype."""

    recipe: TrainRecipe
    temperature: float
    fused_optimizer: bool = True
    channels_last: bool = False
    bf16: bool = False
    dtype: torch.dtype = torch.float32
    teacher_channels_last: bool | None = None  # the teacher's input layout; None: as channels_last
    teacher_stream: bool = True  # CUDA: the teacher forward on its own stream, overlapping the student's
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    @property
    def teacher_in_channels_last(self) -> bool:
        return self.channels_last if self.teacher_channels_last is None else self.teacher_channels_last


class KDStep:
    """One KD step for the M students of `students` (called as `trained`, e.g. its DDP wrapper).

    images: the resident uint8 train set [N, 3, S, S] on the device; generators: one per student,
    on the device, seeded as the student's seed; inv_std255 / shift: the normalisation ([1, 3, 1, 1]);
    sizes: float [N, 2] the stored (height, width) of each image when `images` are whole images of
    varying size resized to S x S (augment.crop_boxes_sized), None when they are S x S themselves.
    __call__(rows int64 [M, b]) -> KD loss per student [M] (a device tensor)."""

    streamed = False  # the train set is resident (StreamedKDStep: read every step)

    def __init__(self, students: nn.Module, trained: nn.Module, teacher: nn.Module, images: torch.Tensor,
                 generators: list[torch.Generator], inv_std255: torch.Tensor, shift: torch.Tensor, cfg: StepConfig,
                 sizes: torch.Tensor | None = None):
        self.students, self.trained, self.teacher, self.images = students, trained, teacher, images
        self.generators, self.cfg, self.sizes = generators, cfg, sizes
        self.inv_std255, self.shift = inv_std255.to(cfg.dtype), shift.to(cfg.dtype)
        self.device = images.device
        self.tensor_lr = cfg.fused_optimizer and cfg.recipe.opt in GRAPH_OPTIMIZERS
        lr = torch.tensor(cfg.recipe.lr, dtype=cfg.dtype, device=self.device) if self.tensor_lr else cfg.recipe.lr
        self.optimizer = make_optimizer(trained, cfg.recipe, fused=self.tensor_lr, lr=lr)
        self.momentum_buffers = self._start_momentum()
        self.teacher_stream = (torch.cuda.Stream(self.device) if cfg.teacher_stream and self.device.type == "cuda"
                               else None)
        self.share = CpuShare()

    def _start_momentum(self) -> list[torch.Tensor]:
        # SGD's first step sets buf = grad; a zero buffer gives buf = 0.9 * 0 + grad: the same value,
        # and the step's operations stay the same from the first step on (as a CUDA graph needs).
        if self.cfg.recipe.opt not in GRAPH_OPTIMIZERS or self.cfg.recipe.momentum == 0:
            return []
        buffers = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(self.optimizer.state[p]["momentum_buffer"])
        return buffers

    def set_lr(self, value: float) -> None:
        """The learning rate for the next steps (once per epoch): written into the device tensor
        when the optimiser takes one, else into its parameter groups."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16, cache_enabled=False)

    def augment(self, rows: torch.Tensor) -> torch.Tensor:
        """Each student's augmented, normalised batch: [M, b, 3, S, S]. Each student draws its random
        numbers from its own generator (what it would draw alone); the crop boxes, the gather and one
        grid_sample then cover all M x b images at once (every op is per image, so each student's
        images are bit for bit what its own pipeline gives, in far fewer kernels)."""
        count, batch = rows.shape
        draws = torch.cat([draw_augmentation(batch, g, self.cfg.dtype) for g in self.generators])
        flat_rows = rows.reshape(-1)
        sizes = None if self.sizes is None else self.sizes.index_select(0, flat_rows)
        with elementwise_threads(self.share, self.device):  # CPU: fewer threads on contended cores
            out = augment_batch(self.images.index_select(0, flat_rows), draws, self.inv_std255, self.shift,
                                self.cfg.scale, self.cfg.ratio, sizes)
        return out.view(count, batch, *out.shape[1:])

    @property
    def size(self) -> int:
        """Images in the train set."""
        return self.images.shape[0]

    def teacher_logits(self, flat: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of the augmented batch (no gradient)."""
        if self.cfg.teacher_in_channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.autocast():
            return self.teacher(flat)

    def logits(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student logits [M, b, C] with their graph, teacher logits [M, b, C] without) of the students'
        augmented batches of `rows` int64 [M, b], in the compute dtype (bf16 under --bf16)."""
        count, batch = rows.shape
        images = self.augment(rows)
        flat = images.view(count * batch, *images.shape[2:])
        if self.teacher_stream is None:
            teacher_logits = self.teacher_logits(flat)
            with self.autocast():
                student_logits = self.trained(images)
        else:  # the teacher forward on a forked stream, overlapping the student's (a fork/join a graph captures)
            main = torch.cuda.current_stream(self.device)
            self.teacher_stream.wait_stream(main)
            with torch.cuda.stream(self.teacher_stream):
                teacher_logits = self.teacher_logits(flat)
            with self.autocast():
                student_logits = self.trained(images)
            main.wait_stream(self.teacher_stream)
            teacher_logits.record_stream(main)
        return student_logits, teacher_logits.view(count, batch, -1)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        losses = kd_losses(*self.logits(rows), self.cfg.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, copy) of every parameter and buffer of the students."""
        return [(t, t.detach().clone()) for t in [*self.students.parameters(), *self.students.buffers()]]

    def restore(self, snapshot: list[tuple[torch.Tensor, torch.Tensor]], seeds: list[int],
                renew_generators: bool = False) -> None:
        """Undoes warm-up (and failed capture) steps in place (tensor addresses kept): parameters and
        buffers, zero momentum and no gradients, and each generator back to its seed; `renew_generators`
        replaces them with new ones (a failed capture may leave registered generators capturing)."""
        with torch.no_grad():
            for tensor, saved in snapshot:
                tensor.copy_(saved)
            for buf in self.momentum_buffers:
                buf.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        if renew_generators:
            self.generators = [torch.Generator(device=g.device) for g in self.generators]
        for g, seed in zip(self.generators, seeds):
            g.manual_seed(seed)


class StreamedKDStep(KDStep):
    """KDStep over a train set too large to keep resident (Workspace.train_form): each step reads its
    rows through FFCV's RandomResizedCrop decoder, which draws torchvision's crop distribution on the
    stored image (from FFCV's own random state), then flips (each student's generator, as KDStep) and
    normalises on the device. `index` int64 [N]: the train set's global indices in `space`."""

    streamed = True

    def __init__(self, students: nn.Module, trained: nn.Module, teacher: nn.Module, space: IndexSpace,
                 index: np.ndarray, device: torch.device, generators: list[torch.Generator], inv_std255: torch.Tensor,
                 shift: torch.Tensor, cfg: StepConfig, workers: int):
        super().__init__(students, trained, teacher, torch.empty(0, dtype=torch.uint8, device=device), generators,
                         inv_std255, shift, cfg)
        self.space, self.index, self.workers = space, np.asarray(index, np.int64), workers

    @property
    def size(self) -> int:
        return len(self.index)

    def augment(self, rows: torch.Tensor) -> torch.Tensor:
        count, batch = rows.shape
        draws = torch.cat([draw_augmentation(batch, g, self.cfg.dtype) for g in self.generators])
        chosen = self.index[rows.reshape(-1).cpu().numpy()]
        images = self.space.read_resident(chosen, self.device, self.workers, "stream")[0]
        images = torch.where(flips_from(draws)[:, None, None, None], images.flip(-1), images)
        dtype = self.cfg.dtype
        out = torch.addcmul(self.shift.to(dtype), images.to(dtype), self.inv_std255.to(dtype))
        return out.view(count, batch, *out.shape[1:])


class CaptureFailed(RuntimeError):
    """A CUDA graph could not be captured: the caller's stream is current again, the default generator out of
    capture mode, and graphs are off for the rest of the process (graphs_failed)."""


# CUDA graphs that failed to capture in this process, by device index: the reason. A failed capture can
# leave process-wide CUDA state behind (the default generator, the graph's private memory pool), and
# what torch leaves differs between versions, so after one failure this process trains eagerly (the
# reason recorded in every later training's execution record) instead of rebuilding that state by hand.
# The CUDA context is per process; so is this record.
_GRAPHS_FAILED: dict[int, str] = {}


def graphs_failed(device: torch.device) -> str | None:
    """Why CUDA graphs are off for the rest of this process on `device` (a capture failed), or None."""
    return _GRAPHS_FAILED.get(_device_index(device)) if device.type == "cuda" else None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class CudaCapture:
    """How GraphedStep captures on CUDA: torch's public `torch.cuda.graph(graph, pool=, stream=)` on a
    side stream, inside `torch.cuda.stream`, whose exit restores the caller's stream whatever happens
    (torch.cuda.graph's own exit skips that when capture_end raises). A capture that fails is given up:
    the default CUDA generator is put back out of capture mode by one trivial capture that succeeds (an
    invalidated capture raises in capture_end before the generators' capture epilogue, so a later eager
    draw from it would raise "Offset increment outside graph capture"), and graphs are off for the rest
    of the process (graphs_failed). The failed graph's pool stays allocated (at most one capture's
    memory, once per process); the students' generators are replaced by GraphedStep."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def warm_up(self, fn: Callable[[], object], times: int) -> None:
        """fn() `times` times on a side stream (cuDNN / cuBLAS set themselves up off the capture)."""
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for _ in range(times):
                fn()
        main.wait_stream(self.stream)

    def capture(self, fn: Callable[[], torch.Tensor], generators: list[torch.Generator]
                ) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, fn's output tensor) of fn captured into a new graph; CaptureFailed after giving up."""
        graph = torch.cuda.CUDAGraph()
        for g in generators:
            graph.register_generator_state(g)
        try:
            # each graph its own private pool (the default): graphs of one step may replay in any order
            with torch.cuda.stream(self.stream), torch.cuda.graph(graph, stream=self.stream):
                out = fn()
        except Exception as exc:  # a Python error mid-capture, or capture_end refusing an invalidated capture
            reason = one_line(exc)
            _GRAPHS_FAILED[_device_index(self.device)] = reason
            self.settle_default_generator()
            raise CaptureFailed(reason) from exc
        return graph.replay, out

    def settle_default_generator(self) -> None:
        """One trivial capture that succeeds: its capture_begin / capture_end run the default CUDA
        generator's capture prologue and epilogue, which leaves it out of capture mode."""
        with suppress(Exception):  # if even this fails, graphs are already off for the process
            trivial = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream), torch.cuda.graph(trivial, stream=stream):
                torch.zeros(1, device=self.device).add_(1)
            torch.cuda.synchronize(self.device)
            del trivial


class GraphedStep:
    """The step captured into one CUDA graph per batch shape and replayed: __call__(rows) copies the
    rows into the shape's static buffer and replays its graph. `capture`: how graphs are captured
    (CudaCapture on the step's device; the tests give one that fails). A capture that fails raises
    CaptureFailed and leaves the step as it was before (parameters, buffers, momentum, fresh
    generators at their seeds), so it then trains exactly as an eager-only step."""

    def __init__(self, step: KDStep, batch_sizes: list[int], seeds: list[int], capture: CudaCapture | None = None):
        self.step = step
        self.rows: dict[int, torch.Tensor] = {}
        self.replays: dict[int, Callable[[], None]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        failed = graphs_failed(step.device)
        if failed is not None and capture is None:
            raise CaptureFailed(f"an earlier capture in this process failed ({failed})")
        try:
            capture = capture or CudaCapture(step.device)
        except (RuntimeError, ValueError, AssertionError) as exc:  # no CUDA stream on this device
            raise CaptureFailed(one_line(exc)) from exc
        count = len(step.generators)
        saved = step.snapshot()
        ok = False
        try:
            for batch in sorted(set(batch_sizes), reverse=True):
                rows = torch.zeros((count, batch), dtype=torch.int64, device=step.device)
                capture.warm_up(lambda rows=rows: step(rows), WARMUP_STEPS)
                step.optimizer.zero_grad(set_to_none=True)
                self.replays[batch], self.losses[batch] = capture.capture(lambda rows=rows: step(rows),
                                                                          step.generators)
                self.rows[batch] = rows
            ok = True
        finally:
            step.restore(saved, seeds, renew_generators=not ok)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        batch = rows.shape[1]
        self.rows[batch].copy_(rows)
        self.replays[batch]()
        return self.losses[batch]


def lr_schedule(recipe: TrainRecipe) -> list[float]:
    """The learning rate of each epoch under the recipe's warm-up and schedule (torch's own
    schedulers, stepped once per epoch, as the plain loop does)."""
    probe = nn.Linear(1, 1)
    optimizer = make_optimizer(probe, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    out = []
    for _ in range(recipe.epochs):
        out.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return out


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


@dataclass
class StepRun:
    """How a training ran: cuda_graphs (bool); `note`, why not when they were not used; `asked`,
    whether they were asked for (a CUDA run with --cuda-graphs): only then is the note a fallback,
    printed on stderr."""

    cuda_graphs: bool
    note: str | None = None
    asked: bool = False
    train_data: str | None = None  # how the train set was read: resident or streamed, and why (Workspace.train_form)
    capture_s: float = 0.0  # capturing the graphs, their warm-up steps included (0 when eager)

    def record(self) -> dict:
        """What metrics.json and state.json keep of it."""
        return {"cuda_graphs": self.cuda_graphs, "cuda_graphs_off": self.note, "fallback": self.asked
                and not self.cuda_graphs, "train_data": self.train_data, "capture_s": self.capture_s}


def graph_plan(step: KDStep, want: bool, distributed: bool, compiled: bool) -> StepRun:
    """Whether to capture CUDA graphs and, when not, the one-line reason (a fallback when asked for)."""
    if step.device.type != "cuda":
        return StepRun(False, f"cuda graphs: CUDA only (device {step.device.type}); running eagerly")
    if step.streamed:
        return StepRun(False, "cuda graphs: off while the train set streams through FFCV's decoders; running eagerly")
    if not want:
        return StepRun(False, "cuda graphs: off (--no-cuda-graphs); running eagerly")
    if distributed:
        return StepRun(False, "cuda graphs: off under torchrun (gradients are all-reduced by DDP); running eagerly",
                       True)
    if compiled:
        return StepRun(False, "cuda graphs: off with --compile; running eagerly", True)
    failed = graphs_failed(step.device)
    if failed is not None:
        return StepRun(False, f"cuda graphs: off for the rest of this process after a failed capture ({failed}); "
                              "running eagerly", True)
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):  # each student's generator in the graph
        return StepRun(False, f"cuda graphs: torch {torch.__version__} cannot register generators with a graph "
                              "(torch >= 2.5 can); running eagerly", True)
    if not step.tensor_lr:
        return StepRun(False, f"cuda graphs: need fused SGD (--opt sgd / sgd_nesterov with --fused-optimizer), "
                              f"got --opt {step.cfg.recipe.opt}; running eagerly", True)
    return StepRun(True, asked=True)


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
