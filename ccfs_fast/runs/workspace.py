"""Opens and checks a run's inputs: pool, test and distilled .beton files, the teacher."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from beton_builder.base.errors import ConfigError, DataError, ModelError
from beton_builder.beton import BetonFile
from ccfs_fast.data.loaders import EvalLoader, make_test_loader
from ccfs_fast.data.normalization import Normalization, parse_normalize, resolve_normalization
from ccfs_fast.data.overlap import check_distinct, distilled_overlap, overlap_warning
from ccfs_fast.data.readers import read_labels
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.runs.config import Inputs, Machine, distilled_shortage
from ccfs_fast.runs.curves import CurveLog
from ccfs_fast.selection.coarse import CPU_MIN_CHUNK
from ccfs_fast.train.cpu_kernels import swap_cpu_kernels
from ccfs_fast.train.distributed import DistContext, gather_concat, shard
from ccfs_fast.train.models import (
    DEFAULT_TEACHER,
    Checkpoint,
    canonical_model_name,
    create_model,
    load_state,
    read_checkpoint,
    stem_warning,
)
from ccfs_fast.train.predict import predict
from ccfs_fast.train.recipe import FastPath


@dataclass
class Workspace:
    """Everything a run reads, opened once. distilled_rows: global indices (into `space`) of the
    first cpc distilled images of each class, class after class."""

    space: IndexSpace
    test: BetonFile
    pool_labels: np.ndarray
    distilled_rows: np.ndarray
    teacher: nn.Module
    device: torch.device
    workers: int
    eval_batch_size: int
    dist: DistContext = DistContext()
    fast: FastPath = FastPath()
    teacher_arch: str = "resnet18"
    distilled_overlap: dict | None = None  # distilled images with a pool image's pixels (overlap.distilled_overlap)
    train_data: str = "auto"  # auto | resident | streamed: how train sets are read (train_form)
    curves: CurveLog | None = None  # where trainings record their per-epoch curves (rank 0 of a run)
    teacher_test_acc: float | None = None  # the test top-1 (%) the teacher's checkpoint records (its full data's)
    _test_loader: object = None
    _distilled: tuple | None = None

    def predict_pool(self, model: nn.Module, indices: np.ndarray, column: str = "logit"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index, argmax, true-class logit or another of train.PREDICTION_COLUMNS) of `model` over pool
        `indices`, in that order. Under torchrun each rank predicts its contiguous shard and the shards
        are gathered in rank order, which gives exactly the single-process result."""
        local = predict(model, self.pool_loader(shard(np.asarray(indices, np.int64), self.dist)), self.fast, column)
        return gather_concat(local, self.dist)

    def warm(self) -> None:
        """Pays a run's one-time costs before the first curriculum, so none is charged to a phase:
        the per-run constants (test set, distilled images) read into memory, the pool readers the
        phases reuse compiled (IndexSpace.warm_readers), and torch._dynamo imported, which torch.optim
        does at its first optimizer (about 1.6 s on a 2-core CPU)."""
        import torch._dynamo  # noqa: F401

        self.test_loader()
        self.resident(self.distilled_rows)
        self.space.warm_readers(self.workers, self.eval_batch_size)

    def resident(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 images, labels, index of a train set that starts with distilled_rows; the distilled
        part is read once per workspace, the rest (selected pool images) on each call."""
        indices = np.asarray(indices, np.int64)
        head = len(self.distilled_rows)
        if not np.array_equal(indices[:head], self.distilled_rows):
            return self.space.read_resident(indices, self.device, self.workers)
        if self._distilled is None:
            self._distilled = self.space.read_resident(self.distilled_rows, self.device, self.workers)
        if len(indices) == head:
            return self._distilled
        rest = self.space.read_resident(indices[head:], self.device, self.workers)
        return tuple(torch.cat([a, b]) for a, b in zip(self._distilled, rest))

    @property
    def num_classes(self) -> int:
        return self.space.manifest.num_classes

    @property
    def side(self) -> int:
        """The side every image is trained and evaluated at."""
        return self.space.side

    def resident_fits(self, n: int) -> tuple[bool, str]:
        """(whether n images as uint8 n x 3 x S x S fit in half the device's free memory (the CPU: half
        the available RAM), the figures as text)."""
        need = n * 3 * self.side * self.side
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        budget = free // 2
        return need <= budget, (f"{n} images at {self.side}x{self.side} need {need / 2**30:.2f} GiB, budget "
                                f"{budget / 2**30:.2f} GiB")

    def train_form(self, n: int) -> tuple[bool, str]:
        """(streamed, why) for a train set of n images: resident (read once, uint8 on the device,
        augmented there a whole batch at a time) when it fits (resident_fits), else streamed through
        FFCV's decoders every step. Both draw torchvision's RandomResizedCrop + flip distribution.
        --train-data forces either."""
        fits, sizes = self.resident_fits(n)
        if self.train_data == "auto":
            return not fits, f"{'resident' if fits else 'streamed'} ({sizes} on {self.device.type})"
        return self.train_data == "streamed", f"{self.train_data} (--train-data; {sizes})"

    def test_loader(self):
        """The test loader, made once per workspace and reused by every evaluation: resident (read
        once); for a test set of varying image size that does not fit (resident_fits: ImageNet's
        50,000 images at 224 are 7.5 GB), streamed through FFCV at every evaluation."""
        if self._test_loader is None and self.space.variable and not self.resident_fits(self.test.n)[0]:
            test_space = IndexSpace(self.test, norm=self.norm, side=self.side)
            self._test_loader = EvalLoader(test_space, np.arange(self.test.n), self.eval_batch_size, self.device,
                                           self.workers, bool(self.fast.infer_channels_last))
        if self._test_loader is None:
            self._test_loader = make_test_loader(self.test, self.num_classes, self.norm, self.eval_batch_size,
                                                 self.device, self.workers, bool(self.fast.infer_channels_last),
                                                 self.side if self.space.variable else None)
        return self._test_loader

    @property
    def norm(self) -> Normalization:
        """The normalisation of every image of the run (pool, distilled, test)."""
        return self.space.norm

    @property
    def dataset(self) -> str | None:
        """The dataset the pool holds (cifar10, cifar100, tiny-imagenet) or None."""
        return self.space.manifest.dataset

    @property
    def coarse_min_chunk(self) -> int:
        """The fewest images a lazy coarse pass round predicts (all ranks together): an eval batch
        per rank on a GPU, which needs big batches to be busy; on a CPU CPU_MIN_CHUNK per rank."""
        per_rank = self.eval_batch_size if self.device.type == "cuda" else min(self.eval_batch_size, CPU_MIN_CHUNK)
        return per_rank * self.dist.world_size

    def pool_loader(self, indices: np.ndarray) -> EvalLoader:
        return EvalLoader(self.space, indices, self.eval_batch_size, self.device, self.workers,
                          channels_last=bool(self.fast.infer_channels_last))


def check_splits(pool: BetonFile, test: BetonFile) -> None:
    """The pool and the test set are the two splits of one dataset, from one build: the same classes
    (count and names), and, where the manifests record it, the same build digest (two builds into
    one folder, racing or from different sources, would otherwise mix datasets silently)."""
    pm, tm = pool.manifest, test.manifest
    if tm.num_classes != pm.num_classes:
        raise DataError(f"the pool has {pm.num_classes} classes but the test set {tm.num_classes}; use the two splits "
                        "of one dataset")
    if pm.build_digest and tm.build_digest and pm.build_digest != tm.build_digest:
        raise DataError(f"the pool {pool.path} and the test set {test.path} come from two different builds (their "
                        "manifests record different build digests: two builds wrote into one folder, or a split was "
                        "copied from another build); rebuild both with one `ccfs-fast build ... --overwrite`")
    differ = [c for c, (a, b) in enumerate(zip(pm.class_names, tm.class_names)) if a != b]
    if differ:
        c = differ[0]
        raise DataError(f"the pool and the test set name their classes differently ({len(differ)} of {pm.num_classes}, "
                        f"first class {c}: {pm.class_names[c]!r} / {tm.class_names[c]!r}); use the two splits of one "
                        "dataset")


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def first_per_class(labels: np.ndarray, count: int, class_names: tuple[str, ...], source: Path) -> np.ndarray:
    """Rows of the first `count` images of each class (rows are in sorted file order), class after
    class; a class with fewer images is an error naming it."""
    rows = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        if len(members) < count:
            raise DataError(distilled_shortage(source, name, c, len(members), count))
        rows.append(members[:count])
    return np.concatenate(rows).astype(np.int64)


def resolve_teacher_arch(requested: str | None, checkpoint: Checkpoint) -> str:
    """The teacher's architecture: --teacher-model, else the arch the checkpoint records (a torchvision
    weights file, `resnet18-f37072fd.pth`: torchvision's unmodified network of its name), else resnet18
    (the paper's teacher). A --teacher-model that contradicts the recorded arch is refused."""
    recorded = checkpoint.arch or checkpoint.torchvision_arch
    if requested is None:
        return recorded or DEFAULT_TEACHER
    if recorded is not None and canonical_model_name(recorded) != canonical_model_name(requested):
        raise ModelError(f"--teacher-model {requested} but the checkpoint {checkpoint.path} records arch "
                         f"{recorded!r}; drop --teacher-model (the recorded arch is used) or pass {recorded}")
    return requested


def load_teacher(name: str, checkpoint: Checkpoint, num_classes: int, side: int, device: torch.device) -> nn.Module:
    teacher = swap_cpu_kernels(load_state(create_model(name, num_classes, side), checkpoint, name)).to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def open_workspace(inputs: Inputs, cpc: int, machine: Machine | None = None, dist: DistContext | None = None,
                   fast: FastPath | None = None, check_overlap: bool = True) -> Workspace:
    """Opens and checks every input of a run (`inputs`: the files, the teacher's architecture, the
    normalisation, the train side and form; `cpc`: distilled images per class the run uses); `machine`
    holds this rank's device; `fast` a resolved FastPath (the teacher predicts in channels-last when
    infer_channels_last). `check_overlap` False skips the distilled-overlap check (a set meant to hold
    pool images)."""
    machine = machine or Machine()
    pool, test, distilled, teacher = inputs.pool, inputs.test, inputs.distilled, inputs.teacher
    workers, device = machine.workers, machine.device
    pool_file, test_file, distilled_file = BetonFile.open(pool), BetonFile.open(test), BetonFile.open(distilled)
    check_splits(pool_file, test_file)
    check_distinct(pool_file, test_file, distilled_file)
    checkpoint = read_checkpoint(teacher)
    arch = resolve_teacher_arch(inputs.teacher_model, checkpoint)
    pm = pool_file.manifest
    recorded = (Normalization.from_json(checkpoint.normalize, str(checkpoint.normalize.get("source", "teacher")))
                if checkpoint.normalize else None)
    norm = resolve_normalization(parse_normalize(inputs.normalize), pm.dataset, tuple(pm.mean), tuple(pm.std),
                                 str(pool_file.path), recorded, str(teacher))
    space = IndexSpace(pool_file, distilled_file, norm, inputs.train_side)
    rows = first_per_class(space.distilled_labels(workers), cpc, pm.class_names, distilled_file.path)
    # an exported set (eval --train-set) holds pool images by design: no overlap to warn of
    overlap = distilled_overlap(pool_file, distilled_file, rows, workers) if check_overlap else None
    dev = resolve_device(device)
    fast = fast or FastPath().resolve(str(dev))
    model = load_teacher(arch, checkpoint, pm.num_classes, space.side, dev)
    if fast.infer_channels_last:  # the teacher only predicts
        model = model.to(memory_format=torch.channels_last)
    # warnings about inputs once every input is accepted (never before an error about another one)
    for warning in (stem_warning(arch, space.side), overlap_warning(overlap, len(rows)) if overlap else None):
        if warning and (dist is None or dist.is_main):
            print(warning, file=sys.stderr)
    return Workspace(space, test_file, read_labels(pool_file, workers), rows + space.n_pool, model, dev, workers,
                     machine.eval_batch_size, dist or DistContext(), fast, arch, overlap, inputs.train_data,
                     teacher_test_acc=_recorded_acc(checkpoint.meta.get("test_acc")))


def _recorded_acc(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 100 else None
