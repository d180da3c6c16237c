"""Image-folder reader (one sub-folder per class, torchvision ImageFolder order): distilled sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ccfs_fast.errors import BuildError

from .images import FileTree, decode_images
from .table import ImageTable

EXPECTED = "expected a folder with one sub-folder per class holding image files (ImageFolder layout)"


def read_image_folder(src: str | Path, per_class: int | None, side: int | None, workers: int) -> ImageTable:
    """Reads `src`; `per_class` keeps the first K files of each class in sorted order (a class with
    fewer than K images is an error naming it); `side` resizes every image to side x side."""
    src = Path(src)
    if not src.is_dir():
        raise BuildError(f"{src}: not a folder; {EXPECTED}")
    if per_class is not None and per_class < 1:
        raise BuildError(f"--per-class must be at least 1, got {per_class}")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
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
    images = decode_images([tree.ref(f) for f in files], side, workers, f"folder {src.name}")
    return ImageTable(images, np.asarray(labels, dtype=np.int64), tuple(classes), "image-folder", str(src))
