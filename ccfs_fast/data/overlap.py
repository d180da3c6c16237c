"""Inputs that are each other: a distilled (or test) .beton that is the pool itself is refused, and
distilled images whose pixels equal pool images are counted (they could be selected again and train
twice). Pixel digests come from the `<file>.rows.npz` sidecar `build` writes (computed by reading
the file when the sidecar is missing, stale or damaged)."""
from __future__ import annotations

import sys
import zipfile

import numpy as np

from beton_builder.base.digests import row_digest_path, row_digests
from beton_builder.base.errors import DataError
from beton_builder.beton import BetonFile
from ccfs_fast.data.readers import iterate_rows

SHOWN = 20  # pool indices listed in the warning and metrics.json


def check_distinct(pool: BetonFile, test: BetonFile, distilled: BetonFile) -> None:
    """The test and distilled sets must not be the pool: the same content hash (identical images
    and labels in the same order) is refused, naming both files."""
    for flag, other in (("--distilled", distilled), ("--test", test)):
        if other.manifest.content_hash == pool.manifest.content_hash:
            raise DataError(f"{flag} {other.path} holds exactly the pool's images ({pool.path}: same content digest "
                            f"{pool.manifest.content_hash[:12]}...); pass the {flag[2:]} set's own .beton "
                            f"(`ccfs-fast build ...`)")


def beton_row_digests(beton: BetonFile, workers: int = 2) -> np.ndarray:
    """uint64 [n]: each row's pixel digest, from the file's sidecar when it belongs to this very file,
    else computed by reading every row (a damaged sidecar is reported in one line)."""
    path = row_digest_path(beton.path)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                digests, made_for = stored["digests"], str(stored["beton_sha256"])
            if digests.shape == (beton.n,) and digests.dtype == np.uint64 and made_for == beton.digest():
                return digests
            why = "made for another build of the file"
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            why = f"unreadable: {type(exc).__name__}"
        print(f"warning: {path} is not usable ({why}); reading {beton.path} to check the distilled images instead",
              file=sys.stderr)
    parts = [row_digests(batch.numpy()) for batch, _, _ in iterate_rows(beton, np.arange(beton.n), 4096, workers)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def distilled_overlap(pool: BetonFile, distilled: BetonFile, rows: np.ndarray, workers: int = 2) -> dict:
    """Which of the distilled images a run uses (`rows`, local rows of `distilled`) have the exact
    pixels of a pool image. Returns {"images": count, "distilled_rows": [...], "pool_indices": [...]}
    (at most SHOWN of each listed, in distilled row order)."""
    used = beton_row_digests(distilled, workers)[np.asarray(rows, np.int64)]
    pool_digests = beton_row_digests(pool, workers)
    hit = np.isin(used, pool_digests)
    order = np.argsort(pool_digests, kind="stable")
    first = order[np.searchsorted(pool_digests[order], used[hit])]
    return {"images": int(hit.sum()), "distilled_rows": np.asarray(rows)[hit][:SHOWN].tolist(),
            "pool_indices": first[:SHOWN].tolist()}


def overlap_warning(overlap: dict, used: int) -> str | None:
    """One line about distilled images that are pool images, or None when there are none."""
    count = overlap["images"]
    if not count:
        return None
    more = ", ..." if count > len(overlap["pool_indices"]) else ""
    return (f"warning: {count} of the {used} distilled images this run uses are pixel-identical to pool images "
            f"(pool indices {', '.join(map(str, overlap['pool_indices']))}{more}); the curricula can select them "
            "again, so they would train twice: build the distilled set from distilled images only")
