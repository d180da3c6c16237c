"""`ccfs-fast build`: one registry of dataset kinds, each a reader plus its output naming."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ccfs_fast.errors import BuildError, UnknownNameError

from .arrays import read_arrays
from .cifar import read_cifar
from .image_folder import read_image_folder
from .manifest import Manifest
from .table import ImageTable
from .tiny_imagenet import read_tiny_imagenet
from .writer import check_writable, write_beton


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one `ccfs-fast build` call, checked on construction."""

    kind: str
    src: Path
    out: Path
    per_class: int | None = None
    side: int | None = None
    overwrite: bool = False
    workers: int = 2
    class_order: str | None = None  # build folder: sorted | numeric (needed when integer names sort otherwise)

    def __post_init__(self) -> None:
        entry = BUILD_KINDS.get(self.kind)
        if entry is None:
            raise UnknownNameError("dataset kind", self.kind, list(BUILD_KINDS))
        if self.kind != "folder" and (self.per_class is not None or self.side is not None
                                      or self.class_order is not None):
            raise BuildError(f"--per-class, --side and --class-order apply to `build folder`, not `build {self.kind}`")
        if self.side is not None and not 1 <= self.side <= 4096:
            raise BuildError(f"--side must be between 1 and 4096 pixels, got {self.side}")
        if entry.single_file and self.out.suffix != ".beton":
            raise BuildError(f"--out must be a FILE.beton for `build {self.kind}`, got {self.out}")
        if self.workers < 1:
            raise BuildError(f"--workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class BuildKind:
    """A dataset kind: `read` returns {split: table}; single-file kinds write `--out` itself."""

    read: Callable[[BuildConfig], dict[str, ImageTable]]
    single_file: bool


BUILD_KINDS: dict[str, BuildKind] = {
    "cifar10": BuildKind(lambda c: read_cifar(c.src, "cifar10"), False),
    "cifar100": BuildKind(lambda c: read_cifar(c.src, "cifar100"), False),
    "tiny-imagenet": BuildKind(lambda c: read_tiny_imagenet(c.src, c.workers), False),
    "folder": BuildKind(lambda c: {"": read_image_folder(c.src, c.per_class, c.side, c.workers, c.class_order)}, True),
    "arrays": BuildKind(lambda c: {"": read_arrays(c.src)}, True),
}


def output_paths(config: BuildConfig) -> dict[str, Path]:
    """{split: .beton path}: `<kind>_train.beton` / `<kind>_test.beton` in --out, or --out itself."""
    if BUILD_KINDS[config.kind].single_file:
        return {"": config.out}
    return {split: config.out / f"{config.kind}_{split}.beton" for split in ("train", "test")}


def build(config: BuildConfig) -> list[tuple[Path, Manifest, float]]:
    """Reads the source and writes every output; returns (path, manifest, seconds) per file.
    Existing outputs are refused before any reading starts (unless overwrite)."""
    outputs = output_paths(config)
    if not BUILD_KINDS[config.kind].single_file:
        config.out.mkdir(parents=True, exist_ok=True)
    for path in outputs.values():
        check_writable(path, config.overwrite)
    start = time.perf_counter()
    tables = BUILD_KINDS[config.kind].read(config)
    read_s = time.perf_counter() - start
    results = []
    for split, path in outputs.items():
        start = time.perf_counter()
        manifest = write_beton(tables[split], path, config.overwrite, config.workers)
        results.append((path, manifest, read_s / len(outputs) + time.perf_counter() - start))
    return results
