"""The capturable knowledge-distillation train step (docs/design.md §4) and the epoch loop that drives it.

One step, on every device: batch rows come from a static index buffer into the resident uint8 train
set; each student's augmentation is drawn on the device from its own generator; teacher forward,
student forward and backward, the KD loss and the optimiser step follow, with the learning rate a
device tensor set once per epoch; nothing inside a step waits for the host. On CUDA the step is
captured into CUDA graphs (one per batch shape, the last partial batch has its own) and replayed;
elsewhere it runs eagerly. M >= 1 students train side by side: one model (`Single`) or a fused bank
(ccfs_fast.train.bank.FusedBank), each with the data order and augmentation it would have alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ccfs_fast.data.augment import augment_batch, draw_augmentation, flips_from
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.data.threads import CpuShare, elementwise_threads
from ccfs_fast.train.losses import kd_losses
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
