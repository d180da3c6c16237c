"""Tensor-file reader: distilled sets as the trajectory-matching family (MTT, FTD, TESLA, DATM) and
DD-Ranking exchange them: `torch.save` of float images [N, 3, H, W] normalised with the dataset's
mean / std (or in [0, 1]) and labels [N] (integers) or [N, C] (soft labels, e.g. DATM's), in two files
(`images_best.pt`, `labels_best.pt`) or one holding a dict or tuple of both.

Files are loaded with `torch.load(weights_only=True)`: torch's restricted unpickler rebuilds tensors
and plain containers only and refuses anything else without running it. Normalisation is undone with
the constants the distillation code used (NORMALIZATIONS), rounded to uint8; values outside 0..255
are clipped and counted. ZCA-whitened sets cannot be undone without their ZCA matrix."""
from __future__ import annotations

import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.errors import BuildError, UnknownNameError
from beton_builder.labels import check_labels, inferred_class_count
from beton_builder.table import ImageTable


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std (RGB, [0, 1] units) that images were normalised with; `undo` says in
    words what reading them back does."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    undo: str


# The constants the distillation codes of this family normalise with (MTT's utils.get_dataset, which
# FTD, TESLA, DATM and DD-Ranking keep): not always the constants CCFS trains with.
NORMALIZATIONS: dict[str, Normalization] = {
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                             "undoing CIFAR-10's normalisation (MTT's constants)"),
    "cifar100": Normalization((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762),
                              "undoing CIFAR-100's normalisation (MTT's constants)"),
    "tiny-imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                   "undoing Tiny-ImageNet's normalisation (MTT's constants: ImageNet's)"),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "undoing ImageNet's normalisation"),
    "none": Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "reading the values as pixels in [0, 1]"),
}
IMAGE_KEYS = ("images", "image_syn", "images_best", "x", "data", "imgs")
LABEL_KEYS = ("labels", "label_syn", "labels_best", "y", "targets")
CLIP_NOTE_SHARE = 0.01  # clipped values above this share of all values: say the constants may be wrong
EXPECTED = ("expected torch.save of float images [N, 3, H, W] (--images) and labels [N] or [N, C] (--labels, or in "
            "the images file as a dict / tuple)")


def check_tensor_args(normalized_with: str | None, classes: int | None) -> None:
    if normalized_with is None:
        raise BuildError(f"--normalized-with is required: the constants the distilled images were normalised with, "
                         f"one of {' | '.join(NORMALIZATIONS)} (none: pixels in [0, 1])")
    if normalized_with not in NORMALIZATIONS:
        raise UnknownNameError("normalisation", normalized_with, list(NORMALIZATIONS))
    if classes is not None and classes < 1:
        raise BuildError(f"--classes must be at least 1, got {classes}")


