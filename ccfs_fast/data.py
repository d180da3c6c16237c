"""FFCV loaders over index subsets of .beton files, and the pool + distilled index space.

Every subset in the engine is an index array into one IndexSpace: rows 0..n_pool-1 are the real
pool in canonical order, rows n_pool.. are the distilled images. Images travel as uint8 and are
normalised on the device.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import torch

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
from beton_builder.manifest import Manifest, manifest_path, read_manifest

from .augment import DEFAULT_RATIO, DEFAULT_SCALE, augment_batch, draw_augmentation, normalise_nhwc
from .digests import digest_record, fresh_digest, known_digest
from .errors import DataError
from .normalization import Normalization
from .processes import CpuShare


@dataclass(frozen=True)
class BetonFile:
    """A .beton with its checked manifest; `page_of_row` int64 [n]: the FFCV page (of `page_size`
    bytes) holding each row's image, and `row_bytes` the largest image's size in bytes."""

    path: Path
    manifest: Manifest
    page_of_row: np.ndarray | None = field(default=None, compare=False, repr=False)
    page_size: int = 0
    row_bytes: int = 0
    sizes: np.ndarray | None = field(default=None, compare=False, repr=False)  # int [n, 2]: (height, width) as stored

    @classmethod
    def open(cls, path: str | Path) -> BetonFile:
        path = Path(path)
        manifest = read_manifest(path)
        check_pair(path, manifest)
        try:
            reader = Reader(str(path))
        except Exception as exc:  # FFCV raises bare Exceptions / numpy errors on corrupt headers
            raise DataError(f"{path}: not a readable .beton file ({exc}); rebuild it with "
                            "`ccfs-fast build ... --overwrite`") from exc
        if reader.num_samples != manifest.n:
            raise DataError(f"{path}: holds {reader.num_samples} rows but its manifest says {manifest.n}; rebuild it")
        table = reader.alloc_table
        page_of_row = np.zeros(manifest.n, np.int64)
        page_of_row[table["sample_id"]] = table["ptr"] // reader.page_size
        image = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
        sizes = np.stack((image["height"], image["width"]), 1).astype(np.int64)
        return cls(path, manifest, page_of_row, int(reader.page_size), int(table["size"].max(initial=0)), sizes)

    @property
    def n(self) -> int:
        return self.manifest.n

    def digest(self) -> str:
        """sha256 of the file's content (the manifest's, checked at open, when it records one)."""
        return self.manifest.beton_sha256 or known_digest(self.path)


def check_pair(path: Path, manifest: Manifest) -> None:
    """A .beton and its manifest come from one build: its size and content digest match the
    manifest's record (manifests of builder version 2 and older have none)."""
    rebuild = "rebuild it with `ccfs-fast build ... --overwrite`"
    size = os.stat(path).st_size
    if manifest.beton_size is not None and size < manifest.beton_size:
        raise DataError(f"{path}: truncated: {size:,} of the {manifest.beton_size:,} bytes its manifest records "
                        f"({manifest.beton_size - size:,} missing: a copy or download cut short); copy it again, or "
                        f"{rebuild}")
    if manifest.beton_size is not None and size != manifest.beton_size:
        raise DataError(f"{path}: {size:,} bytes, but its manifest describes a .beton of {manifest.beton_size:,} "
                        f"bytes (the two come from different builds); {rebuild}")
    if manifest.beton_sha256 is None or known_digest(path) == manifest.beton_sha256:
        return
    # The remembered digest may be the stale one: hash the file itself before refusing anything.
    actual = fresh_digest(path)
    if actual == manifest.beton_sha256:
        print(f"warning: cache record {digest_record(path)} held a wrong digest of {path} (the file matches its "
              "manifest); replaced", file=sys.stderr)
        return
    beton_newer = os.stat(path).st_mtime_ns > os.stat(manifest_path(path)).st_mtime_ns
    stale = (f"the .beton was written after its manifest {manifest_path(path).name}, so the manifest is the stale one"
             if beton_newer else f"the manifest {manifest_path(path).name} was written after the .beton, so the "
             ".beton is the stale one")
    raise DataError(f"{path}: its content (sha256 {actual[:12]}...) does not match its manifest's record "
                    f"({manifest.beton_sha256[:12]}...): {stale}; {rebuild}")


