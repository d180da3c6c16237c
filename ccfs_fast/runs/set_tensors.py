"""`export --format tensors`: the set as two tensor files, the form distillation code loads
(DD-Ranking's `images.pt` / `labels.pt`): images float32 [N, 3, H, W] normalised with the evaluation's
constants (the run's), labels int64 [N], class-major (all of class 0 in the run's order, then class 1,
...). manifest.csv's `tensor_row` gives each image's row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from beton_builder.base.errors import ConfigError

IMAGES_FILE, LABELS_FILE = "images.pt", "labels.pt"


def tensor_rows(labels: np.ndarray) -> np.ndarray:
    """int64 [N]: the row of each image of the set (in the set's order) in the class-major tensors."""
    order = np.argsort(labels, kind="stable")
    rows = np.empty(len(labels), np.int64)
    rows[order] = np.arange(len(labels))
    return rows


def check_tensor_export(variable_size: bool, normalize: dict | None, run_dir: Path) -> None:
    """Refuses what cannot become one [N, 3, H, W] tensor: images of varying size, or a run without a
    recorded normalisation (older than it)."""
    if variable_size:
        raise ConfigError(f"--format tensors needs images of one size; {run_dir}'s pool or distilled set stores "
                          "JPEGs of varying size: export --format folder (or beton) instead")
    if not normalize or "mean" not in normalize or "std" not in normalize:
        raise ConfigError(f"{run_dir}/state.json records no normalisation (a run older than --format tensors); "
                          "export --format folder or beton instead")


def write_tensors(folder: Path, pixels: list[np.ndarray], labels: np.ndarray, normalize: dict) -> None:
    """images.pt (float32 [N, 3, H, W], (x / 255 - mean) / std per channel) and labels.pt (int64 [N]),
    class-major, from the set's uint8 [H, W, 3] `pixels` and `labels` in the set's order."""
    order = np.argsort(labels, kind="stable")
    x = torch.from_numpy(np.stack([pixels[i] for i in order])).permute(0, 3, 1, 2).to(torch.float32) / 255
    mean = torch.tensor(normalize["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(normalize["std"], dtype=torch.float32).view(1, 3, 1, 1)
    torch.save(((x - mean) / std).contiguous(), folder / IMAGES_FILE)
    torch.save(torch.from_numpy(np.asarray(labels, np.int64)[order].copy()), folder / LABELS_FILE)