def load_tensors(path: Path) -> object:
    """What `path` holds, through torch's restricted unpickler (tensors and plain containers only)."""
    import torch

    if not path.is_file():
        raise BuildError(f"{path}: no such file; {EXPECTED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))  # torch names the object it refused to rebuild
        if found:
            raise BuildError(f"{path}: not a file of tensors: it holds other Python objects ({found[1]}), which are "
                             f"never loaded; {EXPECTED}") from exc
        raise BuildError(f"{path}: truncated or not a torch.save file of tensors; {EXPECTED}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BuildError(f"{path}: truncated or not a torch.save file ({' '.join(str(exc).split())[:160]}); "
                         f"{EXPECTED}") from exc


def split_content(content: object, path: Path) -> tuple[object, object | None]:
    """(images, labels or None) from a tensor, a dict (IMAGE_KEYS / LABEL_KEYS) or a 2-tuple / list."""
    import torch

    if isinstance(content, torch.Tensor):
        return content, None
    if isinstance(content, dict):
        images = next((content[k] for k in IMAGE_KEYS if k in content), None)
        if images is None:
            raise BuildError(f"{path}: a dict with keys {sorted(map(str, content))[:8]}, none of {list(IMAGE_KEYS)}; "
                             f"{EXPECTED}")
        return images, next((content[k] for k in LABEL_KEYS if k in content), None)
    if isinstance(content, (tuple, list)) and len(content) == 2:
        return content[0], content[1]
    raise BuildError(f"{path}: holds a {type(content).__name__}, not a tensor, a dict or a pair; {EXPECTED}")


def to_labels(labels: object, n: int, classes: int | None, path: Path) -> tuple[np.ndarray, int, list[str]]:
    """(labels int64 [n], class count, notes): integers as they are; soft labels [n, C] to their argmax."""
    import torch

    if not isinstance(labels, torch.Tensor):
        raise BuildError(f"{path}: labels are a {type(labels).__name__}, not a tensor; {EXPECTED}")
    notes = []
    if labels.dim() == 2 and labels.is_floating_point():
        if not torch.isfinite(labels).all():
            raise BuildError(f"{path}: the soft labels hold NaN or infinite values")
        notes.append(f"note: {path.name} holds soft labels [{n}, {labels.shape[1]}]: each image takes its argmax "
                     "class (CCFS relabels every image with the teacher anyway)")
        width = labels.shape[1]
        labels = labels.argmax(1)
        classes = classes or width
    elif labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise BuildError(f"{path}: labels are {labels.dtype} {list(labels.shape)}; expected integers [{n}] or soft "
                         f"labels [{n}, C]")
    if len(labels) != n:
        raise BuildError(f"{path}: {len(labels)} labels for {n} images; pass the labels saved with these images")
    out = labels.to(torch.int64).numpy()
    if classes is None:
        classes = inferred_class_count(out, str(path), "--classes N")
    check_labels(out, classes, str(path), " from --classes or the soft labels' width",
                 "pass --classes N to set the class count")
    return out, classes, notes


def to_pixels(images: object, norm: Normalization, path: Path) -> tuple[np.ndarray, int]:
    """(uint8 [n, h, w, 3], clipped value count): the normalisation undone, rounded, clipped to 0..255."""
    import torch

    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise BuildError(f"{path}: images are {kind}, not a float tensor; {EXPECTED}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise BuildError(f"{path}: images are {list(images.shape)}; expected [N, 3, H, W] (RGB, channels first)")
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise BuildError(f"{path}: {bad} of {len(images)} images hold NaN or infinite values")
    mean = torch.tensor(norm.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float64).view(1, 3, 1, 1)
    scaled = (images.to(torch.float64) * std + mean) * 255.0
    clipped = int(((scaled < -0.5) | (scaled > 255.5)).sum())
    pixels = scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return pixels, clipped


def read_tensors(src: str | Path, labels: str | Path | None, normalized_with: str | None,
                 classes: int | None = None) -> ImageTable:
    """The distilled set in `src` (and `labels`), normalisation undone with NORMALIZATIONS[normalized_with];
    rows in the file's order, class names "0".."C-1". Notes (soft labels, clipped values) on stderr."""
    src = Path(src)
    check_tensor_args(normalized_with, classes)
    images, inline = split_content(load_tensors(src), src)
    label_path = Path(labels) if labels is not None else src
    label_content = split_content(load_tensors(label_path), label_path)[0] if labels is not None else inline
    if label_content is None:
        raise BuildError(f"{src} holds images only; pass --labels FILE.pt (e.g. labels_best.pt)")
    pixels, clipped = to_pixels(images, NORMALIZATIONS[normalized_with], src)
    if not len(pixels):
        raise BuildError(f"{src}: no images (a tensor of shape {list(pixels.shape)}); {EXPECTED}")
    label_array, count, notes = to_labels(label_content, len(pixels), classes, label_path)
    share = clipped / max(1, pixels.size)
    if clipped:
        why = ("so large a share means the wrong --normalized-with, or a ZCA-whitened set, which cannot be undone "
               "without its ZCA matrix" if share > CLIP_NOTE_SHARE else "learned pixels often overshoot a little")
        notes.append(f"note: {clipped} of {pixels.size} values ({share:.2%}) fell outside 0..255 after "
                     f"{NORMALIZATIONS[normalized_with].undo} and were clipped: {why}")
    for note in notes:
        print(note, file=sys.stderr)
    return ImageTable(pixels, label_array, tuple(str(c) for c in range(count)), "tensors", str(src))
