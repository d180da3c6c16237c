"""ILSVRC-2012 (ImageNet-1K) reader: the published folders, listed in canonical order.

Train: `train/<wnid>/<file>` in torchvision ImageFolder order (sorted wnids = class indices, files
sorted by name). Validation, in any of the published layouts:
- `val/<wnid>/<file>` (already sorted into class folders);
- flat `val/ILSVRC2012_val_<8 digits>.JPEG` with labels from `LOC_val_solution.csv` (ImageId,
  PredictionString; the first token of the prediction string is the wnid);
- flat, with the devkit's `ILSVRC2012_validation_ground_truth.txt` (1-based ILSVRC2012_IDs, one per
  image in file order) mapped to wnids through the devkit's `meta.mat` (not sorted order).
Also accepted: the Kaggle tree `ILSVRC/Data/CLS-LOC/{train,val}` under ROOT. Nothing is decoded
here; `jpeg_writer` streams the files into a .beton.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.errors import BuildError
from beton_builder.images import is_image_name

EXPECTED = ("expected ROOT/train/<wnid>/*.JPEG and ROOT/val (wnid folders, or flat with LOC_val_solution.csv or "
            "the devkit's ILSVRC2012_validation_ground_truth.txt + meta.mat)")
SPLIT_DIRS = ("{split}", "ILSVRC/Data/CLS-LOC/{split}")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


@dataclass(frozen=True)
class FileList:
    """One split in canonical order: `paths` absolute file paths [n], `names` the paths relative to
    the split folder (`n01440764/n01440764_10026.JPEG`, or the flat val file name) [n], `labels`
    int64 [n], `class_names` the wnids in class-index order."""

    root: Path
    paths: list[str]
    names: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source_kind: str
    stamps: np.ndarray | None = None  # int64 [n, 2]: each file's size and mtime_ns, as listed

    def __post_init__(self) -> None:
        if not self.paths:
            raise BuildError(f"{self.root}: no image files found; {EXPECTED}")

    @property
    def n(self) -> int:
        return len(self.paths)

    def chunks(self, start: int, size: int):
        """(first row, [file path per row]) of `size` rows at a time from row `start` on: what the JPEG
        writer's workers decode (an image source: a path or the encoded bytes)."""
        for first in range(start, self.n, size):
            yield first, self.paths[first:first + size]


def split_dir(root: Path, split: str) -> Path:
    for pattern in SPLIT_DIRS:
        candidate = root / pattern.format(split=split)
        if candidate.is_dir():
            return candidate
    raise BuildError(f"{root}: no {split} folder; {EXPECTED}")


def _image_files(folder: Path, stamps: list | None = None) -> list[str]:
    """Image files directly in `folder`, sorted by name (ImageFolder's order within a class); their
    (size, mtime_ns) appended to `stamps` in that order."""
    with os.scandir(folder) as entries:
        found = sorted((e.name, e) for e in entries if is_image_name(e.name) and e.is_file())
    if stamps is not None:
        for _, entry in found:
            stat = entry.stat()
            stamps.append((stat.st_size, stat.st_mtime_ns))
    return [name for name, _ in found]


