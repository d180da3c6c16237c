"""Students trained by knowledge distillation on an index subset of a run's workspace: a phase's
filter (one model) and the final evaluation's `num_eval` models, fused into one bank when they can be
(design §6) and trained one after another otherwise. Every training runs the capturable step of
ccfs_fast.step (CUDA graphs on CUDA); under torchrun the students are wrapped in DDP and each rank
takes a strided share of every epoch."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .config import TrainRecipe
from .data import norm_tensors
from .datasets import auto_batch_size
from .errors import ModelError
from .fused import FusedBank, check_fused
from .kernels import swap_cpu_kernels
from .models import create_model
from .step import KDStep, Single, StepConfig, StepRun, graph_plan, train_students
from .train import TrainResult, last_fifth_epochs
from .workspace import Workspace


def phase_seed(seed: int, phase: int) -> int:
    """Each phase draws from its own seed, so a resumed run repeats the phases it redoes exactly."""
    return seed * 1009 + phase


def eval_seed(seed: int, run: int) -> int:
    return seed * 1009 + 500 + run


@dataclass
class Trained:
    """The outcome of training M students together: the plain models, one TrainResult each, the batch
    size (whole job, before splitting across ranks) and how the step ran."""

    models: list[nn.Module]
    results: list[TrainResult]
    batch_size: int
    run: StepRun


def _fresh(ws: Workspace, model_name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = swap_cpu_kernels(create_model(model_name, ws.num_classes, ws.side)).to(ws.device)
    return model.to(memory_format=torch.channels_last) if ws.fast.channels_last else model


def _students(ws: Workspace, model_name: str, seeds: list[int], fuse: bool) -> tuple[nn.Module, list[nn.Module]]:
    """(students module, the models) for `seeds`: a FusedBank when `fuse` and it reproduces its
    models, else Single (one seed). Raises ModelError when fusion is not possible."""
    models = [_fresh(ws, model_name, s) for s in seeds]
    if not fuse:
        return Single(models[0], bool(ws.fast.channels_last)), models
    bank = FusedBank(models, bool(ws.fast.channels_last))
    check_fused(bank, models, ws.side)
    return bank, models


def train_together(ws: Workspace, indices: np.ndarray, model_name: str, recipe: TrainRecipe, temperature: float,
                   seeds: list[int], eval_epoch: Callable[[int], bool], desc: str, resident: tuple | None = None,
                   fuse: bool = False) -> Trained:
    """len(seeds) fresh `model_name` students (fused when `fuse`, else exactly one seed) trained by KD
    on the index subset `indices`; each starts from torch.manual_seed(seed) and draws its data order
    and augmentation from a generator seeded with it. Seconds include reading the train set (pass
    `resident` to reuse one read)."""
    start = time.perf_counter()
    batch_size = recipe.batch_size or auto_batch_size(len(indices), ws.num_classes, ws.dataset)
    students, models = _students(ws, model_name, seeds, fuse)
    trained = students
    if ws.dist.enabled:
        trained = DistributedDataParallel(students, device_ids=[ws.device.index] if ws.device.type == "cuda" else None)
    if ws.fast.compile:
        trained = torch.compile(trained)
    images = (resident if resident is not None else ws.resident(indices))[0]
    inv_std255, shift = norm_tensors(ws.norm, ws.device)
    generators = [torch.Generator(device=ws.device).manual_seed(s) for s in seeds]
    cfg = StepConfig(recipe, temperature, fused_optimizer=bool(ws.fast.fused_optimizer),
                     channels_last=bool(ws.fast.channels_last), bf16=bool(ws.fast.bf16),
                     teacher_channels_last=bool(ws.fast.infer_channels_last))
    step = KDStep(students, trained, ws.teacher, images, generators, inv_std255, shift, cfg)
    plan = graph_plan(step, bool(ws.fast.cuda_graphs), ws.dist.enabled, bool(ws.fast.compile))
    results, plan = train_students(step, seeds, max(1, batch_size // ws.dist.world_size), recipe, ws.test_loader(),
                                   eval_epoch, desc, ws.dist.rank, ws.dist.world_size, plan)
    if isinstance(students, FusedBank):
        models = [students.model(m) for m in range(students.count)]
    seconds = time.perf_counter() - start
    for result in results:
        result.seconds = seconds
    return Trained(models, results, batch_size, plan)


def train_model(ws: Workspace, indices: np.ndarray, model_name: str, recipe: TrainRecipe, temperature: float,
                seed: int, eval_epoch: Callable[[int], bool], desc: str,
                resident: tuple | None = None) -> tuple[nn.Module, TrainResult, int]:
    """One fresh `model_name` trained by KD on `indices` (a phase's filter): (model, result, batch size)."""
    out = train_together(ws, indices, model_name, recipe, temperature, [seed], eval_epoch, desc, resident)
    return out.models[0], out.results[0], out.batch_size


def evaluate_train_set(ws: Workspace, train_set: np.ndarray, eval_model: str, recipe: TrainRecipe,
                       temperature: float, num_eval: int, seed: int, fuse: bool = True) -> dict:
    """num_eval fresh models trained by KD on the index subset `train_set`; the paper's protocol:
    each run's best test top-1 over the epochs after 80% of training (and its last). With `fuse` the
    models train as one fused bank (the same numbers up to float rounding), falling back to one after
    another, with a printed note, when the architecture cannot be fused."""
    seeds = [eval_seed(seed, run) for run in range(num_eval)]
    resident = ws.resident(train_set) if num_eval else None  # one read for every evaluation run
    epochs = last_fifth_epochs(recipe.epochs)
    results: list[TrainResult] = []
    fused = fuse and num_eval > 1
    if fused:
        try:
            results = train_together(ws, train_set, eval_model, recipe, temperature, seeds, epochs,
                                     f"final evaluation ({num_eval} fused models)", resident, fuse=True).results
        except ModelError as exc:
            tqdm.write(f"note: {exc}; training the {num_eval} evaluation models one after another")
            fused = False
    if not fused:
        for run in tqdm(range(num_eval), desc="final evaluation", dynamic_ncols=True, leave=False):
            results += train_together(ws, train_set, eval_model, recipe, temperature, [seeds[run]], epochs,
                                      f"eval {run + 1}/{num_eval}", resident).results
    best = [r.best_acc for r in results]
    return {"accs": best, "last_accs": [r.last_acc for r in results],
            "acc_mean": float(np.mean(best)) if best else None, "acc_std": float(np.std(best)) if best else None,
            "train_size": len(train_set), "seconds": [r.seconds for r in results], "fused": fused}


def evaluate_selection(ws: Workspace, selected: np.ndarray, eval_model: str, recipe: TrainRecipe,
                       temperature: float, num_eval: int, seed: int, fuse: bool = True) -> dict:
    """The final evaluation of design §1.5: train on distilled ∪ selected."""
    train_set = np.concatenate([ws.distilled_rows, np.asarray(selected, np.int64)])
    return evaluate_train_set(ws, train_set, eval_model, recipe, temperature, num_eval, seed, fuse)
