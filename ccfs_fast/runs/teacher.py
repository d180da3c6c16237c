"""`ccfs-fast teacher`: supervised training on a pool .beton, optionally recording forgetting scores."""
from __future__ import annotations

import sys

import numpy as np
import torch

from beton_builder.base.errors import ConfigError
from beton_builder.base.files import ensure_writable, write_npy
from beton_builder.base.tables import format_table
from beton_builder.beton import BetonFile
from ccfs_fast.data.datasets import auto_batch_size
from ccfs_fast.data.loaders import make_test_loader
from ccfs_fast.data.normalization import parse_normalize, resolve_normalization
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.runs.config import TeacherConfig
from ccfs_fast.runs.curves import CurveLog
from ccfs_fast.runs.workspace import resolve_device
from ccfs_fast.selection.difficulty import ForgettingTracker
from ccfs_fast.train.cpu_kernels import swap_cpu_kernels
from ccfs_fast.train.distributed import barrier, init_distributed
from ccfs_fast.train.models import create_model, save_checkpoint, stem_warning
from ccfs_fast.train.supervised import train_supervised


def train_teacher(cfg: TeacherConfig) -> dict:
    """Trains cfg.model on every pool image (RandomResizedCrop + flip), reports test top-1, saves
    {"model": state_dict, ...}; with forgetting_out, writes float32 [n] forgetting events in
    canonical pool order (never-learned images rank hardest). Under torchrun: DDP, every rank a
    share of each epoch, forgetting presentations gathered, rank 0 writing the files."""
    dist_ctx, device_name = init_distributed(cfg.machine.device)
    if dist_ctx.is_main:
        for note in cfg.notes:
            print(note, flush=True)
        ensure_writable(cfg.output, "--output")  # before training, not after it
        if cfg.forgetting_out is not None:
            ensure_writable(cfg.forgetting_out, "--forgetting-out")
    pool, test = BetonFile.open(cfg.inputs.pool), BetonFile.open(cfg.inputs.test)
    pm = pool.manifest
    norm = resolve_normalization(parse_normalize(cfg.inputs.normalize), pm.dataset, tuple(pm.mean), tuple(pm.std),
                                 str(pool.path))
    device = resolve_device(device_name)
    fast = cfg.fast.resolve(device_name)
    torch.backends.cudnn.benchmark = bool(fast.cudnn_benchmark)
    manifest = pool.manifest
    space = IndexSpace(pool, norm=norm, side=cfg.inputs.train_side)
    need = pool.n * 3 * space.side ** 2
    if manifest.variable_size and need > 8 << 30:
        raise ConfigError(f"`ccfs-fast teacher` holds the whole pool resident: {pool.n} images at {space.side}x"
                          f"{space.side} need {need / 2**30:.1f} GiB; use a torchvision ImageNet weights file as the "
                          "teacher (e.g. resnet18-f37072fd.pth) or lower --train-side")
    warning = stem_warning(cfg.model, space.side)
    if warning and dist_ctx.is_main:
        print(warning, file=sys.stderr)
    torch.manual_seed(cfg.machine.seed)
    model = swap_cpu_kernels(create_model(cfg.model, manifest.num_classes, space.side)).to(device)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = cfg.recipe.batch_size or auto_batch_size(pool.n, manifest.num_classes, manifest.dataset)
    tracker = ForgettingTracker(pool.n) if cfg.forgetting_out else None
    test_loader = make_test_loader(test, manifest.num_classes, norm, 256, device, cfg.machine.workers,
                                   bool(fast.infer_channels_last), space.side if space.variable else None)
    curves = None
    if dist_ctx.is_main:
        curves = CurveLog(cfg.curves_path, cfg.output.with_suffix(".tb"), set(), cfg.tensorboard)
    result = train_supervised(model, space, np.arange(pool.n), max(1, batch_size // dist_ctx.world_size), cfg.recipe,
                              fast, device, cfg.machine.seed, cfg.machine.workers, test_loader, cfg.label_smoothing,
                              tracker, dist_ctx, curves.training("teacher", 1) if curves is not None else None)
    if curves is not None:
        curves.close()
    summary = {"model": cfg.model, "epochs": cfg.recipe.epochs, "batch_size": batch_size, "normalize": norm.source,
               "test_acc": result.last_acc,
               "best_acc": result.best_acc, "train_s": result.seconds,
               "img_per_s": result.img_per_s * dist_ctx.world_size}
    if dist_ctx.is_main:
        save_checkpoint(model, cfg.output, arch=cfg.model, num_classes=manifest.num_classes, test_acc=result.last_acc,
                        epochs=cfg.recipe.epochs, pool_hash=manifest.content_hash, normalize=norm.to_json(),
                        side=space.side, dataset=manifest.dataset)
        if tracker is not None:
            scores = tracker.scores()
            write_npy(cfg.forgetting_out, scores)
            summary["forgetting_mean"] = float(scores.mean())
        print(format_table(list(summary), [list(summary.values())]))
    barrier(dist_ctx)
    return summary
