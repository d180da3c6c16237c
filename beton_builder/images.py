"""Decoding image files (from a folder or a zip) in parallel into one uint8 array."""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from beton_builder.base.errors import BuildError
from beton_builder.base.processes import available_cpus, die_with_parent

# torchvision's ImageFolder extensions, compared lower-case as it does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


@dataclass(frozen=True)
class ImageRef:
    """One image: `name` is a filesystem path, or a member of the zip `archive`, or (with `data`) what
    the encoded bytes are called (a parquet shard and row)."""

    name: str
    archive: str | None = None
    data: bytes | None = None

    def describe(self) -> str:
        return f"{self.archive}:{self.name}" if self.archive else self.name


_OPEN_ZIPS: dict[str, zipfile.ZipFile] = {}  # per worker process; zip handles cannot be pickled


def _open_bytes(ref: ImageRef):
    if ref.data is not None:
        return io.BytesIO(ref.data)
    if ref.archive is None:
        return open(ref.name, "rb")
    archive = _OPEN_ZIPS.get(ref.archive)
    if archive is None:
        archive = _OPEN_ZIPS[ref.archive] = zipfile.ZipFile(ref.archive)
    return archive.open(ref.name)


def _decode(args: tuple[ImageRef, int | None]) -> np.ndarray | str:
    ref, side = args
    try:
        with _open_bytes(ref) as fh, Image.open(fh) as img:
            img = img.convert("RGB")
            if side is not None and img.size != (side, side):
                img = img.resize((side, side), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, zipfile.BadZipFile, KeyError) as exc:
        return f"{ref.describe()}: cannot decode image ({exc}); replace or remove the file"


def image_size(ref: ImageRef) -> tuple[int, int] | str:
    """(width, height) from the image's header (nothing decoded); a message when it is no image."""
    try:
        with _open_bytes(ref) as fh, Image.open(fh) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, zipfile.BadZipFile, KeyError) as exc:
        return f"{ref.describe()}: cannot decode image ({exc}); replace or remove the file"


def image_sizes(refs: list[ImageRef], workers: int) -> list[tuple[int, int]]:
    """Every image's (width, height), read from the headers in parallel; BuildError on a bad file."""
    workers = max(1, min(workers, available_cpus()))
    with get_context("fork").Pool(workers, initializer=die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
        sizes = pool.map(image_size, refs, chunksize=256)
    bad = next((s for s in sizes if isinstance(s, str)), None)
    if bad is not None:
        raise BuildError(bad)
    return sizes


def uniform_square(sizes: list[tuple[int, int]]) -> bool:
    """Whether every image has one square size (stored raw); otherwise they are stored as JPEG."""
    return len(set(sizes)) == 1 and sizes[0][0] == sizes[0][1]


def varying_note(sizes: list[tuple[int, int]], what: str, resize_flag: bool) -> str:
    """The note a build prints when it stores images of varying (or non-square) size as JPEG."""
    shapes = sorted(set(sizes))
    shown = ", ".join(f"{w}x{h}" for w, h in shapes[:3]) + (", ..." if len(shapes) > 3 else "")
    return (f"note: {what}: images of {len(shapes)} size{'s' if len(shapes) > 1 else ''} ({shown}): stored as JPEG, "
            "each at its own size (longer side <= --max-side), as `build imagenet` does; runs train them at "
            "--train-side (default 224)" + ("; `--side S` resizes every image to SxS instead" if resize_flag else ""))


def decode_images(refs: list[ImageRef], side: int | None, workers: int, desc: str) -> np.ndarray:
    """Decodes `refs` in order into uint8 [n, s, s, 3] (RGB). Without `side` all images must share
    one square size; with it each is resized (bilinear) to side x side."""
    if not refs:
        raise BuildError(f"{desc}: no image files found")
    jobs = [(ref, side) for ref in refs]
    workers = max(1, min(workers, available_cpus()))
    with get_context("fork").Pool(workers, initializer=die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
        decoded = list(tqdm(pool.imap(_decode, jobs, chunksize=64), total=len(jobs), desc=desc,
                            unit="img"))
    shapes: dict[tuple[int, ...], ImageRef] = {}
    for ref, item in zip(refs, decoded):
        if isinstance(item, str):
            raise BuildError(item)
        shapes.setdefault(item.shape, ref)
    if len(shapes) > 1:
        (s1, r1), (s2, r2) = list(shapes.items())[:2]
        raise BuildError(f"{desc}: images of mixed sizes, e.g. {s1[1]}x{s1[0]} ({r1.describe()}) and "
                         f"{s2[1]}x{s2[0]} ({r2.describe()}); pass --side S to resize all to SxS")
    (shape,) = shapes
    if shape[0] != shape[1]:
        raise BuildError(f"{desc}: images are {shape[1]}x{shape[0]}, not square; pass --side S")
    return np.stack(decoded)


class FileTree:
    """Read-only view of a dataset tree in a folder or inside a zip, paths relative to its root."""

    def __init__(self, root: Path, archive: Path | None = None, names: list[str] | None = None):
        self.root, self.archive, self._names = root, archive, names

    @classmethod
    def open(cls, src: Path, top: str) -> FileTree:
        """`src` is the tree's folder, a folder containing `top`, or a .zip holding `top/`."""
        if src.is_dir():
            return cls(src / top if (src / top).is_dir() else src)
        try:
            with zipfile.ZipFile(src) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BuildError(f"{src}: truncated or corrupt zip archive ({exc}); download it again") from exc
        prefix = f"{top}/" if any(n.startswith(f"{top}/") for n in names) else ""
        rel = [n[len(prefix):] for n in names if n.startswith(prefix) and not n.endswith("/")]
        return cls(Path(prefix), src, sorted(rel))

    def describe(self, rel: str = "") -> str:
        return f"{self.archive}:{self.root / rel}" if self.archive else str(self.root / rel)

    def is_file(self, rel: str) -> bool:
        return rel in self._names if self.archive else (self.root / rel).is_file()

    def is_dir(self, rel: str) -> bool:
        if self.archive:
            return any(n.startswith(rel.rstrip("/") + "/") for n in self._names)
        return (self.root / rel).is_dir()

    def read_text(self, rel: str) -> str:
        if self.archive:
            with zipfile.ZipFile(self.archive) as zf:
                return zf.read(str(self.root / rel) if str(self.root) != "." else rel).decode()
        return (self.root / rel).read_text()

    def image_files(self, rel_dir: str) -> list[str]:
        """Image files below `rel_dir`, recursively, in ImageFolder order: folders sorted by path
        (as `sorted(os.walk(...))`), then file names sorted within each folder."""
        prefix = rel_dir.rstrip("/") + "/"
        if self.archive:
            found = [n for n in self._names if n.startswith(prefix) and is_image_name(n)]
        else:
            found = []
            for dirpath, _, filenames in os.walk(self.root / rel_dir, followlinks=True):
                rel = os.path.relpath(dirpath, self.root)
                found.extend(f"{rel}/{f}" for f in filenames if is_image_name(f))
        return sorted(found, key=lambda p: (p.rsplit("/", 1)[0], p.rsplit("/", 1)[1]))

    def ref(self, rel: str) -> ImageRef:
        if self.archive:
            member = rel if str(self.root) == "." else f"{self.root}/{rel}"
            return ImageRef(member, str(self.archive))
        return ImageRef(str(self.root / rel))
