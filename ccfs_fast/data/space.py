"""One index space over the pool (rows 0..n_pool-1) and the distilled set (n_pool..), and how distilled
class names map to the pool's."""
from __future__ import annotations

import re

import numpy as np
import torch

from beton_builder.base.errors import DataError
from beton_builder.beton import BetonFile
from beton_builder.manifest import Manifest
from ccfs_fast.data.normalization import Normalization
from ccfs_fast.data.readers import (
    READ_CHUNK,
    RowReader,
    eval_chunk,
    may_scatter,
    read_labels,
    row_reader,
    scattered_rows,
)

DEFAULT_TRAIN_SIDE = 224  # images of varying size are trained and evaluated at this side unless --train-side

POSITIONAL = re.compile(r"^(?P<prefix>\D*)(?P<number>\d+)$")


def positional(names: tuple[str, ...]) -> bool:
    """Whether class names only count classes (`00000`.., `0`.., `new000`.., `c0`..: one prefix and, in
    label order, consecutive numbers), so that they map to classes by order, not by name."""
    found = [POSITIONAL.match(n) for n in names]
    if not all(found) or len({m["prefix"] for m in found}) != 1:
        return False
    numbers = [int(m["number"]) for m in found]  # in label order: c1, c10, c2 (sorted as text) is not
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def class_map(pool: BetonFile, distilled: BetonFile) -> np.ndarray | None:
    """How a distilled set's labels map to the pool's: None when they are the pool's already (the same
    names in the same order, or names that only count classes: positional, mapped by order); an
    int64 [C] array, distilled label -> pool label, when it names the pool's classes in another order
    (folders built from names that sort differently from the pool's label order). Names that are not
    the pool's would give classes another class's label silently: refused, naming the differences."""
    theirs, ours = distilled.manifest.class_names, pool.manifest.class_names
    if theirs == ours or positional(theirs) or positional(ours):
        return None
    if sorted(theirs) == sorted(ours) and len(set(ours)) == len(ours):
        where = {name: label for label, name in enumerate(ours)}
        return np.array([where[name] for name in theirs], np.int64)
    differ = [c for c, (a, b) in enumerate(zip(theirs, ours)) if a != b]
    missing = sorted(set(ours) - set(theirs))
    shown = "; ".join(f"label {c}: {theirs[c]!r} in the distilled set, {ours[c]!r} in the pool" for c in differ[:3])
    hint = f" (the pool's {', '.join(map(repr, missing[:3]))} {'has' if len(missing) == 1 else 'have'} no folder)" \
        if missing else ""
    raise DataError(f"the distilled set {distilled.path} names its classes differently from the pool at "
                    f"{len(differ)} of {len(ours)} labels{hint}: {shown}; name its class folders with the pool's class "
                    "names (in any order) or with numbers in class order, and rebuild it")


def pool_labels_of(mapping: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
    """Distilled labels as the pool's labels (class_map's mapping; None: the same)."""
    return labels if mapping is None else mapping[np.asarray(labels, np.int64)]


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
        # distilled label -> pool label where the distilled set names the pool's classes in another order
        self.distilled_map = class_map(pool, distilled) if distilled is not None else None
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
        scatter_possible = may_scatter(self.pool)
        for chunk in sorted({READ_CHUNK, eval_chunk(eval_batch_size)}):
            for os_cache in (False, True) if scatter_possible else (False,):
                for _ in row_reader(self.pool, chunk, workers, self.decode("eval"), os_cache, self.side).read(
                        np.arange(1)):
                    pass

    def as_pool_labels(self, beton: BetonFile, labels: torch.Tensor) -> torch.Tensor:
        """Labels read from `beton` as the pool's labels (the distilled set's mapped by class name)."""
        if beton is not self.distilled or self.distilled_map is None:
            return labels
        return torch.from_numpy(self.distilled_map).to(labels.device)[labels.long()]

    def distilled_labels(self, workers: int = 2) -> np.ndarray:
        """int64 [n_distilled]: each distilled image's label as the pool's label."""
        return pool_labels_of(self.distilled_map, read_labels(self.distilled, workers))

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
                labels[pos] = self.as_pool_labels(beton, batch_labels)
                start += len(batch_index)
        return images, labels.to(device), torch.from_numpy(indices).to(device)
