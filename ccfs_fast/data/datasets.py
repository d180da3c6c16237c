"""What the paper's code fixes per dataset (docs/design.md §1.0): normalisation constants and the batch-size
"auto" rule. One registry, keyed by the dataset name a .beton's manifest records; data without an
entry (an image folder, arrays) uses the pool's measured statistics and the CIFAR-10 rule."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Stats = tuple[float, float, float]

# The paper's constants. CIFAR-100 uses CIFAR-10's: its published teachers were trained with them.
CIFAR_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR_STD: Stats = (0.2023, 0.1994, 0.2010)
TINY_MEAN: Stats = (0.4802, 0.4481, 0.3975)
TINY_STD: Stats = (0.2302, 0.2265, 0.2262)
# ImageNet-1K: torchvision's constants (every torchvision ImageNet weights file expects them).
IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)


def per_class_thresholds(small: int, medium: int) -> Callable[[int, int], int]:
    """|T| < small*C -> 32, < medium*C -> 64, else 128 (T: the train set, C: classes)."""
    def rule(train_size: int, num_classes: int) -> int:
        if train_size < small * num_classes:
            return 32
        return 64 if train_size < medium * num_classes else 128
    return rule


def fixed_batch(size: int) -> Callable[[int, int], int]:
    return lambda train_size, num_classes: size


@dataclass(frozen=True)
class DatasetFacts:
    """name; the paper's mean/std (None: use the pool's measured statistics); the batch-size
    'auto' rule (train_size, num_classes) -> batch size and its description."""

    name: str
    mean: Stats | None
    std: Stats | None
    auto_batch: Callable[[int, int], int]
    auto_batch_rule: str


DATASETS: dict[str, DatasetFacts] = {
    "cifar10": DatasetFacts("cifar10", CIFAR_MEAN, CIFAR_STD, per_class_thresholds(500, 1000),
                            "|T| < 500 C -> 32, < 1000 C -> 64, else 128"),
    "cifar100": DatasetFacts("cifar100", CIFAR_MEAN, CIFAR_STD, per_class_thresholds(50, 100),
                             "|T| < 50 C -> 32, < 100 C -> 64, else 128"),
    "tiny-imagenet": DatasetFacts("tiny-imagenet", TINY_MEAN, TINY_STD, fixed_batch(64), "64 (the scripts' -b 64)"),
    # not in the paper: its Tiny-ImageNet rule (batch 64) carried over, with torchvision's constants
    "imagenet": DatasetFacts("imagenet", IMAGENET_MEAN, IMAGENET_STD, fixed_batch(64),
                             "64 (the Tiny-ImageNet scripts' -b 64, extrapolated)"),
}

OTHER_DATA = DatasetFacts("other", None, None, per_class_thresholds(500, 1000),
                          "|T| < 500 C -> 32, < 1000 C -> 64, else 128")


def dataset_facts(name: str | None) -> DatasetFacts:
    """The registry entry of `name`; data the paper's code does not know (None, 'folder', ...)
    gets OTHER_DATA."""
    return DATASETS.get(name or "", OTHER_DATA)


def auto_batch_size(train_size: int, num_classes: int, dataset: str | None = None) -> int:
    """The paper's batch size 'auto' for a train set of `train_size` images of `dataset`."""
    return dataset_facts(dataset).auto_batch(train_size, num_classes)
