"""`bench imagenet-scale`'s spec and its generated ILSVRC-2012 tree: 1,000 wnid folders of JPEGs whose
class is a learnable GRID x GRID code of bright and dark cells."""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ILSVRC_TRAIN = 1_281_167

@dataclass(frozen=True)
class ScaleSpec:
    root: str
    pool: int = ILSVRC_TRAIN
    classes: int = 1000
    val_per_class: int = 10
    min_side: int = 12
    max_side: int = 24
    side: int = 16
    model: str = "convnet_tiny"
    ipc: int = 10
    alpha: float = 0.2
    epochs: int = 2
    teacher_sample: int = 200_000
    baseline_fraction: float = 0.1
    workers: int = 2
    seed: int = 0

    @property
    def tree(self) -> Path:
        return Path(self.root) / "ilsvrc"

    @property
    def betons(self) -> Path:
        return Path(self.root) / "betons"


def wnids(classes: int) -> list[str]:
    return [f"n{1440764 + 7 * c:08d}" for c in range(classes)]

GRID = 4  # class codes: a GRID x GRID layout of bright and dark cells

def class_pattern(c: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3]: class c's image: a 4 x 4 layout of bright and dark cells, the first 10 cells
    c's bits (1,024 codes), the other 6 a fixed frame, in a random tint with noise. The layout
    survives resizing, centre crops and the instance norm of the small ConvNets (which removes each
    image's colour mean and contrast)."""
    bits = [(c >> k) & 1 for k in range(10)] + [1, 0, 1, 0, 0, 1]
    cells = np.asarray(bits, np.float64).reshape(GRID, GRID)
    rows = np.minimum((np.arange(h) * GRID) // h, GRID - 1)
    cols = np.minimum((np.arange(w) * GRID) // w, GRID - 1)
    layout = cells[rows][:, cols]
    tint = rng.uniform(0.6, 1.0, 3)
    pixels = (50 + 150 * layout)[:, :, None] * tint + rng.integers(-15, 16, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)

def _write_class(job: tuple[str, int, str, int, int, int, int]) -> int:
    """Writes one class folder of `count` JPEGs (class_pattern, random sizes). Returns their bytes."""
    import cv2

    root, c, wnid, count, lo, hi, seed = job
    rng = np.random.default_rng(seed * 100_003 + c)
    folder = Path(root) / "train" / wnid
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for k in range(count):
        h, w = rng.integers(lo, hi + 1, 2)
        pixels = class_pattern(c, int(h), int(w), rng)
        blob = cv2.imencode(".JPEG", pixels[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        (folder / f"{wnid}_{k + 1}.JPEG").write_bytes(blob)
        total += len(blob)
    return total

def write_tree(spec: ScaleSpec) -> dict:
    """The ILSVRC-format tree (reused when its marker records the same shape)."""
    from PIL import Image
    from tqdm import tqdm

    tree, marker = spec.tree, spec.tree / ".complete.json"
    shape = {"pool": spec.pool, "classes": spec.classes, "sides": [spec.min_side, spec.max_side], "seed": spec.seed,
             "val_per_class": spec.val_per_class, "images": "grid-codes"}
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape:
        return {**json.loads(marker.read_text()), "reused": True}
    start = time.perf_counter()
    names = wnids(spec.classes)
    per_class = np.full(spec.classes, spec.pool // spec.classes)
    per_class[: spec.pool % spec.classes] += 1
    jobs = [(str(tree), c, w, int(per_class[c]), spec.min_side, spec.max_side, spec.seed)
            for c, w in enumerate(names)]
    with get_context("fork").Pool(spec.workers) as pool:
        written = sum(tqdm(pool.imap_unordered(_write_class, jobs), total=len(jobs), desc="tree", unit="class"))
    rng = np.random.default_rng(spec.seed)
    (tree / "val").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, c in enumerate(np.repeat(np.arange(spec.classes), spec.val_per_class)):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        Image.fromarray(class_pattern(int(c), spec.max_side, spec.max_side, rng)).save(tree / "val" / f"{name}.JPEG",
                                                                                   quality=90)
        rows.append(f"{name},{names[c]} 0 0 1 1")
    (tree / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    facts = {"shape": shape, "seconds": time.perf_counter() - start, "jpeg_bytes": int(written),
             "disk_bytes": _disk_bytes(tree / "train")}
    marker.write_text(json.dumps(facts))
    return {**facts, "reused": False}

def _disk_bytes(folder: Path) -> int:
    """Bytes the folder takes on disk (allocated blocks, as `du`)."""
    usage = subprocess.run(["du", "-sB1", str(folder)], capture_output=True, text=True, check=True)
    return int(usage.stdout.split()[0])
