"""`ccfs-fast teacher`: supervised training on a pool .beton, optionally recording forgetting scores."""
from __future__ import annotations

import numpy as np
import torch

from .config import TeacherConfig
from .data import BetonFile, IndexSpace, ResidentTrainLoader, make_test_loader
from .models import create_model, save_checkpoint
from .outputs import write_npy
from .tables import format_table
from .train import ForgettingTracker, train_supervised
from .workspace import resolve_device


def train_teacher(cfg: TeacherConfig) -> dict:
    """Trains cfg.model on every pool image (RandomResizedCrop + flip), reports test top-1, saves
    {"model": state_dict, ...}; with forgetting_out, writes float32 [n] forgetting events in
    canonical pool order (never-learned images rank hardest)."""
    pool, test = BetonFile.open(cfg.pool), BetonFile.open(cfg.test)
    device = resolve_device(cfg.device)
    manifest = pool.manifest
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, manifest.num_classes, manifest.side).to(device)
    loader = ResidentTrainLoader(IndexSpace(pool), np.arange(pool.n), cfg.recipe.batch_size or 128, device,
                                 cfg.seed, cfg.workers)
    tracker = ForgettingTracker(pool.n) if cfg.forgetting_out else None
    result = train_supervised(model, loader, cfg.recipe, make_test_loader(test, manifest, 512, device, cfg.workers),
                              tracker, cfg.label_smoothing)
    save_checkpoint(model, cfg.output, arch=cfg.model, num_classes=manifest.num_classes, test_acc=result.last_acc,
                    epochs=cfg.recipe.epochs, pool_hash=manifest.content_hash)
    summary = {"model": cfg.model, "epochs": cfg.recipe.epochs, "test_acc": result.last_acc,
               "best_acc": result.best_acc, "train_s": result.seconds, "img_per_s": result.img_per_s}
    if tracker is not None:
        scores = tracker.scores()
        write_npy(cfg.forgetting_out, scores)
        summary["forgetting_mean"] = float(scores.mean())
    print(format_table(list(summary), [list(summary.values())]))
    return summary
