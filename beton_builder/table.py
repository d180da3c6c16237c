"""The in-memory result of every reader: decoded images in canonical order."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from beton_builder.base.errors import BuildError
from beton_builder.labels import check_labels


@dataclass(frozen=True)
class ImageTable:
    """Decoded images, shapes: images uint8 [n, side, side, 3], labels int64 [n] in [0, C).

    Row i is canonical index i; nothing downstream reorders rows.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source_kind: str
    source_path: str
    dataset: str | None = None  # the dataset the paper's code knows it as (cifar10, ...); None otherwise

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0:
            raise BuildError(f"{self.source_path}: no images found; expected at least one image")
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise BuildError(f"{self.source_path}: images must be uint8 [n, h, w, 3], "
                             f"got {self.images.dtype} {list(self.images.shape)}")
        if self.images.shape[1] != self.images.shape[2]:
            raise BuildError(f"{self.source_path}: images must be square, got "
                             f"{self.images.shape[1]}x{self.images.shape[2]}; pass --side S to resize")
        if self.labels.shape != (n,):
            raise BuildError(f"{self.source_path}: {len(self.labels)} labels for {n} images")
        check_labels(self.labels, len(self.class_names), self.source_path)

    @property
    def side(self) -> int:
        return int(self.images.shape[1])
