"""`ccfs-fast demo`: the whole pipeline on real data that ships with scikit-learn (the 1,797
handwritten digits, 8x8, 10 classes, upscaled to 32x32): build .beton files, train a small teacher
recording forgetting scores, make a stand-in distilled set (per-class k-means centroids), run CCFS,
compare with random real images at the same IPC and with training on the full pool."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from beton_builder.base.errors import ConfigError
from beton_builder.base.files import write_text
from beton_builder.base.tables import format_table
from beton_builder.build import BuildConfig, build
from ccfs_fast.runs.config import RunConfig, TeacherConfig
from ccfs_fast.runs.curriculum import run_curriculum
from ccfs_fast.runs.teacher import train_teacher
from ccfs_fast.runs.workspace import open_workspace
from ccfs_fast.train.recipe import TrainRecipe
from ccfs_fast.train.settings import compose
from ccfs_fast.train.students import evaluate_selection, evaluate_train_set


@dataclass(frozen=True)
class DemoConfig:
    output_dir: Path
    image_per_class: int = 20
    alpha: float = 0.2
    epochs: int = 15
    teacher_epochs: int = 15
    num_eval: int = 3
    model: str = "convnet_small"
    seed: int = 0
    workers: int = 2
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.output_dir.exists() and any(self.output_dir.iterdir()) and not self.overwrite:
            raise ConfigError(f"demo output directory {self.output_dir} is not empty; pass --overwrite or another "
                              "--output-dir")


def digits_arrays(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as uint8 RGB [n, 32, 32, 3] (bilinear upscaling of the 8x8 images, ink
    0..16 mapped to 0..255), split 80/20 per class with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: len(members) // 5]] = True
    return {"train": (images[~test], labels[~test]), "test": (images[test], labels[test])}


def kmeans_distilled(images: np.ndarray, labels: np.ndarray, per_class: int, folder: Path, seed: int) -> None:
    """A stand-in for a distillation method: per-class k-means centroids, written as PNGs."""
    from sklearn.cluster import KMeans

    for c in range(int(labels.max()) + 1):
        members = images[labels == c].reshape((labels == c).sum(), -1).astype(np.float32)
        centres = KMeans(per_class, n_init=3, random_state=seed).fit(members).cluster_centers_
        (folder / f"{c}").mkdir(parents=True, exist_ok=True)
        for k, centre in enumerate(centres):
            image = Image.fromarray(centre.reshape(32, 32, 3).clip(0, 255).astype(np.uint8))
            image.save(folder / f"{c}" / f"{k:03d}.png")


def run_demo(cfg: DemoConfig) -> list[tuple]:
    out = cfg.output_dir
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for split, (x, y) in digits_arrays(cfg.seed).items():
        np.savez(data / f"digits_{split}.npz", x=x, y=y, class_names=np.array([str(c) for c in range(10)]))
        build(BuildConfig("arrays", data / f"digits_{split}.npz", data / f"digits_{split}.beton", overwrite=True,
                          workers=cfg.workers))
    x, y = digits_arrays(cfg.seed)["train"]
    cpc = int(cfg.image_per_class * cfg.alpha + 1e-9)
    kmeans_distilled(x, y, cpc, data / "distilled", cfg.seed)
    build(BuildConfig("folder", data / "distilled", data / "distilled.beton", overwrite=True, workers=cfg.workers))
    prep_s = time.perf_counter() - start

    start = time.perf_counter()
    teacher = train_teacher(compose(TeacherConfig, {
        "pool": data / "digits_train.beton", "test": data / "digits_test.beton", "output": out / "teacher.pt",
        "model": cfg.model, "forgetting_out": out / "forgetting.npy", "seed": cfg.seed, "workers": cfg.workers,
        "overwrite": True, "recipe": TrainRecipe(epochs=cfg.teacher_epochs, lr=0.05, weight_decay=5e-4,
                                                 lr_warmup_epochs=0, batch_size=64)}).check_files())
    rows.append(("teacher (full pool, labels)", int(len(y) / 10), teacher["test_acc"], None,
                 time.perf_counter() - start + prep_s))

    recipe = TrainRecipe(epochs=cfg.epochs, lr=0.05, lr_warmup_epochs=2)
    run_cfg = compose(RunConfig, {
        "pool": data / "digits_train.beton", "test": data / "digits_test.beton", "distilled": data / "distilled.beton",
        "teacher": out / "teacher.pt", "output_dir": out / "ccfs_run", "score_path": out / "forgetting.npy",
        "image_per_class": cfg.image_per_class, "alpha": cfg.alpha, "temperature": 4.0, "num_eval": cfg.num_eval,
        "filter_model": cfg.model, "teacher_model": cfg.model, "eval_model": cfg.model, "seed": cfg.seed,
        "workers": cfg.workers}, recipe=recipe).check_files()
    start = time.perf_counter()
    state = run_curriculum(run_cfg, overwrite=True)
    rows.append(("CCFS (distilled + selected)", cfg.image_per_class, state["final"]["acc_mean"],
                 state["final"]["acc_std"], time.perf_counter() - start))

    ws = open_workspace(run_cfg.inputs, cpc, run_cfg.machine)
    rng = np.random.default_rng(cfg.seed)
    spc = cfg.image_per_class - cpc
    random_pick = np.concatenate([rng.choice(np.flatnonzero(ws.pool_labels == c), spc, replace=False)
                                  for c in range(10)])
    for name, ipc, evaluate in (
        ("random real (distilled + random)", cfg.image_per_class,
         lambda: evaluate_selection(ws, random_pick, cfg.model, recipe, 4.0, cfg.num_eval, cfg.seed,
                                    label="random real")),
        ("distilled only (k-means)", cpc,
         lambda: evaluate_selection(ws, np.zeros(0, np.int64), cfg.model, recipe, 4.0, cfg.num_eval, cfg.seed,
                                    label="distilled only")),
        ("full pool", int(len(y) / 10),
         lambda: evaluate_train_set(ws, np.arange(ws.space.n_pool), cfg.model, recipe, 4.0, 1, cfg.seed,
                                    label="full pool")),
    ):
        start = time.perf_counter()
        result = evaluate()
        rows.append((name, ipc, result["acc_mean"], result["acc_std"], time.perf_counter() - start))
    table = format_table(["method", "images/class", "acc mean %", "acc std", "seconds"],
                         [(m, i, f"{a:.2f}", "-" if s is None else f"{s:.2f}", t) for m, i, a, s, t in rows])
    write_text(out / "demo_table.txt", table + "\n")
    print(table)
    print(f"outputs: {out}/ (demo_table.txt, teacher.pt, forgetting.npy, data/ with the .beton files)")
    print(f"the CCFS run: {out / 'ccfs_run'}/ (report.png, selection.png, metrics.json, selected_indices.json, "
          "curves.csv)")
    return rows