def _stats_tensors(norm: Normalization, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [1, 3, 1, 1] in 0..255 pixel units."""
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def norm_tensors(norm: Normalization, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_std255, shift) float32 [1, 3, 1, 1] on `device`: x_norm = x_uint8 * inv_std255 + shift."""
    mean255, std255 = _stats_tensors(norm, device)
    return 1.0 / std255, -mean255 / std255


@contextmanager
def elementwise_threads(share: CpuShare, device: torch.device) -> Iterator[None]:
    """On the CPU, per-element work (augmentation, normalisation: results independent of the thread
    count) runs on the threads `share` grants now; on other devices nothing changes."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    wanted = share.threads(threads)
    if wanted == threads:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    # FFCV's Loader calls torch.set_num_threads(num_workers) globally; keep the caller's setting.
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


DEFAULT_TRAIN_SIDE = 224  # images of varying size are trained and evaluated at this side unless --train-side

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


POSITIONAL = re.compile(r"^(?P<prefix>\D*)(?P<number>\d+)$")


def positional(names: tuple[str, ...]) -> bool:
    """Whether class names only count classes (`00000`.., `0`.., `new000`.., `c0`..: one prefix and, in
    label order, consecutive numbers), so that they map to classes by order, not by name."""
    found = [POSITIONAL.match(n) for n in names]
    if not all(found) or len({m["prefix"] for m in found}) != 1:
        return False
    numbers = [int(m["number"]) for m in found]  # in label order: c1, c10, c2 (sorted as text) is not
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def check_class_names(pool: BetonFile, distilled: BetonFile) -> None:
    """A distilled set names the pool's classes (wnids, CIFAR names) in the pool's order, or only counts
    them (positional names, mapped by order). Names that differ would give classes another class's
    label silently: refused, naming the first differences."""
    theirs, ours = distilled.manifest.class_names, pool.manifest.class_names
    if theirs == ours or positional(theirs) or positional(ours):
        return
    differ = [c for c, (a, b) in enumerate(zip(theirs, ours)) if a != b]
    missing = sorted(set(ours) - set(theirs))
    shown = "; ".join(f"label {c}: {theirs[c]!r} in the distilled set, {ours[c]!r} in the pool" for c in differ[:3])
    hint = f" (the pool's {', '.join(map(repr, missing[:3]))} {'has' if len(missing) == 1 else 'have'} no folder)" \
        if missing else " (the same names in another order)"
    raise DataError(f"the distilled set {distilled.path} names its classes differently from the pool at "
                    f"{len(differ)} of {len(ours)} labels{hint}: {shown}; rename its class folders to the pool's class "
                    "names (or to numbers in class order) and rebuild it")


class IndexSpace:
    """One index space over the pool (rows 0..n_pool-1) and the distilled set (n_pool..n_total-1).
    `norm` normalises every image read through it (default: the pool's measured statistics)."""

    def __init__(self, pool: BetonFile, distilled: BetonFile | None = None, norm: Normalization | None = None,
                 side: int | None = None):
        """`side`: the side images are decoded at when the pool's images vary in size (JPEG pools,
        `build imagenet`); fixed-size pools are read at their own side."""
        self.pool, self.distilled = pool, distilled
        self.norm = norm or Normalization(tuple(pool.manifest.mean), tuple(pool.manifest.std), "pool")
        self.variable = pool.manifest.variable_size
        pm = pool.manifest
        if not self.variable and side not in (None, pm.side):
            raise DataError(f"--train-side {side} applies to pools of varying image size (`ccfs-fast build imagenet`); "
                            f"{pool.path} holds {pm.side}x{pm.side} images: drop --train-side")
        self.side = int(side or (DEFAULT_TRAIN_SIDE if self.variable else pm.side))
        if distilled is not None:
            dm = distilled.manifest
            if not self.variable and (dm.variable_size or dm.side != pm.side):
                held = "vary in size (stored as JPEG)" if dm.variable_size else f"are {dm.side}x{dm.side}"
                raise DataError(f"distilled images {held} but the pool's are {pm.side}x{pm.side} ({distilled.path}); "
                                f"rebuild the distilled set with --side {pm.side}")
            if dm.num_classes != pm.num_classes:
                raise DataError(f"distilled set has {dm.num_classes} classes ({distilled.path}), the pool "
                                f"{pm.num_classes} ({pool.path}); every class needs a distilled folder")
            check_class_names(pool, distilled)
        self._sizes: torch.Tensor | None = None

    def decode(self, purpose: str) -> str:
        """The image decode (_image_decoders) for `purpose`: train (the resident form), eval, or
        stream (RandomResizedCrop in the decoder)."""
        if not self.variable:
            return "rows"
        return {"train": "whole", "eval": "center", "stream": "crop"}[purpose]

    def crop_sizes(self, index: torch.Tensor) -> torch.Tensor | None:
        """float32 [m, 2] (height, width) as stored of the images at global `index` [m], on its device;
        None for a fixed-size pool (every image side x side, the resident form itself)."""
        if not self.variable:
            return None
        if self._sizes is None:
            parts = [self.pool.sizes] + ([self.distilled.sizes] if self.distilled is not None else [])
            self._sizes = torch.from_numpy(np.concatenate(parts)).to(torch.float32)
        return self._sizes.index_select(0, index.cpu()).to(index.device)

    @property
    def n_pool(self) -> int:
        return self.pool.n

    @property
    def n_total(self) -> int:
        return self.pool.n + (self.distilled.n if self.distilled is not None else 0)

    @property
    def manifest(self) -> Manifest:
        """The pool's manifest (side, classes, names)."""
        return self.pool.manifest

    def reader(self, beton: BetonFile, batch_size: int, workers: int, rows: np.ndarray | None = None,
               purpose: str = "eval") -> RowReader:
        """A compiled reader for one file, batch size and purpose (see decode; the process keeps it:
        row_reader), the OS page cache when `rows` lie scattered over the file (see scattered_rows)."""
        return row_reader(beton, batch_size, workers, self.decode(purpose),
                          rows is not None and scattered_rows(beton, rows), self.side)

    def warm_readers(self, workers: int, eval_batch_size: int = 0) -> None:
        """Compiles, once per process, the pool readers a run uses (FFCV compiles each reader's
        pipeline, about 1.5 s): per read size (resident reads' READ_CHUNK, EvalLoader's chunk for
        `eval_batch_size`), dense reads through FFCV's process cache and, for a pool large enough
        for scattered_rows to pick it, the OS page cache reader."""
        scatter_possible = self.pool.n * self.pool.row_bytes > SCATTER_MIN_BYTES
        for chunk in sorted({READ_CHUNK, eval_chunk(eval_batch_size)}):
            for os_cache in (False, True) if scatter_possible else (False,):
                for _ in row_reader(self.pool, chunk, workers, self.decode("eval"), os_cache, self.side).read(
                        np.arange(1)):
                    pass

    def distilled_indices(self) -> np.ndarray:
        return np.arange(self.n_pool, self.n_total, dtype=np.int64)

    def parts(self, indices: np.ndarray) -> list[tuple[BetonFile, np.ndarray, np.ndarray, int]]:
        """Splits global `indices` into (file, local rows, positions in `indices`, offset) per file."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_total):
            raise DataError(f"indices must lie in [0, {self.n_total}), got [{indices.min()}, {indices.max()}]")
        in_pool = indices < self.n_pool
        out = [(self.pool, indices[in_pool], np.flatnonzero(in_pool), 0)]
        if self.distilled is not None:
            out.append((self.distilled, indices[~in_pool] - self.n_pool, np.flatnonzero(~in_pool), self.n_pool))
        return [part for part in out if len(part[1])]

    def read_resident(self, indices: np.ndarray, device: torch.device, workers: int, purpose: str = "train"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reads `indices` once: (uint8 [m, 3, S, S] on `device`, labels int64 [m], global index
        int64 [m]), row j being indices[j]; images of varying size decoded for `purpose` (decode)."""
        indices = np.asarray(indices, dtype=np.int64)
        side = self.side
        images = torch.empty((len(indices), 3, side, side), dtype=torch.uint8, device=device)
        labels = torch.empty(len(indices), dtype=torch.int64)
        for beton, rows, positions, _ in self.parts(indices):
            start = 0
            for batch, batch_labels, batch_index in self.reader(beton, READ_CHUNK, workers, rows, purpose).read(rows):
                pos = torch.from_numpy(positions[start:start + len(batch_index)])
                images[pos.to(device)] = batch.permute(0, 3, 1, 2).to(device)
                labels[pos] = batch_labels
                start += len(batch_index)
        return images, labels.to(device), torch.from_numpy(indices).to(device)


def epoch_order(n: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """One epoch's sample order on the generator's device: a uniform permutation of n rows; with
    world_size > 1 this rank's strided share, padded to equal length as torch's DistributedSampler."""
    order = torch.randperm(n, generator=generator, device=generator.device)
    if world_size > 1:
        per_rank = -(-n // world_size)
        order = torch.cat((order, order[: per_rank * world_size - n]))[rank::world_size]
    return order


class ResidentTrainLoader:
    """Train batches over a small index subset (a phase's train set) kept resident as uint8 on the
    device; each epoch a uniform shuffle, RandomResizedCrop + flip + normalise per whole batch.

    Random numbers come from one generator on the device, seeded once: per epoch the permutation
    (`epoch_order`), per batch one `draw_augmentation`: the same sequence the capturable train step
    (ccfs_fast.step) draws, so the two train identically. Yields (images [b, 3, S, S] normalised, in
    `dtype`, labels int64 [b], global index int64 [b]); with world_size > 1 this rank's share.
    """

    def __init__(self, space: IndexSpace, indices: np.ndarray, batch_size: int, device: torch.device | str,
                 seed: int, workers: int = 2, scale: tuple[float, float] = DEFAULT_SCALE,
                 ratio: tuple[float, float] = DEFAULT_RATIO, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, resident: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32):
        """`resident`: the (images, labels, index) of `indices` already read by
        IndexSpace.read_resident (e.g. reused across runs on one train set); read here otherwise."""
        if len(indices) == 0:
            raise DataError("the train set is empty; nothing to train on")
        self.device = torch.device(device)
        self.batch_size, self.scale, self.ratio, self.dtype = batch_size, scale, ratio, dtype
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        mean255, std255 = _stats_tensors(space.norm, self.device)
        self.inv_std255, self.shift = 1.0 / std255, -mean255 / std255
        if resident is None:
            resident = space.read_resident(indices, self.device, workers)
        self.images, self.labels, self.index = resident
        self.sizes = space.crop_sizes(self.index)  # images of varying size: their stored (height, width)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.share = CpuShare()

    def __len__(self) -> int:
        per_rank = -(-len(self.labels) // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.labels), self.generator, self.rank, self.world_size)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            u = draw_augmentation(len(rows), self.generator, self.dtype)
            with elementwise_threads(self.share, self.device):
                sizes = None if self.sizes is None else self.sizes.index_select(0, rows)
                images = augment_batch(self.images.index_select(0, rows), u, self.inv_std255, self.shift, self.scale,
                                       self.ratio, sizes)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels.index_select(0, rows), self.index.index_select(0, rows)


class EvalLoader:
    """Sequential, unaugmented batches over an index subset of one IndexSpace, streamed through
    FFCV (never materialised): (images float32 [b, 3, S, S] normalised on `device`, labels int64
    [b], global index int64 [b]), every index once: pool rows first, then distilled rows, each in
    the order given, normalised with the space's `norm`."""

    def __init__(self, space: IndexSpace, indices: np.ndarray, batch_size: int, device: torch.device | str,
                 workers: int = 2, channels_last: bool = False):
        self.space, self.indices = space, np.asarray(indices, dtype=np.int64)
        self.batch_size, self.workers, self.channels_last = batch_size, workers, channels_last
        self.device = torch.device(device)
        self.mean255, self.std255 = _stats_tensors(space.norm, self.device)

    def __len__(self) -> int:
        chunk = eval_chunk(self.batch_size)
        return sum((len(rows) // chunk) * -(-chunk // self.batch_size) + -(-(len(rows) % chunk) // self.batch_size)
                   for _, rows, _, _ in self.space.parts(self.indices))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # FFCV reads chunks of READ_CHUNK rows (one short burst of its threads per chunk) that are cut
        # into model batches here: per-batch reads interleave FFCV's prefetch threads with the model's
        # intra-op threads and cost a third of the throughput on a 2-core CPU.
        chunk = eval_chunk(self.batch_size)
        for beton, rows, _, offset in self.space.parts(self.indices):
            for images, labels, index in self.space.reader(beton, chunk, self.workers, rows).read(rows):
                images = images.to(self.device, non_blocking=True)
                labels, index = labels.to(self.device), (index + offset).to(self.device)
                for start in range(0, len(labels), self.batch_size):
                    stop = start + self.batch_size
                    yield (normalise_nhwc(images[start:stop], self.mean255, self.std255, self.channels_last),
                           labels[start:stop], index[start:stop])


class ResidentEvalLoader:
    """Sequential, unaugmented batches over a small index subset (e.g. the test set) read once into a
    resident uint8 tensor on the device, so per-epoch evaluation pays no FFCV compile or decode:
    (images float32 [b, 3, S, S] normalised with the space's `norm`, labels int64 [b], index int64 [b])."""

    def __init__(self, space: IndexSpace, indices: np.ndarray, batch_size: int, device: torch.device | str,
                 workers: int = 2, channels_last: bool = False):
        self.device = torch.device(device)
        self.batch_size, self.channels_last = batch_size, channels_last
        mean255, std255 = _stats_tensors(space.norm, self.device)
        self.inv_std255, self.shift = 1.0 / std255, -mean255 / std255
        self.images, self.labels, self.index = space.read_resident(indices, self.device, workers, "eval")

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            images = torch.addcmul(self.shift, self.images[start:stop].float(), self.inv_std255)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[start:stop], self.index[start:stop]


def make_test_loader(test: BetonFile, num_classes: int, norm: Normalization, batch_size: int,
                     device: torch.device | str, workers: int = 2, channels_last: bool = False,
                     side: int | None = None) -> ResidentEvalLoader:
    """The whole test set, resident, sequential, normalised with the run's `norm` (the same as the
    pool's and the distilled images'); images of varying size centre-cropped at `side`."""
    if test.manifest.num_classes != num_classes:
        raise DataError(f"the test set {test.path} has {test.manifest.num_classes} classes but the pool "
                        f"has {num_classes}; pass the test split of the same dataset")
    return ResidentEvalLoader(IndexSpace(test, norm=norm, side=side), np.arange(test.n), batch_size, device, workers,
                              channels_last)
