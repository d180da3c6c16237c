"""`ccfs-fast build`: one registry of dataset kinds, each a reader plus its output naming."""
from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from beton_builder.arrays import read_arrays
from beton_builder.base.digests import row_digest_path
from beton_builder.base.errors import BuildError, UnknownNameError
from beton_builder.base.files import missing_top, output_error
from beton_builder.base.locks import BUILD_HOLDER, RunLock, build_lock
from beton_builder.cifar import read_cifar
from beton_builder.image_folder import read_image_folder
from beton_builder.imagenet import read_imagenet
from beton_builder.jpeg_writer import JpegSettings, source_key, write_jpeg_beton
from beton_builder.manifest import Manifest, files_path, manifest_path, read_manifest
from beton_builder.parquet import read_parquet
from beton_builder.sources import ImageSource
from beton_builder.table import ImageTable
from beton_builder.tensors import check_tensor_args, read_tensors
from beton_builder.tiny_imagenet import read_tiny_imagenet
from beton_builder.writer import check_writable, content_hash, write_beton


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one `ccfs-fast build` call, checked on construction. `src`: a folder or file (for
    `build tensors` the images .pt, for `build parquet` a folder of shards or one shard; `sources` more
    shards in order)."""

    kind: str
    src: Path
    out: Path
    per_class: int | None = None
    side: int | None = None
    overwrite: bool = False
    workers: int = 2
    class_order: str | None = None  # folder / parquet: sorted | numeric (needed when integer names sort otherwise)
    classes_like: Path | None = None  # folder: a .beton whose class names (label order) the folders map to by name
    max_side: int | None = None  # JPEG storage: longer side stored (FFCV's ImageNet example: 500)
    jpeg_quality: int | None = None  # JPEG storage: quality (FFCV's ImageNet example: 90)
    labels: Path | None = None  # tensors: labels .pt (else in the images file)
    normalized_with: str | None = None  # tensors: the constants the distilled tensors were normalised with
    classes: int | None = None  # tensors: the class count (else the largest label + 1, or the soft labels' width)
    image_column: str = "image"  # parquet
    label_column: str | None = None  # parquet: None finds it by the usual names
    split: str | None = None  # parquet: the split's shards when a folder holds several (train-*, test-*)
    sources: tuple[Path, ...] = ()  # parquet: further shards after src

    def __post_init__(self) -> None:
        entry = BUILD_KINDS.get(self.kind)
        if entry is None:
            raise UnknownNameError("dataset kind", self.kind, list(BUILD_KINDS))
        defaults = BuildConfig.__dataclass_fields__
        for flag, kinds in KIND_FLAGS.items():
            if self.kind not in kinds and getattr(self, flag) != defaults[flag].default:
                names = " / ".join(f"`build {k}`" for k in kinds)
                raise BuildError(f"--{flag.replace('_', '-')} applies to {names}, not `build {self.kind}`")
        self.jpeg()  # checks the values
        if self.side is not None and not 1 <= self.side <= 4096:
            raise BuildError(f"--side must be between 1 and 4096 pixels, got {self.side}")
        if entry.single_file and self.out.suffix != ".beton":
            raise BuildError(f"--out must be a FILE.beton for `build {self.kind}`, got {self.out}")
        if self.workers < 1:
            raise BuildError(f"--workers must be at least 1, got {self.workers}")
        if self.kind == "tensors":
            check_tensor_args(self.normalized_with, self.classes)

    def jpeg(self) -> JpegSettings:
        """The JPEG storage settings (defaults: FFCV's ImageNet example)."""
        defaults = JpegSettings()
        return JpegSettings(self.max_side or defaults.max_side, self.jpeg_quality or defaults.quality)


@dataclass(frozen=True)
class BuildKind:
    """A dataset kind: `read` returns {split: what to write}: an ImageTable (decoded in memory,
    written raw) or an ImageSource (streamed into a JPEG .beton: sets too large to decode into memory,
    or of varying image size). Single-file kinds write `--out` itself; `jpeg` kinds may stream."""

    read: Callable[[BuildConfig], dict[str, ImageTable | ImageSource]]
    single_file: bool
    dataset: str | None = None
    resumable: bool = False  # keeps a finished output of the same source, resumes an interrupted one


BUILD_KINDS: dict[str, BuildKind] = {
    "cifar10": BuildKind(lambda c: read_cifar(c.src, "cifar10"), False),
    "cifar100": BuildKind(lambda c: read_cifar(c.src, "cifar100"), False),
    "tiny-imagenet": BuildKind(lambda c: read_tiny_imagenet(c.src, c.workers), False),
    "folder": BuildKind(lambda c: {"": read_image_folder(c.src, c.per_class, c.side, c.workers, c.class_order,
                                                         *reference_classes(c.classes_like))}, True),
    "arrays": BuildKind(lambda c: {"": read_arrays(c.src)}, True),
    "tensors": BuildKind(lambda c: {"": read_tensors(c.src, c.labels, c.normalized_with, c.classes)}, True),
    "parquet": BuildKind(lambda c: {"": read_parquet((c.src, *c.sources), c.image_column, c.label_column,
                                                     c.class_order, c.workers, c.split)}, True),
    "imagenet": BuildKind(lambda c: read_imagenet(c.src), False, "imagenet", resumable=True),
}
JPEG_KINDS = ("folder", "parquet", "imagenet")  # may store JPEG (images of varying size)
# Flags that apply to some kinds only: a value other than the default for another kind is refused.
KIND_FLAGS = {"per_class": ("folder",), "side": ("folder",), "class_order": ("folder", "parquet"),
              "classes_like": ("folder",),
              "max_side": JPEG_KINDS, "jpeg_quality": JPEG_KINDS, "labels": ("tensors",),
              "normalized_with": ("tensors",), "classes": ("tensors",), "image_column": ("parquet",),
              "label_column": ("parquet",), "split": ("parquet",), "sources": ("parquet",)}


def reference_classes(beton: Path | None) -> tuple[tuple[str, ...] | None, str]:
    """(the class names of the .beton `beton` in label order, how to name it), from its manifest; (None,
    "") without one."""
    if beton is None:
        return None, ""
    return tuple(read_manifest(Path(beton)).class_names), f"--classes-like {beton}"  # DataError names the file


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
    single = BUILD_KINDS[config.kind].single_file
    created = missing_top(config.out) if not single else None
    try:
        if not single:
            try:
                config.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise output_error(config.out, exc) from exc
        with RunLock(config.out, build_lock(config.out, single), BUILD_HOLDER, remove=True):  # one build per output
            return _build(config, outputs)
    except BaseException:
        if created is not None and not any(path.exists() or Path(f"{path}.partial").exists()
                                           for path in outputs.values()):  # a partial one resumes
            shutil.rmtree(created, ignore_errors=True)  # a failed build leaves no folder it created
        raise


def _build(config: BuildConfig, outputs: dict[str, Path]) -> list[tuple[Path, Manifest, float]]:
    built = {split for split, path in outputs.items() if whole_output(path)}
    partial = bool(built) and len(built) < len(outputs) and not config.overwrite
    start = time.perf_counter()
    if not BUILD_KINDS[config.kind].resumable:  # a resumable kind keeps a finished output of the same source
        for split, path in outputs.items():
            if not (partial and split in built):  # a kept split is checked against the source once it is read
                check_writable(path, config.overwrite or partial)  # `built` above removed a partial output
    contents = BUILD_KINDS[config.kind].read(config)
    digest = build_digest(contents, config) if len(outputs) > 1 else None
    read_s = time.perf_counter() - start
    results = []
    for split, path in outputs.items():
        start = time.perf_counter()
        content = contents[split]
        if not isinstance(content, ImageTable):
            results.append(_write_streamed(config, path, content, digest))
            continue
        if partial and split in built:
            manifest = kept_split(path, content)
            missing = ", ".join(sorted(set(outputs) - built))
            print(f"{path} was already built from the same source; building the missing split: {missing}",
                  file=sys.stderr)
        else:
            manifest = write_beton(content, path, config.overwrite or partial, config.workers, digest)
        results.append((path, manifest, read_s / len(outputs) + time.perf_counter() - start))
    return results


def kept_split(path: Path, table: ImageTable) -> Manifest:
    """The manifest of an existing split when it is whole (its .beton and manifest pair up) and holds
    exactly `table` (the same content hash); BuildError otherwise."""
    from beton_builder.base.errors import DataError
    from beton_builder.beton import check_pair

    try:
        manifest = read_manifest(path)
        check_pair(path, manifest)
    except DataError as exc:
        raise BuildError(f"{exc}") from exc
    if manifest.content_hash != content_hash(table):
        raise BuildError(f"{path} already exists with other content than this source's; pass --overwrite to "
                         "replace it")
    return manifest


def build_digest(contents: dict[str, ImageTable | ImageSource], config: BuildConfig) -> str:
    """One digest over every split's content (a table's content hash, a stream's source key), recorded
    in each split's manifest: a folder holding splits of two sources (two builds raced, or one was
    copied over) is refused by `run` instead of mixing datasets."""
    digest = hashlib.sha256()
    for split in sorted(contents):
        content = contents[split]
        part = content_hash(content) if isinstance(content, ImageTable) else source_key(content, config.jpeg())
        digest.update(f"{split}:{part}\n".encode())
    return digest.hexdigest()


def whole_output(path: Path) -> bool:
    """Whether `path` is a finished output: its .beton and its manifest, paired. A manifest (and
    sidecars) without its .beton is what a build stopped before its last rename leaves (the .beton is
    renamed into place last): removed with a note and built again. Anything else at `path` is left
    to check_writable (an existing output needs --overwrite)."""
    from beton_builder.base.errors import DataError
    from beton_builder.beton import check_pair

    manifest = manifest_path(path)
    if not path.exists():
        if manifest.exists():
            print(f"note: {manifest} is the manifest of an interrupted build of {path} (the .beton never arrived); "
                  "removed, building it again", file=sys.stderr)
            for leftover in (manifest, row_digest_path(path), files_path(path)):
                with suppress(FileNotFoundError):
                    leftover.unlink()
        return False
    try:
        check_pair(path, read_manifest(path))
        return True
    except DataError:
        return False


def _write_streamed(config: BuildConfig, path: Path, files: ImageSource, digest: str | None = None
                    ) -> tuple[Path, Manifest, float]:
    """Streams one split into a JPEG .beton; one already built whole from the same source and
    settings is kept, an interrupted one resumes (jpeg_writer)."""
    start = time.perf_counter()
    settings = config.jpeg()
    kept = None if config.overwrite else kept_stream(path, files, settings)
    if kept is not None:
        print(f"{path} was already built from the same files and settings; kept", file=sys.stderr)
        return path, kept, 0.0
    check_writable(path, config.overwrite)
    manifest = write_jpeg_beton(files, path, settings, config.workers, BUILD_KINDS[config.kind].dataset, digest=digest)
    return path, manifest, time.perf_counter() - start


def kept_stream(path: Path, files: ImageSource, settings: JpegSettings) -> Manifest | None:
    """The manifest of an existing whole JPEG split built from `files` (the same names, labels, sizes
    and modification times) with `settings`, else None (check_writable then refuses an existing
    output without --overwrite)."""

    if not whole_output(path):
        return None
    manifest = read_manifest(path)
    return manifest if manifest.source_key == source_key(files, settings) else None
