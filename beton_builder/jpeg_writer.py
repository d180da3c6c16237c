"""Streams a list of image files into a JPEG-compressed .beton, in parallel and resumably.

For datasets too large to decode into memory (ImageNet-1K: 1.28 M images of varying size). Worker
processes decode chunks of files (PIL, converted to RGB: CMYK and grayscale JPEGs included), shrink
any image whose longer side exceeds `max_side` (FFCV's `resizer`: cv2 INTER_AREA) and JPEG-encode it
at `quality` (FFCV's `encode_jpeg`), exactly as FFCV's `RGBImageField(write_mode="jpg")` stores an
image. The main process appends the encoded images, in canonical order, to `<out>.partial` in the
.beton layout FFCV's Reader reads (header, field descriptors, metadata, pages of `PAGE_SIZE` bytes
that no image straddles, allocation table), so FFCV's decoders read it unchanged.

Resuming: every CHECKPOINT_S seconds the rows whose bytes lie in complete pages are recorded in
`<out>.partial.npz`; a build interrupted in any way (Ctrl-C, kill -9, a full disk) restarts from
there: the partial file is cut back to the recorded length and the next row is encoded. The record
holds a key of the file list and settings, so a changed source or setting starts afresh. One build
at a time may write an output (an exclusive lock on the partial file).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import sys
import time
import zipfile
from contextlib import suppress
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from beton_builder import BUILDER_VERSION
from beton_builder.base.digests import file_sha256, row_digest_path
from beton_builder.base.errors import BuildError
from beton_builder.base.files import output_error, write_npz, write_text
from beton_builder.base.processes import available_cpus, bounded_imap, die_with_parent
from beton_builder.ffcv_import import (
    ALLOC_TABLE_TYPE,
    CURRENT_VERSION,
    TYPE_ID_HANDLER,
    FieldDescType,
    HeaderType,
    IntField,
    RGBImageField,
    encode_jpeg,
    get_metadata_type,
    resizer,
)
from beton_builder.manifest import Manifest, files_path, manifest_path
from beton_builder.sources import ImageSource

PAGE_SIZE = 1 << 23  # FFCV DatasetWriter's default (4 x 2 MiB)
CHUNK = 64  # images per worker task
CHECKPOINT_S = 30.0
FIELDS = {"image": RGBImageField(write_mode="jpg"), "label": IntField(), "index": IntField()}
METADATA_TYPE = get_metadata_type(list(FIELDS.values()))
JPG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]
JPEG_START = b"\xff\xd8"  # every JPEG file starts with the SOI marker


@dataclass(frozen=True)
class JpegSettings:
    """How images are stored: longer side at most `max_side` pixels, JPEG `quality` (1-100)."""

    max_side: int = 500
    quality: int = 90
    keep_jpeg: bool = False  # a source already JPEG and within max_side is stored as it is (no re-encoding)

    def __post_init__(self) -> None:
        if not 8 <= self.max_side <= 65535:
            raise BuildError(f"--max-side must be between 8 and 65535 pixels, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise BuildError(f"--jpeg-quality must be between 1 and 100, got {self.quality}")


def _encode(job: tuple[int, list[str | bytes], list[str], JpegSettings]
            ) -> tuple[int, list, np.ndarray, np.ndarray, np.ndarray] | str:
    """Encodes one chunk of images (file paths or encoded bytes; `names` say which in errors): (start,
    [jpeg bytes], sizes int [k, 2] (h, w), digests uint64 [k], pixel sums float64 [k, 6] (per-channel
    sum, sum of squares, 0..255 units)); a message on a bad image."""
    start, sources, names, settings = job
    encoded, sizes = [], np.zeros((len(sources), 2), np.int64)
    digests, sums = np.zeros(len(sources), np.uint64), np.zeros((len(sources), 6))
    for k, source in enumerate(sources):
        try:
            with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, zipfile.BadZipFile) as exc:
            return f"{names[k]}: cannot decode image ({exc}); replace or remove it"
        keep = (settings.keep_jpeg and isinstance(source, bytes) and source[:2] == JPEG_START
                and max(pixels.shape[:2]) <= settings.max_side)
        pixels = np.ascontiguousarray(resizer(pixels, settings.max_side))
        encoded.append(source if keep else encode_jpeg(pixels, settings.quality).tobytes())
        sizes[k] = pixels.shape[:2]
        digests[k] = int.from_bytes(hashlib.blake2b(pixels.data, digest_size=8).digest(), "little")
        flat = pixels.reshape(-1, 3).astype(np.float64)
        sums[k, :3], sums[k, 3:] = flat.sum(0), (flat * flat).sum(0)
    return start, encoded, sizes, digests, sums


def _header_bytes(n: int, page_size: int) -> tuple[bytes, int, int]:
    """(header + field descriptors, metadata offset, first data page offset) for n rows."""
    header = np.zeros(1, dtype=HeaderType)[0]
    header["version"], header["num_fields"], header["page_size"], header["num_samples"] = \
        CURRENT_VERSION, len(FIELDS), page_size, n
    descriptors = np.zeros(len(FIELDS), dtype=FieldDescType)
    type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
    for i, (name, field) in enumerate(FIELDS.items()):
        descriptors[i]["type_id"] = type_ids[type(field)]
        descriptors[i]["name"][:len(name)] = np.frombuffer(name.encode("ascii"), "<u1")
        descriptors[i]["arguments"][:] = field.to_binary()[0]
    head = header.tobytes() + descriptors.tobytes()
    data_start = -(-(len(head) + n * METADATA_TYPE.itemsize) // page_size) * page_size
    return head, len(head), data_start


def source_key(files: ImageSource, settings: JpegSettings, page_size: int = PAGE_SIZE) -> str:
    """A digest of what a build writes from: the file names, labels, each file's size and mtime, the
    settings. An unfinished build resumes, and a finished one is kept, only for the same key."""
    digest = hashlib.sha256(f"{BUILDER_VERSION} {settings} {page_size}".encode())
    digest.update("\n".join(files.names).encode())
    digest.update(np.ascontiguousarray(files.labels, "<i8").tobytes())
    if files.stamps is not None:
        digest.update(np.ascontiguousarray(files.stamps, "<i8").tobytes())
    return digest.hexdigest()


class _Rows:
    """Per-row results of the build so far (image sizes, byte offsets and lengths, digests, pixel
    sums), checkpointed together."""

    COLUMNS = ("heights", "widths", "ptrs", "nbytes", "digests", "sums")

    def __init__(self, files: ImageSource):
        n = files.n
        self.labels = files.labels
        self.heights, self.widths = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
        self.ptrs, self.nbytes, self.digests = np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, np.uint64)
        self.sums = np.zeros((n, 6))

    def metadata(self) -> np.ndarray:
        """The .beton's metadata table: per row (image mode, width, height, data_ptr), label, index."""
        meta = np.zeros(len(self.labels), METADATA_TYPE)
        image = meta["f0"]
        image["mode"], image["width"], image["height"], image["data_ptr"] = JPG_MODE, self.widths, self.heights, \
            self.ptrs
        meta["f0"], meta["f1"], meta["f2"] = image, self.labels, np.arange(len(self.labels))
        return meta

    def save(self, path: Path, key: str, rows: int, length: int) -> None:
        write_npz(path, key=np.array(key), rows=np.array(rows), length=np.array(length),
                  **{name: getattr(self, name)[:rows] for name in self.COLUMNS})

    def restore(self, path: Path, key: str) -> tuple[int, int]:
        """(rows, file length) of a usable checkpoint at `path`, (0, 0) otherwise."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["key"]) != key:
                    return 0, 0
                rows, length = int(saved["rows"]), int(saved["length"])
                for name in self.COLUMNS:
                    getattr(self, name)[:rows] = saved[name]
                return rows, length
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return 0, 0


def _jobs(files: ImageSource, start: int, settings: JpegSettings):
    for first, sources in files.chunks(start, CHUNK):
        names = files.names[first:first + len(sources)]
        yield first, sources, names, settings


def _append(fh, rows: _Rows, results, first: int, data_start: int, n: int, on_checkpoint, desc: str,
            page_size: int, checkpoint_s: float) -> int:
    """Writes encoded chunks into whole pages from `first` on; returns the data end offset."""
    page, used, page_offset = bytearray(page_size), 0, fh.tell()
    page_rows = first  # the first row whose bytes sit in the unwritten page
    last_checkpoint = time.monotonic()
    with tqdm(total=n, initial=first, desc=desc, unit="img", smoothing=0.05) as bar:
        for result in results:
            if isinstance(result, str):
                raise BuildError(result)
            start, encoded, sizes, digests, sums = result
            stop = start + len(encoded)  # the chunk's columns first: a checkpoint below may cover part of it
            rows.heights[start:stop], rows.widths[start:stop] = sizes[:, 0], sizes[:, 1]
            rows.digests[start:stop], rows.sums[start:stop] = digests, sums
            for k, blob in enumerate(encoded):
                row = start + k
                if len(blob) > page_size:
                    raise BuildError(f"row {row}: a {len(blob)}-byte JPEG exceeds the {page_size}-byte page; lower "
                                     "--max-side or --jpeg-quality")
                if used + len(blob) > page_size:
                    fh.write(page)
                    page_offset, used, page_rows = page_offset + page_size, 0, row
                    page[:] = bytes(page_size)
                    if time.monotonic() - last_checkpoint >= checkpoint_s:
                        fh.flush()
                        os.fsync(fh.fileno())
                        on_checkpoint(page_rows, page_offset)
                        last_checkpoint = time.monotonic()
                page[used:used + len(blob)] = blob
                rows.ptrs[row], rows.nbytes[row] = page_offset + used, len(blob)
                used += len(blob)
            bar.update(len(encoded))
    if used or page_offset == data_start:
        fh.write(page)  # the last page whole, as FFCV writes it (its readers fetch whole pages)
        page_offset += page_size
    return page_offset


def _finish(fh, rows: _Rows, head: bytes, meta_start: int, n: int) -> None:
    alloc = np.zeros(n, ALLOC_TABLE_TYPE)
    alloc["sample_id"], alloc["ptr"], alloc["size"] = np.arange(n), rows.ptrs, rows.nbytes
    table_at = fh.seek(0, os.SEEK_END)
    fh.write(alloc.tobytes())
    header = np.frombuffer(head[:HeaderType.itemsize], HeaderType).copy()
    header[0]["alloc_table_ptr"] = table_at
    fh.seek(0)
    fh.write(header.tobytes() + head[HeaderType.itemsize:])
    fh.seek(meta_start)
    fh.write(rows.metadata().tobytes())
    fh.flush()
    os.fsync(fh.fileno())


def _manifest(files: ImageSource, rows: _Rows, settings: JpegSettings, dataset: str | None) -> Manifest:
    pixels = float((rows.heights.astype(np.float64) * rows.widths).sum())
    mean = rows.sums[:, :3].sum(0) / pixels
    std = np.sqrt(np.maximum(rows.sums[:, 3:].sum(0) / pixels - mean * mean, 0.0))
    digest = hashlib.sha256(f"jpeg {settings}".encode())
    digest.update(np.ascontiguousarray(files.labels, "<i8").tobytes())
    digest.update(rows.digests.tobytes())
    classes = len(files.class_names)
    return Manifest(n=files.n, num_classes=classes, class_names=files.class_names, side=settings.max_side,
                    source_kind=files.source_kind, source_path=str(files.root),
                    mean=tuple(float(v) for v in mean / 255), std=tuple(float(v) for v in std / 255),
                    content_hash=digest.hexdigest(), builder_version=BUILDER_VERSION, image_storage="jpeg",
                    dataset=dataset, class_counts=tuple(int(v) for v in np.bincount(files.labels, minlength=classes)),
                    jpeg_quality=settings.quality)


def write_jpeg_beton(files: ImageSource, out: Path, settings: JpegSettings, workers: int, dataset: str | None = None,
                     page_size: int = PAGE_SIZE, checkpoint_s: float = CHECKPOINT_S,
                     digest: str | None = None) -> Manifest:
    """Writes `files` to `out` (.beton, JPEG images of varying size), `out`.json (manifest),
    `out`.files.npz (row file names) and `out`.rows.npz (pixel digests); resumes an interrupted build
    of the same list and settings (see the module docstring). `page_size` (a power of two, bytes) and
    `checkpoint_s` (seconds between progress records) are FFCV's page and the resume granularity."""
    if page_size < 4096 or page_size & (page_size - 1):
        raise BuildError(f"page size must be a power of two of at least 4096 bytes, got {page_size}")
    n = files.n
    partial, record = Path(f"{out}.partial"), Path(f"{out}.partial.npz")
    head, meta_start, data_start = _header_bytes(n, page_size)
    key, rows = source_key(files, settings, page_size), _Rows(files)
    try:
        fh = os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
    except OSError as exc:
        raise output_error(out, exc) from exc
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BuildError(f"{out}: another `ccfs-fast build` is writing this output ({partial} is locked); wait "
                             "for it or choose another --out") from exc
        try:
            first, length = rows.restore(record, key) if record.is_file() else (0, 0)
            if first and fh.seek(0, os.SEEK_END) < length:
                first, length = 0, 0  # the record is newer than the file: cannot trust it
            if first:
                print(f"resuming {out}: {first} of {n} images were already written", file=sys.stderr)
            fh.truncate(length if first else 0)
            if not first:
                fh.write(bytes(data_start))
            fh.seek(length if first else data_start)
            pool_size = max(1, min(workers, available_cpus()))
            with get_context("fork").Pool(pool_size, initializer=die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                results = bounded_imap(pool, _encode, _jobs(files, first, settings), 4 * pool_size)
                _append(fh, rows, results, first, data_start, n, lambda r, at: rows.save(record, key, r, at),
                        f"build {out.name}", page_size, checkpoint_s)
            _finish(fh, rows, head, meta_start, n)
        except OSError as exc:
            raise output_error(out, exc) from exc
        manifest = _manifest(files, rows, settings, dataset)
        size, sha = partial.stat().st_size, file_sha256(partial)
        manifest = replace(manifest, beton_size=size, beton_sha256=sha, source_key=key, build_digest=digest)
        # the sidecars and the manifest first, the .beton renamed into place last: a .beton never stands
        # without its manifest (a full disk or a kill in between leaves a partial output, built again)
        write_npz(files_path(out), names=np.asarray(files.names), beton_sha256=np.array(sha))
        write_npz(row_digest_path(out), digests=rows.digests, beton_sha256=np.array(sha))
        write_text(manifest_path(out), manifest.to_json())
        os.replace(partial, out)
    with suppress(OSError):
        record.unlink()
    return manifest
