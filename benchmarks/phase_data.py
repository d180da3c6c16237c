"""The inputs of `bench phase`: its spec, and generated pools of learnable class structure in .beton files
and the paper side's arrays, a distilled set, scores and a teacher (trained, or fitted for large models)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    name: str
    pool: int
    test: int
    side: int
    classes: int
    ipc: int

@dataclass(frozen=True)
class BenchSpec:
    """Everything a worker process needs (written as JSON for it)."""

    root: str
    shape: dict
    model: str = "convnet_tiny"
    epochs: int = 10
    alpha: float = 0.2
    curricula: int = 2
    temperature: float = 4.0
    workers: int = 2
    seed: int = 0


def class_images(n: int, classes: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, side, side, 3]: a class-specific colour and stripe frequency plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    palette = np.random.default_rng(99).integers(60, 196, (classes, 3))
    freq = 1 + np.arange(classes) % 5
    out = np.empty((n, side, side, 3), np.uint8)
    ramp = np.arange(side)[None, :]
    for start in range(0, n, 4096):
        lab = labels[start:start + 4096]
        stripes = 40 * np.sin(ramp * freq[lab][:, None] * np.pi / side)[:, None, :, None]
        noise = rng.normal(0, 40, (len(lab), side, side, 3))
        out[start:start + 4096] = np.clip(palette[lab][:, None, None, :] + stripes + noise, 0, 255)
    return out, labels.astype(np.int64)

def prepare(spec: BenchSpec) -> dict:
    """Writes the raw arrays, a distilled PNG folder, the .beton files, a teacher and scores."""
    from PIL import Image

    from beton_builder.build import BuildConfig, build
    from beton_builder.table import ImageTable
    from beton_builder.writer import write_beton
    from ccfs_fast.runs.config import TeacherConfig
    from ccfs_fast.runs.teacher import train_teacher
    from ccfs_fast.train.recipe import TrainRecipe
    from ccfs_fast.train.settings import compose

    shape, root = Shape(**spec.shape), Path(spec.root)
    pool_x, pool_y = class_images(shape.pool, shape.classes, shape.side, 1)
    test_x, test_y = class_images(shape.test, shape.classes, shape.side, 2)
    np.save(root / "pool_x.npy", pool_x)
    np.save(root / "pool_y.npy", pool_y)
    np.save(root / "test_x.npy", test_x)
    np.save(root / "test_y.npy", test_y)
    cpc = int(shape.ipc * spec.alpha + 1e-9)
    dx, _ = class_images(cpc * shape.classes, shape.classes, shape.side, 3)
    for c in range(shape.classes):
        (root / "distilled" / f"{c:04d}").mkdir(parents=True, exist_ok=True)
        for k in range(cpc):
            Image.fromarray(dx[c * cpc + k]).save(root / "distilled" / f"{c:04d}" / f"{k:03d}.png")
    names = tuple(str(c) for c in range(shape.classes))
    start = time.perf_counter()
    write_beton(ImageTable(pool_x, pool_y, names, "arrays", "bench"), root / "pool.beton", True, spec.workers)
    write_beton(ImageTable(test_x, test_y, names, "arrays", "bench"), root / "test.beton", True, spec.workers)
    build(BuildConfig("folder", root / "distilled", root / "distilled.beton", overwrite=True, workers=spec.workers))
    build_s = time.perf_counter() - start
    if spec.model in SMALL_MODELS:
        teacher = train_teacher(compose(TeacherConfig, dict(
            pool=root / "pool.beton", test=root / "test.beton", output=root / "teacher.pt", model=spec.model,
            overwrite=True, recipe=TrainRecipe(epochs=2, lr=0.05, lr_warmup_epochs=0, batch_size=256),
            workers=spec.workers)))
        teacher_acc = teacher["test_acc"]
    else:
        teacher_acc = fitted_teacher(spec, pool_x, pool_y, test_x, test_y, root / "teacher.pt")
    scores = (np.random.default_rng(4).integers(0, 20, shape.pool) * 0.2).astype(np.float32)
    np.save(root / "scores.npy", scores)
    return {"build_s": build_s, "teacher_acc": teacher_acc}

SMALL_MODELS = ("convnet_tiny", "convnet_small", "convnet")

def fitted_teacher(spec: BenchSpec, pool_x: np.ndarray, pool_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   out: Path, fit_images: int = 1000) -> float:
    """A teacher of a large model made in seconds on a CPU: BatchNorm statistics from train-mode
    passes and the classifier head fitted on `fit_images` pool images (forward passes only), saved
    with its arch and normalisation as `ccfs-fast teacher` saves one. Returns its test top-1 (%)."""
    import torch

    from beton_builder.manifest import read_manifest
    from ccfs_fast.data.normalization import Normalization
    from ccfs_fast.train.models import create_model, save_checkpoint

    shape = Shape(**spec.shape)
    manifest = read_manifest(Path(spec.root) / "pool.beton")
    mean = torch.tensor(manifest.mean).view(1, 3, 1, 1)
    std = torch.tensor(manifest.std).view(1, 3, 1, 1)

    def tensors(x):
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std

    torch.manual_seed(spec.seed)
    model = create_model(spec.model, shape.classes, shape.side)
    images, labels = tensors(pool_x[:fit_images]), torch.from_numpy(pool_y[:fit_images])
    model.train()
    with torch.no_grad():
        for part in images.split(100):
            model(part)
    model.eval()
    head = model.fc
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        features = torch.cat([model(part) for part in images.split(100)])
    model.fc = head
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    with torch.no_grad():
        test = tensors(test_x[:1000])
        acc = float((torch.cat([model(p) for p in test.split(100)]).argmax(1).numpy() == test_y[:1000]).mean() * 100)
    norm = Normalization(tuple(manifest.mean), tuple(manifest.std), "pool")
    save_checkpoint(model, out, arch=spec.model, normalize=norm.to_json())
    return acc
