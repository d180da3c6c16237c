"""Compiled FFCV readers over row subsets of a .beton, reused across subsets, with compact page tables."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch

from beton_builder.base.errors import DataError
from beton_builder.beton import BetonFile
from beton_builder.ffcv_import import (
    CenterCropRGBImageDecoder,
    IntDecoder,
    Loader,
    MemoryManager,
    OrderOption,
    RandomResizedCropRGBImageDecoder,
    Reader,
    ResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
    ToTensor,
)
from ccfs_fast.data.augment import DEFAULT_RATIO, DEFAULT_SCALE
from ccfs_fast.data.threads import _keep_torch_threads


def _whole_image(height, width, scale, ratio):  # numba-compiled by FFCV: the crop is the whole image
    return 0, 0, height, width


class WholeImageDecoder(ResizedCropRGBImageDecoder):
    """Each image (any size, JPEG or raw) resized whole to output_size (cv2 INTER_AREA, FFCV's
    resize): the resident form of a variable-size train image, cropped later on the device with
    its stored size (augment.crop_boxes_sized)."""

    def __init__(self, output_size: tuple[int, int]):
        super().__init__(output_size)
        self.scale, self.ratio = None, 1.0

    @property
    def get_crop_generator(self):
        return _whole_image

# Evaluation of variable-size images: the centre crop of a 256-side resize taken at 224 (torchvision's
# Resize(256) + CenterCrop(224); FFCV's ImageNet example), i.e. the centre square of 7/8 the short side.
CENTER_CROP_RATIO = 224 / 256


def _image_decoders(decode: str, side: int) -> list:
    """FFCV image decoders: `rows` fixed-size images as stored; for images of varying size resized to
    side x side: `center` (evaluation), `whole` (the resident train form), `crop` (RandomResizedCrop,
    the streamed train form)."""
    if decode == "rows":
        return [SimpleRGBImageDecoder(), ToTensor()]
    if decode == "center":
        return [CenterCropRGBImageDecoder((side, side), CENTER_CROP_RATIO), ToTensor()]
    if decode == "whole":
        return [WholeImageDecoder((side, side)), ToTensor()]
    if decode == "crop":
        return [RandomResizedCropRGBImageDecoder((side, side), DEFAULT_SCALE, DEFAULT_RATIO), ToTensor()]
    raise ValueError(f"unknown decode {decode!r}")


def _pipelines(fields: str, side: int) -> dict:
    ints = {"label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]}
    return {"image": None if fields == "labels" else _image_decoders(fields, side), **ints}


class _OnePagePerSample:
    """sample id -> (page,): FFCV's MemoryManager.sample_to_pages for files whose every row has one
    allocation (all of this tool's), as one int array instead of a dict of Python sets."""

    def __init__(self, page_of_sample: np.ndarray):
        self.page_of_sample = page_of_sample

    def __getitem__(self, sample_id: int) -> tuple[int]:
        return (int(self.page_of_sample[sample_id]),)


class _NoPageToSamples:
    """FFCV builds page -> samples for its QUASI_RANDOM order only, which this tool never uses."""

    def __getattr__(self, name: str):
        raise NotImplementedError("page_to_samples (QUASI_RANDOM order) is not kept by ccfs-fast's readers")


def _compact_memory_manager(self: MemoryManager, reader: Reader) -> None:
    """MemoryManager.__init__ without its per-row Python objects. FFCV's keeps, per row, a dict entry
    and a set in each of three tables (ptr_to_size, sample_to_pages, page_to_samples): about 0.7 GB
    per compiled reader for ImageNet's 1,281,167 rows, and a run holds several readers. Here: the
    sorted pointer and size arrays FFCV's readers search, and sample -> page as one array (FFCV's
    own tables when a row has more than one allocation)."""
    self.reader = reader
    table = reader.alloc_table
    order = np.argsort(table["ptr"])
    self.ptrs, self.sizes = table["ptr"][order], table["size"][order]
    page_bits = int(np.log2(reader.page_size))
    if len(table) == reader.num_samples and np.array_equal(np.sort(table["sample_id"]), np.arange(len(table))):
        page_of_sample = np.zeros(len(table), np.int64)
        page_of_sample[table["sample_id"]] = table["ptr"] >> page_bits
        self.sample_to_pages, self.page_to_samples = _OnePagePerSample(page_of_sample), _NoPageToSamples()
    else:
        _FFCV_MEMORY_MANAGER_INIT(self, reader)

_FFCV_MEMORY_MANAGER_INIT = MemoryManager.__init__


@contextmanager
def _compact_page_tables() -> Iterator[None]:
    # FFCV's Loader builds its memory manager inside its constructor: swap the table builder for the
    # duration of that call only (readers are made on the main thread).
    MemoryManager.__init__ = _compact_memory_manager
    try:
        yield
    finally:
        MemoryManager.__init__ = _FFCV_MEMORY_MANAGER_INIT


class RowReader:
    """One compiled FFCV loader over a .beton (sequential order, drop_last=False), re-targeted to
    each new index subset by setting the indices of the loader and of its traversal order (ffcv
    issue #152), so the pipeline's JIT compile (about a second) is paid once per file and batch size
    instead of once per subset. By default it reads through FFCV's process cache (os_cache=False):
    only the file pages the next few batches need are held, so streaming a 1 GB pool keeps memory flat
    instead of mapping every page it touched into the process; `os_cache` True maps the file instead
    (for scattered rows, see scattered_rows). `fields` "labels" skips the image pipeline
    (no pixel decoded). Get one with `row_reader`, which keeps it for the life of the process."""

    def __init__(self, beton: BetonFile, batch_size: int, workers: int, fields: str = "rows", os_cache: bool = False,
                 side: int = 0):
        # FFCV sets numba's thread count to `workers`, which numba caps at the machine's threads.
        self.beton, self.batch_size, self.fields, self.os_cache, self.side = beton, batch_size, fields, os_cache, side
        self.workers = max(1, min(workers, numba.config.NUMBA_NUM_THREADS))
        self._loader: Loader | None = None
        self.busy = False

    def _target(self, rows: np.ndarray) -> Loader:
        if self._loader is None:
            with _compact_page_tables():
                self._loader = Loader(str(self.beton.path), batch_size=self.batch_size, num_workers=self.workers,
                                      order=OrderOption.SEQUENTIAL, indices=rows, drop_last=False,
                                      os_cache=self.os_cache, pipelines=_pipelines(self.fields, self.side))
        else:
            self._loader.indices = rows
            self._loader.traversal_order.indices = rows
            self._loader.first_traversal_order = rows
        return self._loader

    def read(self, rows: np.ndarray) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yields (images uint8 [b, H, W, 3], labels int64 [b], index int64 [b]) on the CPU for
        `rows` in the order given, every row once ((labels, index) with fields "labels")."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.beton.n:
            raise DataError(f"{self.beton.path}: row indices must lie in [0, {self.beton.n}), got "
                            f"[{rows.min()}, {rows.max()}]")
        self.busy = True
        try:
            with _keep_torch_threads():
                for batch in self._target(rows):
                    # FFCV reuses its output buffers between batches: copy before handing them on.
                    *images, labels, index = batch
                    yield (*(i.clone() for i in images), labels.reshape(-1).to(torch.int64, copy=True),
                           index.reshape(-1).to(torch.int64, copy=True))
        finally:
            self.busy = False

# The compiled readers of this process, kept until it exits. Two reasons: FFCV compiles every Loader's
# pipeline with numba (about a second each), and numba's dispatcher finalizer raises KeyError (printed
# as "Exception ignored ... numba/core/dispatcher.py") when such a pipeline is garbage-collected in a
# reference cycle; at interpreter exit numba skips that finalizer. Keyed by the file's identity, so a
# file rebuilt at the same path gets a fresh reader.
_READERS: dict[tuple, list[RowReader]] = {}


def row_reader(beton: BetonFile, batch_size: int, workers: int, fields: str = "rows",
               os_cache: bool = False, side: int = 0) -> RowReader:
    """A free compiled reader for (file, batch size, threads, fields, cache kind, output side), made
    on first use. `fields`: "labels", or an image decode of _image_decoders."""
    stat = os.stat(beton.path)
    key = (str(beton.path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, batch_size, workers, fields,
           os_cache, side)
    readers = _READERS.setdefault(key, [])
    for reader in readers:
        if not reader.busy:
            reader.beton = beton
            return reader
    readers.append(RowReader(beton, batch_size, workers, fields, os_cache, side))
    return readers[-1]

# Rows per FFCV read when streaming a subset (evaluation, resident train sets): one batch size, so
# one compiled reader per file and cache kind serves both.
READ_CHUNK = 2048


def eval_chunk(batch_size: int) -> int:
    """Rows per FFCV read of an EvalLoader with model batches of `batch_size`."""
    return max(batch_size, READ_CHUNK)

SCATTER_LIMIT = 4  # read through the OS page cache when FFCV's pages would bring in 4x the rows' bytes

SCATTER_MIN_BYTES = 32 << 20  # ... and over 32 MiB: below that either way is quick


def may_scatter(beton: BetonFile) -> bool:
    """Whether any subset of `beton` can be scattered enough for the OS page cache (scattered_rows)."""
    return beton.n * beton.row_bytes > SCATTER_MIN_BYTES


def scattered_rows(beton: BetonFile, rows: np.ndarray) -> bool:
    """Whether `rows` are spread so thinly over the file that FFCV's process cache, which reads
    whole pages (8 MiB by default) into memory, would read over SCATTER_LIMIT times the bytes the
    rows hold (e.g. a lazy coarse pass round, or a train set of scattered selected images: 256
    scattered rows of a 240 MB file took 137 ms that way against 5 ms through the OS page cache,
    which reads 4 KiB pages on demand). Contiguous or dense subsets keep the process cache, whose
    memory stays flat while streaming a whole pool."""
    if beton.page_of_row is None or not len(rows) or not beton.row_bytes:
        return False
    # counting, not sorting: this runs before every read, whole-pool passes included
    paged = np.count_nonzero(np.bincount(beton.page_of_row[np.asarray(rows, np.int64)])) * beton.page_size
    return paged > SCATTER_MIN_BYTES and paged > SCATTER_LIMIT * len(rows) * beton.row_bytes


def iterate_rows(beton: BetonFile, rows: np.ndarray, batch_size: int, workers: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A read of `rows` through the process's reader for the file; see RowReader.read."""
    yield from row_reader(beton, batch_size, workers).read(rows)


def stored_bytes(beton: BetonFile, rows: np.ndarray) -> Iterator[bytes]:
    """Each row's image as stored in the file, rows in the order given: the encoded JPEG of a JPEG
    .beton (build imagenet / folder / parquet), never decoded or re-encoded (FFCV's allocation at the
    row's data_ptr, its size from the allocation table)."""
    if not beton.manifest.variable_size:
        raise DataError(f"{beton.path}: holds raw pixels, not encoded images; read them with iterate_rows")
    reader = Reader(str(beton.path))
    image = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
    table = reader.alloc_table
    order = np.argsort(table["ptr"])
    ptrs, sizes = table["ptr"][order], table["size"][order]
    with open(beton.path, "rb") as fh:
        for row in np.asarray(rows, np.int64):
            ptr = int(image["data_ptr"][row])
            at = int(np.searchsorted(ptrs, ptr))
            if at >= len(ptrs) or ptrs[at] != ptr:
                raise DataError(f"{beton.path}: row {row}'s image is not in the allocation table; rebuild it")
            fh.seek(ptr)
            yield fh.read(int(sizes[at]))


def read_labels(beton: BetonFile, workers: int = 2) -> np.ndarray:
    """All labels int64 [n] in canonical order, reading only the label and index fields (the image
    pipeline is disabled, so no pixels are decoded); checks that `index` is the row number."""
    # through the OS cache: the label pipeline reads the metadata table only, no image pages
    parts = list(row_reader(beton, 65536, workers, "labels", os_cache=True).read(np.arange(beton.n)))
    labels = torch.cat([p[0] for p in parts]).numpy()
    index = torch.cat([p[1] for p in parts]).numpy()
    if not np.array_equal(index, np.arange(beton.n)):
        raise DataError(f"{beton.path}: its index field is not 0..n-1 in row order; rebuild it with ccfs-fast build")
    if labels.min() < 0 or labels.max() >= beton.manifest.num_classes:
        raise DataError(f"{beton.path}: labels outside [0, {beton.manifest.num_classes}); rebuild it")
    return labels
