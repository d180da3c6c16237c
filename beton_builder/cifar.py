"""CIFAR-10 / CIFAR-100 python-pickle readers (folder or the downloaded .tar.gz).

Canonical order: data_batch_1..5 concatenated (CIFAR-100: `train`); test: `test_batch` / `test`.
"""
from __future__ import annotations

import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.errors import BuildError
from beton_builder.base.safe_pickle import RefusedGlobal, safe_loads
from beton_builder.table import ImageTable


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its pickles and which keys it uses."""

    name: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           "batches.meta", b"labels", b"label_names", 10),
    "cifar100": CifarLayout("cifar100", "cifar-100-python", "cifar-100-python.tar.gz",
                            ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names", 100),
}


def expected_layout(layout: CifarLayout) -> str:
    files = ", ".join(layout.train_files + layout.test_files + (layout.meta_file,))
    return (f"expected the folder {layout.folder}/ (with {files}), a folder containing it, "
            f"or the downloaded {layout.archive}")


def _unpickle(blob: bytes, where: str) -> dict:
    """A batch's dict, read without running code (safe_pickle): a pickle that names anything but numpy
    arrays and plain values is refused."""
    try:
        obj = safe_loads(blob, encoding="bytes")
    except RefusedGlobal as exc:
        raise BuildError(f"{where}: the pickle names {exc}, which a CIFAR batch never holds; it is not loaded (a "
                         "pickle can run code); download the dataset again from its publisher") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise BuildError(f"{where}: truncated or corrupt pickle ({type(exc).__name__}); "
                         "download the dataset again") from exc
    if not isinstance(obj, dict):
        raise BuildError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


class _FolderSource:
    def __init__(self, folder: Path):
        self.folder = folder

    def read(self, name: str) -> tuple[bytes, str]:
        path = self.folder / name
        return path.read_bytes(), str(path)


class _TarSource:
    def __init__(self, archive: Path, layout: CifarLayout):
        self.archive = archive
        self.members: dict[str, bytes] = {}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    parts = Path(member.name).parts
                    if member.isfile() and len(parts) >= 1:
                        fileobj = tar.extractfile(member)
                        if fileobj is not None:
                            self.members[parts[-1]] = fileobj.read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise BuildError(f"{archive}: truncated or corrupt archive ({exc}); download "
                             f"{layout.archive} again") from exc

    def read(self, name: str) -> tuple[bytes, str]:
        return self.members[name], f"{self.archive}:{name}"


def _open_source(src: Path, layout: CifarLayout):
    candidates = [src, src / layout.folder]
    for folder in candidates:
        if folder.is_dir() and all((folder / f).is_file() for f in layout.train_files + layout.test_files):
            return _FolderSource(folder)
    archives = [src] if src.is_file() else [src / layout.archive]
    for archive in archives:
        if archive.is_file():
            source = _TarSource(archive, layout)
            missing = [f for f in layout.train_files + layout.test_files if f not in source.members]
            if missing:
                raise BuildError(f"{archive}: archive lacks {', '.join(missing)}; {expected_layout(layout)}")
            return source
    raise BuildError(f"{src}: not a {layout.name} dataset; {expected_layout(layout)}")


def _batch_arrays(obj: dict, where: str, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in obj or layout.label_key not in obj:
        raise BuildError(f"{where}: missing keys b'data' / {layout.label_key!r}; is this {layout.name}?")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise BuildError(f"{where}: expected data uint8 [n, 3072] and n labels, got {data.dtype} "
                         f"{list(data.shape)} and {len(labels)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _class_names(source, layout: CifarLayout) -> tuple[str, ...]:
    try:
        blob, where = source.read(layout.meta_file)
    except (KeyError, FileNotFoundError):
        return tuple(str(i) for i in range(layout.num_classes))
    names = _unpickle(blob, where).get(layout.names_key)
    if names is None or len(names) != layout.num_classes:
        raise BuildError(f"{where}: expected {layout.num_classes} class names under {layout.names_key!r}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def read_cifar(src: str | Path, variant: str) -> dict[str, ImageTable]:
    """Reads CIFAR `variant` ('cifar10' | 'cifar100') from `src`: {'train': table, 'test': table}."""
    layout = CIFAR_LAYOUTS[variant]
    source = _open_source(Path(src), layout)
    names = _class_names(source, layout)
    tables = {}
    for split, files in (("train", layout.train_files), ("test", layout.test_files)):
        parts = []
        for name in files:
            blob, where = source.read(name)
            parts.append(_batch_arrays(_unpickle(blob, where), where, layout))
        tables[split] = ImageTable(np.concatenate([p[0] for p in parts]),
                                   np.concatenate([p[1] for p in parts]), names,
                                   f"{variant}-pickle", str(src), variant)
    return tables
