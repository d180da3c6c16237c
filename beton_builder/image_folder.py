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


def read_image_folder(src: str | Path, per_class: int | None, side: int | None, workers: int,
                      order: str | None = None) -> ImageTable | FileList:
    """Reads `src`; `per_class` keeps the first K files of each class in sorted order (a class with
    fewer than K images is an error naming it); `side` resizes every image to side x side; `order`
    the class order (see class_order). Images of one square size (or resized by `side`) come back
    decoded (stored raw); images of varying size as a FileList, streamed into a JPEG .beton."""
    src = Path(src)
    if not src.is_dir():
        raise BuildError(f"{src}: not a folder; {EXPECTED}")
    if per_class is not None and per_class < 1:
        raise BuildError(f"--per-class must be at least 1, got {per_class}")
    classes = class_order([p.name for p in src.iterdir() if p.is_dir()], order, src)
    if not classes:
        raise BuildError(f"{src}: no class sub-folders; {EXPECTED}")
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
            return FileList(src, [r.name for r in refs], files, np.asarray(labels, np.int64), tuple(classes),
                            "image-folder", np.asarray(stamps, np.int64).reshape(-1, 2))
    images = decode_images(refs, side, workers, f"folder {src.name}")
    return ImageTable(images, np.asarray(labels, dtype=np.int64), tuple(classes), "image-folder", str(src))
