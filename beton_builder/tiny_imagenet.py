"""Tiny-ImageNet-200 reader (the `tiny-imagenet-200` folder or its .zip).

Canonical order: train = classes in sorted wnids.txt order (class index = position), files of each
class folder in ImageFolder order; val (used as the test split) = sorted file names, labels from
val/val_annotations.txt.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from beton_builder.base.errors import BuildError
from beton_builder.images import FileTree, decode_images
from beton_builder.table import ImageTable

TOP = "tiny-imagenet-200"
EXPECTED = ("expected the folder tiny-imagenet-200/ (wnids.txt, train/<wnid>/images/*.JPEG, "
            "val/images/*.JPEG, val/val_annotations.txt), a folder containing it, or its .zip")


def _wnids(tree: FileTree) -> list[str]:
    for rel in ("wnids.txt", "train/", "val/val_annotations.txt"):
        present = tree.is_file(rel) if not rel.endswith("/") else tree.is_dir(rel)
        if not present:
            raise BuildError(f"{tree.describe(rel)} is missing; {EXPECTED}")
    wnids = sorted(w.strip() for w in tree.read_text("wnids.txt").split() if w.strip())
    if not wnids:
        raise BuildError(f"{tree.describe('wnids.txt')} lists no classes; {EXPECTED}")
    return wnids


def _train_files(tree: FileTree, wnids: list[str]) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        class_files = tree.image_files(f"train/{wnid}")
        if not class_files:
            raise BuildError(f"{tree.describe('train/' + wnid)}: class folder missing or without "
                             f"images; {EXPECTED}")
        files += class_files
        labels += [label] * len(class_files)
    return files, np.asarray(labels, dtype=np.int64)


def _val_files(tree: FileTree, wnids: list[str]) -> tuple[list[str], np.ndarray]:
    label_of = {w: i for i, w in enumerate(wnids)}
    annotations = {}
    for line_no, line in enumerate(tree.read_text("val/val_annotations.txt").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in label_of:
            raise BuildError(f"{tree.describe('val/val_annotations.txt')} line {line_no}: wnid "
                             f"{parts[1]!r} is not in wnids.txt")
        annotations[parts[0]] = label_of[parts[1]]
    files = sorted(tree.image_files("val/images"), key=lambda p: p.rsplit("/", 1)[1])
    if not files:
        raise BuildError(f"{tree.describe('val/images')}: no validation images; {EXPECTED}")
    labels = []
    for rel in files:
        name = rel.rsplit("/", 1)[1]
        if name not in annotations:
            raise BuildError(f"{tree.describe(rel)} has no line in val/val_annotations.txt")
        labels.append(annotations[name])
    return files, np.asarray(labels, dtype=np.int64)


def read_tiny_imagenet(src: str | Path, workers: int) -> dict[str, ImageTable]:
    """Reads Tiny-ImageNet from `src`: {'train': table, 'test': table (the val split)}."""
    src = Path(src)
    if not src.exists():
        raise BuildError(f"{src}: no such file or folder; {EXPECTED}")
    tree = FileTree.open(src, TOP)
    wnids = _wnids(tree)
    tables = {}
    for split, (files, labels) in (("train", _train_files(tree, wnids)), ("test", _val_files(tree, wnids))):
        images = decode_images([tree.ref(f) for f in files], None, workers, f"tiny-imagenet {split}")
        tables[split] = ImageTable(images, labels, tuple(wnids), "tiny-imagenet", str(src), "tiny-imagenet")
    return tables