def read_class_folders(folder: Path, wnids: tuple[str, ...] | None, source_kind: str) -> FileList:
    """`folder/<class>/<file>` in ImageFolder order; with `wnids` the classes must be exactly those."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if wnids is not None and tuple(classes) != wnids:
        missing, extra = sorted(set(wnids) - set(classes)), sorted(set(classes) - set(wnids))
        raise BuildError(f"{folder}: its class folders differ from train's ({len(missing)} missing, e.g. "
                         f"{missing[:3]}; {len(extra)} extra, e.g. {extra[:3]}); every train wnid needs a val folder")
    paths, names, labels, stamps = [], [], [], []
    for label, wnid in enumerate(classes):
        files = _image_files(folder / wnid, stamps)
        if not files:
            raise BuildError(f"{folder / wnid}: class folder holds no images; {EXPECTED}")
        paths += [str(folder / wnid / f) for f in files]
        names += [f"{wnid}/{f}" for f in files]
        labels += [label] * len(files)
    return FileList(folder, paths, names, np.asarray(labels, np.int64), tuple(classes), source_kind,
                    np.asarray(stamps, np.int64).reshape(-1, 2))


def loc_val_labels(csv_path: Path) -> dict[str, str]:
    """{image id (file stem): wnid} from LOC_val_solution.csv."""
    out = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                out[row["ImageId"]] = row["PredictionString"].split()[0]
            except (KeyError, IndexError) as exc:
                raise BuildError(f"{csv_path}: expected columns ImageId,PredictionString with a wnid first, got "
                                 f"{dict(row)}") from exc
    return out


def devkit_val_labels(devkit: Path, files: list[str]) -> dict[str, str]:
    """{image id: wnid} from the devkit: ground-truth ids (1-based, one line per image in sorted file
    order, ILSVRC2012_val_00000001 first) through meta.mat's ILSVRC2012_ID -> WNID table."""
    from scipy.io import loadmat

    data = devkit / "data"
    try:
        synsets = loadmat(str(data / "meta.mat"), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        ids = [int(line) for line in (data / GROUND_TRUTH).read_text().split()]
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise BuildError(f"{devkit}: unreadable devkit meta.mat or {GROUND_TRUTH} ({exc}); use the devkit of "
                         "ILSVRC2012 (ILSVRC2012_devkit_t12)") from exc
    stems = sorted(Path(f).stem for f in files)
    if len(ids) != len(stems):
        raise BuildError(f"{data / GROUND_TRUTH}: {len(ids)} labels for {len(stems)} val images; the flat val folder "
                         "and the ground-truth file must hold the same images")
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise BuildError(f"{data / GROUND_TRUTH}: ILSVRC2012_IDs {unknown[:5]} are not in meta.mat")
    return {stem: id_to_wnid[i] for stem, i in zip(stems, ids)}


def find_devkit(root: Path) -> Path | None:
    for candidate in (root / "ILSVRC2012_devkit_t12", root / "devkit", root):
        if (candidate / "data" / GROUND_TRUTH).is_file():
            return candidate
    return None


def read_flat_val(folder: Path, root: Path, wnids: tuple[str, ...]) -> FileList:
    """Flat val images labelled by LOC_val_solution.csv (preferred) or the devkit's ground truth."""
    stamps: list = []
    files = _image_files(folder, stamps)
    csv_path = next((p for p in (root / "LOC_val_solution.csv", folder.parent / "LOC_val_solution.csv")
                     if p.is_file()), None)
    devkit = find_devkit(root)
    if csv_path is not None:
        by_id, source, kind = loc_val_labels(csv_path), csv_path, "imagenet-val-loc-csv"
    elif devkit is not None:
        by_id, source, kind = devkit_val_labels(devkit, files), devkit, "imagenet-val-devkit"
    else:
        raise BuildError(f"{folder}: flat val images but no labels: put LOC_val_solution.csv in {root}, or the devkit "
                         f"(ILSVRC2012_devkit_t12/data/{GROUND_TRUTH} and meta.mat), or sort val into wnid folders")
    missing = [f for f in files if Path(f).stem not in by_id]
    if missing:
        raise BuildError(f"{source}: no label for {len(missing)} val images (e.g. {missing[0]}); use the label file "
                         "of these images")
    index = {w: i for i, w in enumerate(wnids)}
    unknown = sorted({by_id[Path(f).stem] for f in files} - set(index))
    if unknown:
        raise BuildError(f"{source}: val labels name wnids with no train folder: {unknown[:5]}")
    labels = np.asarray([index[by_id[Path(f).stem]] for f in files], np.int64)
    return FileList(folder, [str(folder / f) for f in files], files, labels, wnids, kind,
                    np.asarray(stamps, np.int64).reshape(-1, 2))


def read_imagenet(root: str | Path) -> dict[str, FileList]:
    """{"train": ..., "test": ...} (test = the validation images) of an ILSVRC-2012 tree."""
    root = Path(root)
    if not root.is_dir():
        raise BuildError(f"{root}: not a folder; {EXPECTED}")
    train = read_class_folders(split_dir(root, "train"), None, "imagenet-train")
    val_dir = split_dir(root, "val")
    if any(p.is_dir() for p in val_dir.iterdir()):
        val = read_class_folders(val_dir, train.class_names, "imagenet-val-folders")
    else:
        val = read_flat_val(val_dir, root, train.class_names)
    return {"train": train, "test": val}
