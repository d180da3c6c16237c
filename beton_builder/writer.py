"""Writes an ImageTable to a .beton (fields image, label, index) plus its manifest, atomically."""
from __future__ import annotations

import errno
import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from ccfs_fast.digests import file_sha256, row_digest_path, row_digests
from ccfs_fast.errors import BuildError
from ccfs_fast.outputs import atomic_file, output_error, remove_stale_temps, write_npz, write_text
from ccfs_fast.processes import run_isolated

from . import BUILDER_VERSION
from .ffcv_import import DatasetWriter, IntField, RGBImageField
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
    """Refuses an existing output (its .beton or manifest) unless `overwrite`; the folder must exist
    and take files."""
    existing = [p for p in (out, manifest_path(out)) if p.exists()]
    if existing and not overwrite:
        raise BuildError(f"{existing[0]} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise BuildError(f"{out.parent}: output folder does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise BuildError(f"{out.parent}: output folder is not writable; choose a writable place")


def _write_ffcv(tmp: str, table: ImageTable, workers: int) -> None:
    writer = DatasetWriter(tmp, {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()},
                           num_workers=max(1, workers))
    writer.from_indexed_dataset(_Rows(table), chunksize=1000)


def table_manifest(table: ImageTable) -> Manifest:
    """The manifest of a table, before its .beton exists (no size or digest yet)."""
    mean, std = channel_stats(table.images)
    return Manifest(n=len(table.labels), num_classes=len(table.class_names), class_names=table.class_names,
                    side=table.side, source_kind=table.source_kind, source_path=table.source_path, mean=mean,
                    std=std, content_hash=content_hash(table), builder_version=BUILDER_VERSION, dataset=table.dataset,
                    class_counts=tuple(int(v) for v in np.bincount(table.labels, minlength=len(table.class_names))))


def write_beton(table: ImageTable, out: str | Path, overwrite: bool = False, workers: int = 2) -> Manifest:
    """Writes `table` to `out` (.beton), `out`.json (the manifest) and `out`.rows.npz (each row's
    pixel digest, for the distilled-set overlap check). The .beton is written to a temp file by FFCV
    in a child process group (an interrupt kills it with its workers) and renamed at the end; the
    manifest records the file's size and digest, so a .beton and a manifest of different builds never
    pass as a pair. A failure leaves no temp file and keeps any earlier output intact."""
    out = Path(out)
    check_writable(out, overwrite)
    for stale in remove_stale_temps(out.parent):
        print(f"removed {stale}, left by an interrupted build", file=sys.stderr)
    manifest = table_manifest(table)
    with atomic_file(out) as tmp:
        failure = run_isolated(_write_ffcv, str(tmp), table, workers)
        if failure is not None:
            name, err, message = failure
            if err in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise output_error(out, OSError(err, os.strerror(err)))
            raise BuildError(f"writing {out} failed ({name}: {' '.join(message.split())[:200]})")
        manifest = replace(manifest, beton_size=tmp.stat().st_size, beton_sha256=file_sha256(tmp))
    write_npz(row_digest_path(out), digests=row_digests(table.images), beton_sha256=np.array(manifest.beton_sha256))
    write_text(manifest_path(out), manifest.to_json())
    return manifest
