"""Writes an ImageTable to a .beton (fields image, label, index) plus its manifest, atomically."""
from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

import numpy as np

from beton_builder import BUILDER_VERSION
from beton_builder.base.digests import file_sha256, row_digest_path, row_digests
from beton_builder.base.errors import BuildError, one_line
from beton_builder.base.files import atomic_file, output_error, remove_stale_temps, write_npz, write_text
from beton_builder.base.processes import run_isolated
from beton_builder.ffcv_import import DatasetWriter, IntField, RGBImageField
from beton_builder.manifest import Manifest, manifest_path
from beton_builder.table import ImageTable


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


class WorkerDied(Exception):
    """A writing worker of FFCV's DatasetWriter ended abnormally (raised by the watchdog's signal)."""


def _write_ffcv(tmp: str, table: ImageTable, workers: int) -> None:
    """FFCV's DatasetWriter, run in the isolated child (processes.run_isolated), with a watchdog: FFCV's
    main loop waits for its workers' progress forever, so a worker that dies (a full disk, out of
    memory, a signal) would hang the build and leak FFCV's /dev/shm segment. Each worker's exception
    is reported (one line, its errno kept), the others are killed, the segment is unlinked, and the
    build fails within a fraction of a second."""
    import ffcv.writer as ffcv_writer

    failures = multiprocessing.get_context("fork").SimpleQueue()
    job = ffcv_writer.worker_job_indexed_dataset

    def guarded_job(*args: object) -> None:  # runs in each forked worker
        try:
            job(*args)
        except BaseException as exc:
            failures.put((type(exc).__name__, getattr(exc, "errno", None), one_line(exc, 200)))
            os._exit(1)

    def died(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        raise WorkerDied

    def stopped(signum: int, frame: object) -> None:  # noqa: ARG001 - the parent was interrupted: clean up, then go
        raise SystemExit(128 + signum)

    ffcv_writer.worker_job_indexed_dataset = guarded_job  # the writer looks it up when it starts its workers
    signal.signal(signal.SIGUSR1, died)
    signal.signal(signal.SIGTERM, stopped)
    writer = DatasetWriter(tmp, {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()},
                           num_workers=max(1, workers))
    stop = threading.Event()
    threading.Thread(target=_watch_workers, args=(stop,), daemon=True).start()
    try:
        writer.from_indexed_dataset(_Rows(table), chunksize=1000)
    except WorkerDied:
        _end_workers(writer)
        name, err, message = failures.get() if not failures.empty() else _death()
        raise OSError(err, message) if err else BuildError(f"a writing worker failed ({name}: {message})") from None
    except BaseException:
        _end_workers(writer)
        raise
    finally:
        stop.set()


def _watch_workers(stop: threading.Event) -> None:
    """Signals the main thread (SIGUSR1) when a child process ends with a non-zero exit code."""
    while not stop.wait(0.1):
        if any(p.exitcode not in (None, 0) for p in list(multiprocessing.process._children)):
            os.kill(os.getpid(), signal.SIGUSR1)
            return


def _death() -> tuple[str, int | None, str]:
    """What ended a worker that reported nothing itself: the signal that killed it."""
    codes = [p.exitcode for p in list(multiprocessing.process._children) if p.exitcode not in (None, 0)]
    code = codes[0] if codes else None
    if code is not None and code < 0:
        return "WorkerDied", None, f"killed by signal {signal.Signals(-code).name} (out of memory, or killed)"
    return "WorkerDied", None, f"exit code {code}"


def _end_workers(writer: DatasetWriter) -> None:
    """Kills the writer's other workers (they wait for their turn forever) and unlinks its /dev/shm segment."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)
    segment = getattr(writer, "metadata_sm", None)
    if segment is not None and not isinstance(segment, int):
        with suppress(OSError):
            segment.close()
            segment.unlink()


def table_manifest(table: ImageTable) -> Manifest:
    """The manifest of a table, before its .beton exists (no size or digest yet)."""
    mean, std = channel_stats(table.images)
    return Manifest(n=len(table.labels), num_classes=len(table.class_names), class_names=table.class_names,
                    side=table.side, source_kind=table.source_kind, source_path=table.source_path, mean=mean,
                    std=std, content_hash=content_hash(table), builder_version=BUILDER_VERSION, dataset=table.dataset,
                    class_counts=tuple(int(v) for v in np.bincount(table.labels, minlength=len(table.class_names))))


def write_beton(table: ImageTable, out: str | Path, overwrite: bool = False, workers: int = 2,
                build_digest: str | None = None) -> Manifest:
    """Writes `table` to `out` (.beton), `out`.json (the manifest) and `out`.rows.npz (each row's
    pixel digest, for the distilled-set overlap check); `build_digest` (one for every split of a
    build) goes into the manifest. The .beton is written to a temp file by FFCV in a child process
    group (an interrupt kills it with its workers; a writing worker that dies fails it at once) and
    renamed into place last, after its sidecars and manifest: a .beton never stands without the
    manifest that records its size and digest. A failure leaves no temp file and keeps any earlier
    output intact."""
    out = Path(out)
    check_writable(out, overwrite)
    for stale in remove_stale_temps(out.parent):
        print(f"removed {stale}, left by an interrupted build", file=sys.stderr)
    manifest = replace(table_manifest(table), build_digest=build_digest)
    with atomic_file(out) as tmp:
        failure = run_isolated(_write_ffcv, str(tmp), table, workers)
        if failure is not None:
            name, err, message = failure
            if err in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise output_error(out, OSError(err, os.strerror(err)))
            raise BuildError(f"writing {out} failed ({name}: {' '.join(message.split())[:200]})")
        manifest = replace(manifest, beton_size=tmp.stat().st_size, beton_sha256=file_sha256(tmp))
        write_npz(row_digest_path(out), digests=row_digests(table.images),
                  beton_sha256=np.array(manifest.beton_sha256))
        write_text(manifest_path(out), manifest.to_json())
    return manifest
