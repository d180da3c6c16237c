"""Writes an ImageTable to a .beton (fields image, label, index) plus its manifest, atomically."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter

from ccfs_fast.errors import BuildError
from ccfs_fast.outputs import write_text

from . import BUILDER_VERSION
from .manifest import Manifest, manifest_path
from .table import ImageTable


class _Rows:
    """The indexable dataset FFCV's writer workers read (forked: the arrays are shared)."""

    def __init__(self, table: ImageTable):
        self.images, self.labels = table.images, table.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return self.images[i], int(self.labels[i]), int(i)


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 [n, h, w, 3] images, in [0, 1] units (float64 sums)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, 3).astype(np.float64)
        total += block.sum(0)
        total_sq += (block * block).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0)


def content_hash(table: ImageTable) -> str:
    """sha256 over shape, labels and pixels in canonical order: equal content, equal hash."""
    digest = hashlib.sha256()
    digest.update(str(table.images.shape).encode())
    digest.update(np.ascontiguousarray(table.labels, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(table.images).data)
    return digest.hexdigest()


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuses an existing output (its .beton or manifest) unless `overwrite`."""
    existing = [p for p in (out, manifest_path(out)) if p.exists()]
    if existing and not overwrite:
        raise BuildError(f"{existing[0]} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise BuildError(f"{out.parent}: output folder does not exist; create it first")


def write_beton(table: ImageTable, out: str | Path, overwrite: bool = False, workers: int = 2) -> Manifest:
    """Writes `table` to `out` (.beton) and `out`.json. Both are written to temporary files and
    renamed at the end, so a failure leaves no partial file and keeps any earlier output intact."""
    out = Path(out)
    check_writable(out, overwrite)
    mean, std = channel_stats(table.images)
    manifest = Manifest(
        n=len(table.labels), num_classes=len(table.class_names), class_names=table.class_names,
        side=table.side, source_kind=table.source_kind, source_path=table.source_path,
        mean=mean, std=std, content_hash=content_hash(table), builder_version=BUILDER_VERSION,
        dataset=table.dataset)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = DatasetWriter(str(tmp), {"image": RGBImageField(write_mode="raw"), "label": IntField(),
                                          "index": IntField()}, num_workers=max(1, workers))
        writer.from_indexed_dataset(_Rows(table), chunksize=1000)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    write_text(manifest_path(out), manifest.to_json())
    return manifest
