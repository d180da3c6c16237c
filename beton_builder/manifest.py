"""The sidecar manifest `<file>.beton.json` that describes a .beton file."""
from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.errors import DataError


@dataclass(frozen=True)
class Manifest:
    """What a .beton holds. mean/std are per channel (RGB) in [0, 1] pixel units."""

    n: int
    num_classes: int
    class_names: tuple[str, ...]
    side: int
    source_kind: str
    source_path: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    content_hash: str
    builder_version: str
    fields: tuple[str, ...] = ("image", "label", "index")
    image_storage: str = "raw"  # raw: side x side pixels; jpeg: JPEG images of varying size, longer side <= side
    dataset: str | None = None  # cifar10 | cifar100 | tiny-imagenet; None for an image folder or arrays
    beton_size: int | None = None  # bytes of the .beton this manifest describes
    beton_sha256: str | None = None  # its content digest: a .beton and a manifest of two builds never pair
    class_counts: tuple[int, ...] | None = None  # images per class (builder version 3 and later)
    jpeg_quality: int | None = None  # image_storage jpeg: the JPEG quality the images were stored at
    source_key: str | None = None  # build imagenet: digest of the source files and settings (jpeg_writer.source_key)
    build_digest: str | None = None  # one digest for every split of one build: splits of two sources never pair

    @property
    def variable_size(self) -> bool:
        """Whether images vary in size (decoded through a resizing decoder at a chosen side)."""
        return self.image_storage == "jpeg"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# Which dataset a source kind holds, for manifests written before they recorded it.
DATASET_OF_SOURCE = {"cifar10-pickle": "cifar10", "cifar100-pickle": "cifar100", "tiny-imagenet": "tiny-imagenet"}


def manifest_path(beton_path: str | Path) -> Path:
    """The manifest lives beside the .beton: `cifar10_train.beton` -> `cifar10_train.beton.json`."""
    return Path(f"{beton_path}.json")


def read_manifest(beton_path: str | Path) -> Manifest:
    """Reads and checks the manifest of `beton_path`; DataError when missing or malformed."""
    beton = Path(beton_path)
    if not beton.is_file():
        raise DataError(f"{beton}: no such .beton file; build it with `ccfs-fast build ...`")
    path = manifest_path(beton)
    if not path.is_file():
        raise DataError(f"{beton}: its manifest {path.name} is missing; rebuild the file with "
                        "`ccfs-fast build ... --overwrite`")
    try:
        raw = json.loads(path.read_text())
        raw["class_names"] = tuple(raw["class_names"])
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        raw["fields"] = tuple(raw.get("fields", ("image", "label", "index")))
        raw["class_counts"] = tuple(raw["class_counts"]) if raw.get("class_counts") is not None else None
        raw.setdefault("dataset", DATASET_OF_SOURCE.get(raw["source_kind"]))  # manifests of builder version 1
        manifest = Manifest(**raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed manifest ({exc}); rebuild with `ccfs-fast build ... "
                        "--overwrite`") from exc
    stats = (*manifest.mean, *manifest.std)
    if len(stats) != 6 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats) \
            or min(manifest.std) <= 0:
        raise DataError(f"{path}: per-channel mean {list(manifest.mean)} / std {list(manifest.std)} must be finite "
                        "with std > 0 (a corrupt or hand-edited manifest); rebuild with `ccfs-fast build ... "
                        "--overwrite`")
    return manifest


def files_path(beton_path: str | Path) -> Path:
    """The sidecar with each row's source file name: `x.beton` -> `x.beton.files.npz` (keys `names`
    str [n], paths relative to the split folder, and `beton_sha256`)."""
    return Path(f"{beton_path}.files.npz")


def recorded_names(beton_path: str | Path) -> np.ndarray | None:
    """str [n]: each row's source file name (relative to its split folder) as `build imagenet`
    recorded it, when the sidecar belongs to this very build of the file; None otherwise."""
    path = files_path(beton_path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            names, made_for = stored["names"], str(stored["beton_sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable file-name record ({type(exc).__name__}); rebuild {beton_path} with "
                        "`ccfs-fast build imagenet ... --overwrite`") from exc
    manifest = read_manifest(beton_path)
    if made_for != manifest.beton_sha256 or names.shape != (manifest.n,):
        raise DataError(f"{path} was written for another build of {beton_path}; rebuild it with `ccfs-fast build "
                        "imagenet ... --overwrite`")
    return names
