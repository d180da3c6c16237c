"""Image-folder reader (one sub-folder per class, torchvision ImageFolder order): distilled sets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from beton_builder.base.errors import BuildError
from beton_builder.imagenet import FileList
from beton_builder.images import FileTree, decode_images, image_sizes, uniform_square, varying_note
from beton_builder.table import ImageTable

EXPECTED = "expected a folder with one sub-folder per class holding image files (ImageFolder layout)"


CLASS_ORDERS = ("sorted", "numeric")


def class_order(names: list[str], order: str | None, src: Path) -> list[str]:
    """The class folders in label order. `sorted` (string order) is torchvision's ImageFolder order and
    the paper's; `numeric` sorts integer names by value. When every name is an integer and the two
    orders differ (0, 1, 10, 11, 2, ...), the choice changes every label, so it must be made."""
    if order is not None and order not in CLASS_ORDERS:
        raise BuildError(f"--class-order must be sorted or numeric, got {order!r}")
    ordered = sorted(names)
    numeric = all(n.isdigit() for n in names)
    if order == "numeric":
        if not numeric:
            bad = next(n for n in ordered if not n.isdigit())
            raise BuildError(f"{src}: --class-order numeric needs integer class folder names, got {bad!r}")
        return sorted(names, key=int)
    if order is None and numeric and sorted(names, key=int) != ordered:
        raise BuildError(f"{src}: class folders are integers ({', '.join(ordered[:4])}, ...) whose sorted order "
                         "differs from their numeric order, so labels depend on the choice; pass --class-order "
                         "sorted (torchvision's ImageFolder order, the paper's) or --class-order numeric")
    return ordered


CLASS_INDEX = "classes.csv"  # folder,label,class_name: how a `ccfs-fast export` names its class folders


def folders_by_label(folders: list[str], classes: tuple[str, ...], src: Path, given: str) -> list[str]:
    """The class folders in the label order of `classes` (a reference's class names in label order):
    a folder named as a class takes its label, a folder named with an integer takes that label
    (`000`, `7`). Every class needs exactly one folder."""
    where = {name: label for label, name in enumerate(classes)}
    at: dict[int, str] = {}
    for folder in sorted(folders):
        label = where.get(folder, int(folder) if folder.isdigit() else None)
        if label is None or label >= len(classes):
            raise BuildError(f"{src}: class folder {folder!r} is neither a class of {given} nor a label index below "
                             f"{len(classes)}; name each folder with one of its classes ({', '.join(classes[:3])}, ...)"
                             " or its label index")
        if label in at:
            raise BuildError(f"{src}: class folders {at[label]!r} and {folder!r} both name class {label} "
                             f"({classes[label]!r}) of {given}; keep one")
        at[label] = folder
    missing = [classes[c] for c in range(len(classes)) if c not in at]
    if missing:
        raise BuildError(f"{src}: {len(missing)} classes of {given} have no folder ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); every class needs a folder")
    return [at[c] for c in range(len(classes))]


def export_classes(src: Path) -> tuple[str, ...] | None:
    """The class names in label order that an export's classes.csv records, or None without one."""
    import csv

    path = src / CLASS_INDEX
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as fh:
            rows = sorted((int(r["label"]), r["class_name"]) for r in csv.DictReader(fh))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise BuildError(f"{path}: not a classes.csv with folder,label,class_name columns ({exc}); remove it or "
                         "restore the export's own") from exc
    if [label for label, _ in rows] != list(range(len(rows))):
        raise BuildError(f"{path}: labels must be 0..{len(rows) - 1} once each; restore the export's own classes.csv")
    return tuple(name for _, name in rows)


def read_image_folder(src: str | Path, per_class: int | None, side: int | None, workers: int,
                      order: str | None = None, classes_like: tuple[str, ...] | None = None,
                      like_name: str = "the reference") -> ImageTable | FileList:
    """Reads `src`; `per_class` keeps the first K files of each class in sorted order (a class with
    fewer than K images is an error naming it); `side` resizes every image to side x side; `order`
    the class order (see class_order). `classes_like`: class names in label order (a pool's, from
    --classes-like) that the folders map to by name or label index (folders_by_label); without it, a
    folder holding an export's classes.csv takes its names and order from there. Images of one square
    size (or resized by `side`) come back decoded (stored raw); images of varying size as a FileList,
    streamed into a JPEG .beton."""
    src = Path(src)
    if not src.is_dir():
        raise BuildError(f"{src}: not a folder; {EXPECTED}")
    if per_class is not None and per_class < 1:
        raise BuildError(f"--per-class must be at least 1, got {per_class}")
    folders = [p.name for p in src.iterdir() if p.is_dir()]
    if not folders:
        raise BuildError(f"{src}: no class sub-folders; {EXPECTED}")
    names = classes_like
    if names is None and (names := export_classes(src)) is not None:
        like_name = f"its {CLASS_INDEX}"
    if names is not None:
        classes = folders_by_label(folders, names, src, like_name)
    else:
        classes = class_order(folders, order, src)
    tree = FileTree(src)
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_files = tree.image_files(name)
        if per_class is not None:
            if len(class_files) < per_class:
                raise BuildError(f"{src}: class {name!r} has {len(class_files)} images, fewer than "
                                 f"--per-class {per_class}; add images or lower --per-class")
            class_files = class_files[:per_class]
        if not class_files:
            raise BuildError(f"{src}: class folder {name!r} holds no images; {EXPECTED}")
        files += class_files
        labels += [label] * len(class_files)
    refs = [tree.ref(f) for f in files]
    if side is None:
        sizes = image_sizes(refs, workers)
        if not uniform_square(sizes):
            print(varying_note(sizes, f"folder {src}", resize_flag=True), file=sys.stderr)
            stamps = [(st.st_size, st.st_mtime_ns) for st in (os.stat(r.name) for r in refs)]
            return FileList(src, [r.name for r in refs], files, np.asarray(labels, np.int64), tuple(names or classes),
                            "image-folder", np.asarray(stamps, np.int64).reshape(-1, 2))
    images = decode_images(refs, side, workers, f"folder {src.name}")
    return ImageTable(images, np.asarray(labels, dtype=np.int64), tuple(names or classes), "image-folder", str(src))
