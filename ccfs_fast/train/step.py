"""The one capturable train step of every training (docs/design.md §4): filters, evaluation models, teachers,
the benchmarks' baselines.

One step, on every device: batch rows come from a static index buffer into the resident uint8 train
set; each student's augmentation is drawn on the device from its own generator; the teacher's forward
(when the objective distils), the students' forward and backward, the objective's loss (ccfs_fast.train.
losses) and the optimiser step follow, with the learning rate a device tensor set once per epoch;
nothing inside a step waits for the host. On CUDA the step is
captured into CUDA graphs (one per batch shape, the last partial batch has its own) and replayed;
elsewhere it runs eagerly. M >= 1 students train side by side: one model (`Single`) or a fused bank
(ccfs_fast.train.bank.FusedBank), each with the data order and augmentation it would have alone.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from beton_builder.base.errors import UnknownNameError
from ccfs_fast.data.augment import draw_augmentation, flips_from
from ccfs_fast.data.loaders import augment_rows, epoch_order
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.data.threads import CpuShare
from ccfs_fast.train.losses import OBJECTIVES, compute_autocast
from ccfs_fast.train.optim import make_optimizer
from ccfs_fast.train.recipe import TrainRecipe

GRAPH_OPTIMIZERS = ("sgd", "sgd_nesterov")  # fused SGD takes the learning rate as a device tensor


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
    """What a step needs besides its tensors: the recipe's optimiser, the objective (OBJECTIVES: kd, the
    KD temperature; hard, the label smoothing), the augmentation's crop scale / ratio, the fast-path
    switches and the compute dtype."""

    recipe: TrainRecipe
    temperature: float
    objective: str = "kd"
    label_smoothing: float = 0.0
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


class TrainStep:
    """One train step for the M students of `students` (called as `trained`, e.g. its DDP wrapper).

    images: the resident uint8 train set [N, 3, S, S] on the device; generators: one per student,
    on the device, seeded as the student's seed; inv_std255 / shift: the normalisation ([1, 3, 1, 1]);
    sizes: float [N, 2] the stored (height, width) of each image when `images` are whole images of
    varying size resized to S x S (augment.crop_boxes_sized), None when they are S x S themselves;
    labels int64 [N] (the objective `hard` reads them), index int64 [N] (each row's global index) and
    targets float [N, C] (each row's fixed soft label: the objective `soft` reads them).
    `watch(rows, student logits, labels)`, when set, sees every step's batch (a teacher's forgetting
    events). __call__(rows int64 [M, b]) -> loss per student [M] (a device tensor)."""

    streamed = False  # the train set is resident (StreamedTrainStep: read every step)

    def __init__(self, students: nn.Module, trained: nn.Module, teacher: nn.Module | None, images: torch.Tensor,
                 generators: list[torch.Generator], inv_std255: torch.Tensor, shift: torch.Tensor, cfg: StepConfig,
                 sizes: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 index: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        if cfg.objective not in OBJECTIVES:
            raise UnknownNameError("training objective", cfg.objective, list(OBJECTIVES))
        self.objective = OBJECTIVES[cfg.objective]
        if self.objective.uses_targets and targets is None:
            raise ValueError(f"objective {cfg.objective!r} needs the train set's targets")
        self.targets = targets  # float [N, C]: each row's fixed soft label (objective `soft`)
        self.students, self.trained, self.teacher, self.images = students, trained, teacher, images
        self.generators, self.cfg, self.sizes, self.labels, self.index = generators, cfg, sizes, labels, index
        self.watch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None
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
        return compute_autocast(self.device.type, self.cfg.bf16, cache_enabled=False)

    def augment(self, rows: torch.Tensor) -> torch.Tensor:
        """Each student's augmented, normalised batch: [M, b, 3, S, S]. Each student draws its random
        numbers from its own generator (what it would draw alone); the crop boxes, the gather and one
        grid_sample then cover all M x b images at once (every op is per image, so each student's
        images are bit for bit what its own pipeline gives, in far fewer kernels)."""
        count, batch = rows.shape
        draws = torch.cat([draw_augmentation(batch, g, self.cfg.dtype) for g in self.generators])
        out = augment_rows(self.images, rows.reshape(-1), draws, self.inv_std255, self.shift, self.cfg.scale,
                           self.cfg.ratio, self.sizes, self.share)
        return out.view(count, batch, *out.shape[1:])

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the students' augmented batches [M, b, 3, S, S], their labels int64 [M, b] when the objective
        or a watcher reads them, else None) of `rows` int64 [M, b]."""
        labels = None
        if self.labels is not None and (self.objective.uses_labels or self.watch is not None):
            labels = self.labels.index_select(0, rows.reshape(-1)).view(rows.shape)
        return self.augment(rows), labels

    @property
    def size(self) -> int:
        """Images in the train set."""
        return self.images.shape[0]

    def batch_shapes(self, batch_size: int, world_size: int = 1) -> list[int]:
        """The batch sizes an epoch's steps take on one rank: full batches, then a partial one."""
        per_rank = -(-self.size // world_size)
        return [batch_size] + ([per_rank % batch_size] if per_rank % batch_size else [])

    def epoch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, int]]:
        """One epoch's steps on this rank: (rows int64 [M, b], b), each student's sample order drawn from
        its own generator (epoch_order), the orders drawn before the epoch's first step."""
        orders = torch.stack([epoch_order(self.size, g, rank, world_size) for g in self.generators])
        for begin in range(0, orders.shape[1], batch_size):
            rows = orders[:, begin:begin + batch_size]
            yield rows, rows.shape[1]

    def teacher_logits(self, flat: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of the augmented batch (no gradient)."""
        if self.cfg.teacher_in_channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.autocast():
            return self.teacher(flat)

    def logits(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(student logits [M, b, C] with their graph, the teacher's [M, b, C] without when the objective
        distils, else None, the labels [M, b] or None) of the students' batches of `batch` (rows int64
        [M, b]), in the compute dtype (bf16 under --bf16)."""
        images, labels = self.inputs(batch)
        count, size = images.shape[:2]
        if self.objective.uses_targets:
            with self.autocast():
                student_logits = self.trained(images)
            return student_logits, self.targets.index_select(0, batch.reshape(-1)).view(count, size, -1), labels
        if not self.objective.uses_teacher:
            with self.autocast():
                return self.trained(images), None, labels
        flat = images.view(count * size, *images.shape[2:])
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
        return student_logits, teacher_logits.view(count, size, -1), labels

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        student_logits, teacher_logits, labels = self.logits(batch)
        losses = self.objective.loss(student_logits, teacher_logits, labels, self.cfg)
        if self.watch is not None:
            self.watch(batch, student_logits.detach(), labels)
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


class StreamedTrainStep(TrainStep):
    """TrainStep over a train set too large to keep resident (Workspace.train_form): each step reads its
    rows through FFCV's RandomResizedCrop decoder, which draws torchvision's crop distribution on the
    stored image (from FFCV's own random state), then flips (each student's generator, as TrainStep) and
    normalises on the device. `index` int64 [N]: the train set's global indices in `space`."""

    streamed = True

    def __init__(self, students: nn.Module, trained: nn.Module, teacher: nn.Module, space: IndexSpace,
                 index: np.ndarray, device: torch.device, generators: list[torch.Generator], inv_std255: torch.Tensor,
                 shift: torch.Tensor, cfg: StepConfig, workers: int, targets: torch.Tensor | None = None):
        super().__init__(students, trained, teacher, torch.empty(0, dtype=torch.uint8, device=device), generators,
                         inv_std255, shift, cfg, targets=targets)
        self.space, self.rows_index, self.workers = space, np.asarray(index, np.int64), workers

    @property
    def size(self) -> int:
        return len(self.rows_index)

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        count, batch = rows.shape
        draws = torch.cat([draw_augmentation(batch, g, self.cfg.dtype) for g in self.generators])
        chosen = self.rows_index[rows.reshape(-1).cpu().numpy()]
        images, labels, _ = self.space.read_resident(chosen, self.device, self.workers, "stream")
        images = torch.where(flips_from(draws)[:, None, None, None], images.flip(-1), images)
        dtype = self.cfg.dtype
        out = torch.addcmul(self.shift.to(dtype), images.to(dtype), self.inv_std255.to(dtype))
        wanted = self.objective.uses_labels or self.watch is not None
        return out.view(count, batch, *out.shape[1:]), labels.view(count, batch) if wanted else None


class LoaderStep(TrainStep):
    """TrainStep fed by a loader of batches already augmented and normalised elsewhere (a torch
    DataLoader over per-sample transforms: the paper's input path, which the benchmarks time): one
    student, the batches' order the loader's own. `loader` yields (images [b, 3, S, S], labels [b]);
    its `dataset` has len(). Never captured into CUDA graphs (its batches come from the host)."""

    streamed = True  # read every step, from the host

    def __init__(self, students: nn.Module, trained: nn.Module, teacher: nn.Module | None, loader,
                 device: torch.device, generator: torch.Generator, cfg: StepConfig):
        unit = torch.ones((1, 3, 1, 1), device=device)
        super().__init__(students, trained, teacher, torch.empty(0, dtype=torch.uint8, device=device), [generator],
                         unit, unit * 0, cfg)
        self.loader = loader

    @property
    def size(self) -> int:
        return len(self.loader.dataset)

    def epoch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[tuple, int]]:
        for images, labels in self.loader:
            yield (images.to(self.device), labels.to(self.device)), len(labels)

    def inputs(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = batch
        return images.unsqueeze(0), labels.unsqueeze(0)
