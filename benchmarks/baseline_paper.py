"""The paper's implementation approach, re-implemented as the baseline for ccfs-fast.

What it keeps from the CCFS reference code: the whole pool decoded once, image by image, through
PIL -> ToTensor -> Normalize into one float32 tensor; distilled images read from a PNG image folder
(first cpc files per class) with PIL transforms; selected images in a TensorDataset with per-sample
torchvision RandomResizedCrop + flip; both concatenated and fed through a torch DataLoader whose
workers start every epoch; the whole pool evaluated by the filter every curriculum (batches of 256);
selection with Python sets and per-class `sorted`. Models, KD loss, optimiser, schedule, batch-size
policy and the selection rule (ties by index) are ccfs-fast's own, so only the implementation differs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import datasets, transforms

from ccfs_fast.data.datasets import auto_batch_size
from ccfs_fast.train.loop import evaluate_students, train_students
from ccfs_fast.train.models import create_model, load_checkpoint
from ccfs_fast.train.recipe import TrainRecipe
from ccfs_fast.train.step import LoaderStep, Single, StepConfig

from .paper_selection import reference_select


class ArrayImages(Dataset):
    """torchvision's CIFAR10 dataset shape: uint8 HWC arrays, PIL image per sample, a transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class SelectedTensors(Dataset):
    """The paper's utils.TensorDataset: normalised float images, a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


class FirstPerClass(datasets.ImageFolder):
    """The paper's ImageFolderIPC: the first `ipc` files of each class folder."""

    def __init__(self, root: str, ipc: int, transform):
        super().__init__(root, transform=transform)
        keep, seen = [], {}
        for path, label in self.samples:
            if seen.get(label, 0) < ipc:
                keep.append((path, label))
                seen[label] = seen.get(label, 0) + 1
        self.samples = self.imgs = keep
        self.targets = [label for _, label in keep]


class _WithIndex:
    """Adapts (image, label) batches to the (image, label, index) triples the engine's evaluation reads."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for images, labels in self.loader:
            yield images, labels, None

    def __len__(self) -> int:
        return len(self.loader)


def train_kd(model: torch.nn.Module, teacher: torch.nn.Module, loader, recipe: TrainRecipe, temperature: float) -> None:
    """KD training on the paper's input path (a DataLoader of per-sample transforms, on the CPU), through
    the engine's one step and one loop (LoaderStep, train_students): only the input path differs from
    ccfs-fast's own trainings."""
    students = Single(model)
    cfg = StepConfig(recipe, temperature, fused_optimizer=False)
    step = LoaderStep(students, students, teacher.eval(), loader, torch.device("cpu"), torch.Generator(), cfg)
    train_students(step, [0], loader.batch_size, recipe)


def evaluate(model: torch.nn.Module, loader) -> float:
    """Test top-1 (%) of one model over a DataLoader of (image, label) batches (the engine's evaluation)."""
    return evaluate_students(Single(model), _WithIndex(loader))[0]


@dataclass
class BaselineRun:
    pool_images: np.ndarray
    pool_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    distilled_folder: Path
    teacher_path: Path
    model: str
    cpc: int
    mean: tuple
    std: tuple
    recipe: TrainRecipe
    temperature: float
    workers: int
    scores: np.ndarray

    def setup(self) -> float:
        """Decodes the pool image by image into one float32 tensor (the paper's images_og)."""
        start = time.perf_counter()
        import torch._dynamo  # noqa: F401  (torch.optim's first-use import, charged to setup as ccfs-fast's warm-up does)

        side = self.pool_images.shape[1]
        self.num_classes = int(self.pool_labels.max()) + 1
        to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])
        self.images_og = torch.cat([to_tensor(Image.fromarray(img)).unsqueeze(0) for img in self.pool_images])
        self.labels_og = torch.from_numpy(self.pool_labels).long()
        self.train_aug = transforms.Compose([transforms.RandomResizedCrop(side, antialias=True),
                                             transforms.RandomHorizontalFlip()])
        self.distilled = FirstPerClass(str(self.distilled_folder), self.cpc, transforms.Compose(
            [*self.train_aug.transforms, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]))
        self.test_loader = DataLoader(ArrayImages(self.test_images, self.test_labels, to_tensor), batch_size=512,
                                      num_workers=self.workers)
        self.teacher = load_checkpoint(create_model(self.model, self.num_classes, side), self.teacher_path,
                                       self.model).eval()
        return time.perf_counter() - start

    @torch.inference_mode()
    def coarse_filtering(self, model: torch.nn.Module, batch_size: int = 256) -> torch.Tensor:
        """argmax of `model` over the whole float pool, in batches (the paper's coarse_filtering)."""
        model.eval()
        return torch.cat([model(self.images_og[i:i + batch_size]).argmax(1)
                          for i in range(0, len(self.images_og), batch_size)])

    def teacher_pass(self) -> list[int]:
        pred = self.coarse_filtering(self.teacher)
        return torch.where(pred == self.labels_og)[0].tolist()

    def phase(self, curpc: int, selected: list[int], teacher_correct: list[int], seed: int) -> dict:
        """One curriculum: train a filter on distilled ∪ selected, evaluate the whole pool, select."""
        side = self.pool_images.shape[1]
        start = time.perf_counter()
        chosen = SelectedTensors(self.images_og[selected], self.labels_og[selected], self.train_aug)
        train_set = ConcatDataset([self.distilled, chosen]) if selected else self.distilled
        batch_size = self.recipe.batch_size or auto_batch_size(len(train_set), self.num_classes)
        torch.manual_seed(seed)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available())
        model = create_model(self.model, self.num_classes, side)
        train_kd(model, self.teacher, loader, self.recipe, self.temperature)
        acc = evaluate(model, self.test_loader)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        pred = self.coarse_filtering(model).numpy()
        eval_s = time.perf_counter() - start
        start = time.perf_counter()
        selection = reference_select(teacher_correct, selected, pred, self.pool_labels, self.num_classes, self.scores,
                                     "forgetting", "simple", curpc, True, "short")
        select_s = time.perf_counter() - start
        return {"train_s": train_s, "eval_s": eval_s, "select_s": select_s, "pool_evaluated": len(pred),
                "filter_acc": acc, "selection": selection, "train_size": len(train_set)}
