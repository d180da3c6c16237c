"""What the streamed JPEG writer (jpeg_writer) reads from: images in canonical order, one chunk at a
time, as file paths (an image folder, ImageNet's tree: imagenet.FileList) or as encoded bytes (Hub
parquet shards: parquet.ParquetImages), never the whole set in memory."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np


class ImageSource(Protocol):
    """Rows in canonical order. `names`: one per row, recorded in the `.files.npz` sidecar and used in
    messages; `labels` int64 [n]; `class_names` in label order; `stamps` int64 [k, 2] or None: what,
    beside names and labels, says the source changed (file sizes and modification times)."""

    root: Path
    names: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source_kind: str
    stamps: np.ndarray | None

    @property
    def n(self) -> int: ...

    def chunks(self, start: int, size: int) -> Iterator[tuple[int, list[str | bytes]]]:
        """(first row, [a file path or the encoded bytes per row]) of `size` rows at a time from `start`."""
        ...


class EncodedImages:
    """Images already encoded (JPEG or PNG bytes) and held in memory, as an ImageSource: what an export
    of a run's set writes (its JPEG images' stored bytes kept as they are)."""

    source_kind = "ccfs-export"
    stamps = None

    def __init__(self, root: Path, names: list[str], labels: np.ndarray, class_names: tuple[str, ...],
                 encoded: list[bytes]):
        self.root, self.names, self.labels, self.class_names, self.encoded = root, names, labels, class_names, encoded

    @property
    def n(self) -> int:
        return len(self.encoded)

    def chunks(self, start: int, size: int) -> Iterator[tuple[int, list[str | bytes]]]:
        for first in range(start, self.n, size):
            yield first, list(self.encoded[first:first + size])
