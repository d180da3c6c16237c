"""`ccfs-fast build`: one registry of dataset kinds, each a reader plus its output naming."""
from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ccfs_fast.errors import BuildError, UnknownNameError
from ccfs_fast.outputs import missing_top, output_error

from .arrays import read_arrays
from .cifar import read_cifar
from .image_folder import read_image_folder
from .imagenet import FileList, read_imagenet
from .jpeg_writer import JpegSettings, source_key, write_jpeg_beton
from .manifest import Manifest, read_manifest
from .table import ImageTable
from .tiny_imagenet import read_tiny_imagenet
from .writer import check_writable, content_hash, write_beton


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
    max_side: int | None = None  # build imagenet: longer side stored (FFCV's ImageNet example: 500)
    jpeg_quality: int | None = None  # build imagenet: JPEG quality (FFCV's ImageNet example: 90)

    def __post_init__(self) -> None:
        entry = BUILD_KINDS.get(self.kind)
        if entry is None:
            raise UnknownNameError("dataset kind", self.kind, list(BUILD_KINDS))
        if entry.list_files is None and (self.max_side is not None or self.jpeg_quality is not None):
            raise BuildError(f"--max-side and --jpeg-quality apply to `build imagenet`, not `build {self.kind}`")
        self.jpeg()  # checks the values
        if self.kind != "folder" and (self.per_class is not None or self.side is not None
                                      or self.class_order is not None):
            raise BuildError(f"--per-class, --side and --class-order apply to `build folder`, not `build {self.kind}`")
        if self.side is not None and not 1 <= self.side <= 4096:
            raise BuildError(f"--side must be between 1 and 4096 pixels, got {self.side}")
        if entry.single_file and self.out.suffix != ".beton":
            raise BuildError(f"--out must be a FILE.beton for `build {self.kind}`, got {self.out}")
        if self.workers < 1:
            raise BuildError(f"--workers must be at least 1, got {self.workers}")


    def jpeg(self) -> JpegSettings:
        """The JPEG storage settings (defaults: FFCV's ImageNet example)."""
        defaults = JpegSettings()
        return JpegSettings(self.max_side or defaults.max_side, self.jpeg_quality or defaults.quality)


@dataclass(frozen=True)
class BuildKind:
    """A dataset kind: `read` returns {split: table} decoded in memory; or, for datasets too large for
    that, `list_files` returns {split: FileList}, streamed into JPEG .beton files. Single-file kinds
    write `--out` itself."""

    read: Callable[[BuildConfig], dict[str, ImageTable]] | None
    single_file: bool
    list_files: Callable[[BuildConfig], dict[str, FileList]] | None = None
    dataset: str | None = None


BUILD_KINDS: dict[str, BuildKind] = {
    "cifar10": BuildKind(lambda c: read_cifar(c.src, "cifar10"), False),
    "cifar100": BuildKind(lambda c: read_cifar(c.src, "cifar100"), False),
    "tiny-imagenet": BuildKind(lambda c: read_tiny_imagenet(c.src, c.workers), False),
    "folder": BuildKind(lambda c: {"": read_image_folder(c.src, c.per_class, c.side, c.workers, c.class_order)}, True),
    "arrays": BuildKind(lambda c: {"": read_arrays(c.src)}, True),
    "imagenet": BuildKind(None, False, lambda c: read_imagenet(c.src), "imagenet"),
}


def output_paths(config: BuildConfig) -> dict[str, Path]:
    """{split: .beton path}: `<kind>_train.beton` / `<kind>_test.beton` in --out, or --out itself."""
    if BUILD_KINDS[config.kind].single_file:
        return {"": config.out}
    return {split: config.out / f"{config.kind}_{split}.beton" for split in ("train", "test")}


def build(config: BuildConfig) -> list[tuple[Path, Manifest, float]]:
    """Reads the source and writes every output; returns (path, manifest, seconds) per file.
    Existing outputs are refused before any reading starts (unless overwrite), except after an
    interrupted multi-split build: splits already built from the same source are kept (and said so),
    the missing ones are written."""
    outputs = output_paths(config)
    created = missing_top(config.out) if not BUILD_KINDS[config.kind].single_file else None
    try:
        return _build(config, outputs)
    except BaseException:
        if created is not None and not any(path.exists() or Path(f"{path}.partial").exists()
                                           for path in outputs.values()):  # a partial one resumes
            shutil.rmtree(created, ignore_errors=True)  # a failed build leaves no folder it created
        raise


def _build(config: BuildConfig, outputs: dict[str, Path]) -> list[tuple[Path, Manifest, float]]:
    if not BUILD_KINDS[config.kind].single_file:
        try:
            config.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(config.out, exc) from exc
    if BUILD_KINDS[config.kind].list_files is not None:
        return _build_streamed(config, outputs)
    built = {split for split, path in outputs.items() if path.exists()}
    partial = bool(built) and len(built) < len(outputs) and not config.overwrite
    for split, path in outputs.items():
        if not (partial and split in built):  # a kept split is checked against the source once it is read
            check_writable(path, config.overwrite or partial)
    start = time.perf_counter()
    tables = BUILD_KINDS[config.kind].read(config)
    read_s = time.perf_counter() - start
    results = []
    for split, path in outputs.items():
        start = time.perf_counter()
        if partial and split in built:
            manifest = kept_split(path, tables[split])
            missing = ", ".join(sorted(set(outputs) - built))
            print(f"{path} was already built from the same source; building the missing split: {missing}",
                  file=sys.stderr)
        else:
            manifest = write_beton(tables[split], path, config.overwrite or partial, config.workers)
        results.append((path, manifest, read_s / len(outputs) + time.perf_counter() - start))
    return results


def kept_split(path: Path, table: ImageTable) -> Manifest:
    """The manifest of an existing split when it is whole (its .beton and manifest pair up) and holds
    exactly `table` (the same content hash); BuildError otherwise."""
    from ccfs_fast.data import check_pair
    from ccfs_fast.errors import DataError

    try:
        manifest = read_manifest(path)
        check_pair(path, manifest)
    except DataError as exc:
        raise BuildError(f"{exc}") from exc
    if manifest.content_hash != content_hash(table):
        raise BuildError(f"{path} already exists with other content than this source's; pass --overwrite to "
                         "replace it")
    return manifest


def _build_streamed(config: BuildConfig, outputs: dict[str, Path]) -> list[tuple[Path, Manifest, float]]:
    """Lists the source and streams each split into a JPEG .beton; a split already built whole from
    the same files and settings is kept, an interrupted one resumes (jpeg_writer)."""
    entry = BUILD_KINDS[config.kind]
    lists = entry.list_files(config)
    settings = config.jpeg()
    results = []
    for split, path in outputs.items():
        start = time.perf_counter()
        kept = None if config.overwrite else kept_stream(path, lists[split], settings)
        if kept is not None:
            print(f"{path} was already built from the same files and settings; kept", file=sys.stderr)
            results.append((path, kept, 0.0))
            continue
        check_writable(path, config.overwrite)
        manifest = write_jpeg_beton(lists[split], path, settings, config.workers, entry.dataset)
        results.append((path, manifest, time.perf_counter() - start))
    return results


def kept_stream(path: Path, files: FileList, settings: JpegSettings) -> Manifest | None:
    """The manifest of an existing whole JPEG split built from `files` (the same names, labels, sizes
    and modification times) with `settings`, else None (check_writable then refuses an existing
    output without --overwrite)."""
    from ccfs_fast.data import check_pair
    from ccfs_fast.errors import DataError

    if not path.exists():
        return None
    try:
        manifest = read_manifest(path)
        check_pair(path, manifest)
    except DataError:
        return None
    return manifest if manifest.source_key == source_key(files, settings) else None
