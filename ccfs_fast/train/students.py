"""Students trained by knowledge distillation on an index subset of a TrainContext (what a run's workspace
offers, and all that training needs of it): a phase's
filter (one model) and the final evaluation's `num_eval` models, fused into one bank when they can be
(docs/design.md §4) and trained one after another otherwise. Every training runs the capturable step of
ccfs_fast.train.step (CUDA graphs on CUDA); under torchrun the students are wrapped in DDP and each rank
takes a strided share of every epoch."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from beton_builder.base.errors import ModelError, UnknownNameError, one_line
from ccfs_fast.data.datasets import auto_batch_size
from ccfs_fast.data.loaders import norm_tensors
from ccfs_fast.data.normalization import Normalization
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.train.bank import FusedBank, check_fused
from ccfs_fast.train.cpu_kernels import swap_cpu_kernels
from ccfs_fast.train.distributed import DistContext
from ccfs_fast.train.graphs import GraphedStep, StepRun, graph_plan
from ccfs_fast.train.loop import TrainResult, last_fifth_epochs, sync, train_students
from ccfs_fast.train.models import create_model
from ccfs_fast.train.predict import predict_logits
from ccfs_fast.train.recipe import FastPath, TrainRecipe
from ccfs_fast.train.step import Separate, Single, StepConfig, StreamedTrainStep, TrainStep


class Curves(Protocol):
    """Where trainings record their per-epoch curves (the run's CurveLog)."""

    def training(self, name: str, models: int) -> Callable[[int, dict], None]: ...


class TrainContext(Protocol):
    """What training students on an index subset needs: the index space and its normalisation, the
    teacher, the device, the fast path, the process group, where curves go, the test set, and how a
    train set of n images is read (resident or streamed). A run's Workspace is one."""

    space: IndexSpace
    teacher: nn.Module
    device: torch.device
    workers: int
    dist: DistContext
    fast: FastPath
    curves: Curves | None
    distilled_rows: np.ndarray

    @property
    def num_classes(self) -> int: ...

    @property
    def side(self) -> int: ...

    @property
    def dataset(self) -> str | None: ...

    @property
    def norm(self) -> Normalization: ...

    def resident(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def train_form(self, n: int) -> tuple[bool, str]: ...

    def test_loader(self) -> object: ...

    def pool_loader(self, indices: np.ndarray) -> object: ...


FINAL_CURVE = "final evaluation"  # the final evaluation's name in the run's curves


def filter_curve(phase: int) -> str:
    """A curriculum's filter's name in the run's curves."""
    return f"filter {phase}"


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


def _fresh(ws: TrainContext, model_name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = swap_cpu_kernels(create_model(model_name, ws.num_classes, ws.side)).to(ws.device)
    return model.to(memory_format=torch.channels_last) if ws.fast.channels_last else model


def _bank(models: list[nn.Module], channels_last: bool, side: int) -> FusedBank:
    bank = FusedBank(models, channels_last)
    check_fused(bank, models, side)
    return bank


# How M evaluation models train together (docs/design.md §4): one fused network in either memory layout, or
# M separate networks whose forwards and backwards run on M CUDA streams inside one graph. All give
# each model what it would compute alone; which is fastest depends on the device (grouped convolutions
# in channels-last fall onto slow cuDNN kernels on some GPUs), so CUDA runs a short probe.
# Each entry: (models, image side, the run's training layout is channels-last) -> students module.
BANK_LAYOUTS: dict[str, Callable[[list[nn.Module], int, bool], nn.Module]] = {
    "bank_nchw": lambda models, side, channels_last: _bank(models, False, side),
    "bank_channels_last": lambda models, side, channels_last: _bank(models, True, side),
    "streams": lambda models, side, channels_last: Separate(models, channels_last),
}


def default_layout(ws: TrainContext) -> str:
    """The bank's layout without a probe: the fused bank in the run's training layout."""
    return "bank_channels_last" if ws.fast.channels_last else "bank_nchw"


def _students(ws: TrainContext, model_name: str, seeds: list[int], layout: str | None
              ) -> tuple[nn.Module, list[nn.Module]]:
    """(students module, the models) for `seeds`: one of BANK_LAYOUTS, or Single (one seed) when
    `layout` is None. Raises ModelError when the layout cannot hold the models (e.g. no fusion)."""
    models = [_fresh(ws, model_name, s) for s in seeds]
    if layout is None:
        return Single(models[0], bool(ws.fast.channels_last)), models
    if layout not in BANK_LAYOUTS:
        raise UnknownNameError("bank layout", layout, list(BANK_LAYOUTS))
    return BANK_LAYOUTS[layout](models, ws.side, bool(ws.fast.channels_last)), models


def train_together(ws: TrainContext, indices: np.ndarray, model_name: str, recipe: TrainRecipe, temperature: float,
                   seeds: list[int], eval_epoch: Callable[[int], bool], desc: str, resident: tuple | None = None,
                   layout: str | None = None, curve: str | None = None, labels: str = "teacher",
                   targets: torch.Tensor | None = None) -> Trained:
    """len(seeds) fresh `model_name` students (together in `layout`, one of BANK_LAYOUTS, else exactly
    one seed) trained on the index subset `indices` under the label regime `labels` (OBJECTIVE_OF:
    teacher, KD from the live teacher; hard, cross-entropy on the labels; soft, KD against each image's
    soft label fixed once, `targets` or computed here: soft_targets); each starts from
    torch.manual_seed(seed) and draws its data order and augmentation from a generator seeded with it.
    Seconds include reading the train set (pass `resident` to reuse one read). `curve`: the training's
    name in the run's curves (ws.curves), one row per epoch per model as it trains (default: `desc`)."""
    start = time.perf_counter()
    batch_size = recipe.batch_size or auto_batch_size(len(indices), ws.num_classes, ws.dataset)
    students, models = _students(ws, model_name, seeds, layout)
    trained = students
    if ws.dist.enabled:
        trained = DistributedDataParallel(students, device_ids=[ws.device.index] if ws.device.type == "cuda" else None)
    if ws.fast.compile:
        trained = torch.compile(trained)
    streamed, form = ws.train_form(len(indices))
    if ws.space.variable and ws.dist.is_main:  # images of varying size: say how this train set is read
        tqdm.write(f"{desc}: train set {form}", file=sys.stderr)
    if not streamed:
        resident = resident if resident is not None else ws.resident(indices)
    if labels == "soft" and targets is None:
        targets = soft_targets(ws, indices)
    step = _make_step(ws, students, trained, None if streamed else resident, indices, seeds, recipe, temperature,
                      labels, targets)
    plan = graph_plan(step, bool(ws.fast.cuda_graphs), ws.dist.enabled, bool(ws.fast.compile))
    plan.train_data = form
    on_epoch = ws.curves.training(curve or desc, len(seeds)) if ws.curves is not None else None
    results, plan = train_students(step, seeds, max(1, batch_size // ws.dist.world_size), recipe, ws.test_loader(),
                                   eval_epoch, desc, ws.dist.rank, ws.dist.world_size, plan, on_epoch=on_epoch)
    if isinstance(students, FusedBank):
        models = [students.model(m) for m in range(students.count)]
    seconds = time.perf_counter() - start
    for result in results:
        result.seconds = seconds
    return Trained(models, results, batch_size, plan)


def _make_step(ws: TrainContext, students: nn.Module, trained: nn.Module, resident: tuple | None, indices: np.ndarray,
               seeds: list[int], recipe: TrainRecipe, temperature: float, labels: str = "teacher",
               targets: torch.Tensor | None = None) -> TrainStep:
    """The step of `students` over the train set `indices` under the label regime `labels`, one
    generator per seed: over its resident (images, labels, index) when given, else streamed
    (StreamedTrainStep)."""
    inv_std255, shift = norm_tensors(ws.norm, ws.device)
    generators = [torch.Generator(device=ws.device).manual_seed(s) for s in seeds]
    cfg = StepConfig(recipe, temperature, objective=OBJECTIVE_OF[labels], fused_optimizer=bool(ws.fast.fused_optimizer),
                     channels_last=bool(ws.fast.channels_last), bf16=bool(ws.fast.bf16),
                     teacher_channels_last=bool(ws.fast.infer_channels_last))
    if resident is None:
        return StreamedTrainStep(students, trained, ws.teacher, ws.space, indices, ws.device, generators, inv_std255,
                                 shift, cfg, ws.workers, targets)
    return TrainStep(students, trained, ws.teacher, resident[0], generators, inv_std255, shift, cfg,
                     ws.space.crop_sizes(resident[2]), resident[1], resident[2], targets)


# A label regime (an evaluation's --labels) -> the step's objective (train.losses.OBJECTIVES).
OBJECTIVE_OF = {"teacher": "kd", "hard": "hard", "soft": "soft"}


def soft_targets(ws: TrainContext, indices: np.ndarray) -> torch.Tensor:
    """float32 [len(indices), C] on the device: the teacher's logits of each image of `indices`,
    unaugmented (its evaluation view), in `indices` order: each image's soft label, fixed once."""
    wanted = np.asarray(indices, np.int64)
    index, logits = predict_logits(ws.teacher, ws.pool_loader(wanted), ws.fast)  # pool rows first, then distilled
    order = np.argsort(index)
    position = order[np.searchsorted(index[order], wanted)]
    return logits[torch.from_numpy(position).to(logits.device)].to(ws.device)


def probe_layouts(ws: TrainContext, resident: tuple, model_name: str, recipe: TrainRecipe, temperature: float,
                  seeds: list[int], batch_size: int, steps: int = 6) -> dict[str, dict]:
    """Times each of BANK_LAYOUTS for a few steps on throwaway students (the training that follows
    starts afresh, so the probe changes no number): {layout: {"step_ms", "cuda_graphs"} or {"error"}}.
    `resident`: the train set's (images, labels, index) (Workspace.resident)."""
    figures: dict[str, dict] = {}
    images = resident[0]
    for layout in BANK_LAYOUTS:
        try:
            students, _ = _students(ws, model_name, seeds, layout)
            step = _make_step(ws, students, students, resident, resident[2].cpu().numpy(), seeds, recipe, temperature)
            graphs = graph_plan(step, bool(ws.fast.cuda_graphs), ws.dist.enabled, bool(ws.fast.compile)).cuda_graphs
            runner = GraphedStep(step, [batch_size], seeds) if graphs else step
            rows = torch.randint(0, images.shape[0], (steps + 2, len(seeds), batch_size), device=ws.device,
                                 generator=torch.Generator(device=ws.device).manual_seed(0))
            students.train()
            for k in range(2):  # cuDNN autotuning and first-call costs are not timed
                runner(rows[k])
            sync(ws.device)
            start = time.perf_counter()
            for k in range(2, steps + 2):
                runner(rows[k])
            sync(ws.device)
            figures[layout] = {"step_ms": (time.perf_counter() - start) / steps * 1000, "cuda_graphs": graphs}
        except (ModelError, RuntimeError) as exc:
            figures[layout] = {"error": one_line(exc)}
        finally:
            if ws.device.type == "cuda":
                torch.cuda.empty_cache()
    return figures


def pick_layout(ws: TrainContext, resident: tuple | None, model_name: str, recipe: TrainRecipe, temperature: float,
                seeds: list[int], batch_size: int) -> tuple[str, dict | None]:
    """The bank's layout: on one CUDA device, the fastest of a short probe (probe_layouts, logged in
    one line); elsewhere default_layout without a probe. Returns (layout, the probe's figures)."""
    if ws.device.type != "cuda" or ws.dist.enabled or resident is None:  # None: a streamed train set
        return default_layout(ws), None
    figures = probe_layouts(ws, resident, model_name, recipe, temperature, seeds, batch_size)
    timed = {k: v["step_ms"] for k, v in figures.items() if "step_ms" in v}
    layout = min(timed, key=timed.get) if timed else default_layout(ws)
    shown = ", ".join(f"{k} {v:.1f} ms" for k, v in timed.items())
    tqdm.write(f"final evaluation: {layout} chosen by a probe of {len(seeds)} models at batch {batch_size} ({shown})",
               file=sys.stderr)
    return layout, figures


def train_model(ws: TrainContext, indices: np.ndarray, model_name: str, recipe: TrainRecipe, temperature: float,
                seed: int, eval_epoch: Callable[[int], bool], desc: str, resident: tuple | None = None,
                curve: str | None = None) -> tuple[nn.Module, TrainResult, int, StepRun]:
    """One fresh `model_name` trained by KD on `indices` (a phase's filter): (model, result, batch size,
    how its step ran)."""
    out = train_together(ws, indices, model_name, recipe, temperature, [seed], eval_epoch, desc, resident,
                         curve=curve)
    return out.models[0], out.results[0], out.batch_size, out.run


def evaluate_train_set(ws: TrainContext, train_set: np.ndarray, eval_model: str, recipe: TrainRecipe,
                       temperature: float, num_eval: int, seed: int, fuse: bool = True,
                       label: str = "final evaluation", labels: str = "teacher") -> dict:
    """num_eval fresh models trained on the index subset `train_set` under the label regime `labels`
    (teacher: KD from the live teacher, the paper's; hard; soft: see train_together); the paper's
    protocol: each run's best test top-1 over the epochs after 80% of training (and its last). With
    `fuse` the models train as one fused bank (the same numbers up to float rounding), falling back to
    one after another, with a printed note, when the architecture cannot be fused. `label` names the
    progress bars (what is being evaluated)."""
    seeds = [eval_seed(seed, run) for run in range(num_eval)]
    targets = soft_targets(ws, train_set) if labels == "soft" and num_eval else None  # once for every model
    streamed = ws.train_form(len(train_set))[0]
    resident = ws.resident(train_set) if num_eval and not streamed else None  # one read for every evaluation run
    epochs = last_fifth_epochs(recipe.epochs)
    results: list[TrainResult] = []
    fused = fuse and num_eval > 1
    bank_off = None if fused else ("bank: off (--no-fuse-evals)" if num_eval > 1 else
                                   f"bank: {num_eval} evaluation model{'s' if num_eval != 1 else ''}")
    runs: list[StepRun] = []
    layout, probe = None, None
    if fused:
        try:
            batch_size = recipe.batch_size or auto_batch_size(len(train_set), ws.num_classes, ws.dataset)
            layout, probe = pick_layout(ws, resident, eval_model, recipe, temperature, seeds,
                                        max(1, batch_size // ws.dist.world_size))
            together = train_together(ws, train_set, eval_model, recipe, temperature, seeds, epochs,
                                      f"{label} ({num_eval} models, {layout})", resident, layout=layout,
                                      curve=FINAL_CURVE, labels=labels, targets=targets)
            results, runs = together.results, [together.run]
        except ModelError as exc:
            bank_off = f"bank: {exc}; training the {num_eval} evaluation models one after another"
            tqdm.write(f"note: {bank_off}", file=sys.stderr)
            fused = False
    if not fused:
        for run in tqdm(range(num_eval), desc=label, dynamic_ncols=True, leave=False):
            alone = train_together(ws, train_set, eval_model, recipe, temperature, [seeds[run]], epochs,
                                   f"{label}: model {run + 1}/{num_eval}", resident,
                                   curve=f"{FINAL_CURVE} model {run + 1}", labels=labels, targets=targets)
            results += alone.results
            runs.append(alone.run)
    best = [r.best_acc for r in results]
    execution = {"bank": fused, "bank_off": bank_off, "bank_fallback": fuse and num_eval > 1 and not fused,
                 "layout": layout if fused else None, "layout_probe": probe,
                 **(runs[0].record() if runs else {"cuda_graphs": False, "cuda_graphs_off": None, "fallback": False})}
    return {"accs": best, "last_accs": [r.last_acc for r in results],
            "acc_mean": float(np.mean(best)) if best else None, "acc_std": float(np.std(best)) if best else None,
            "train_size": len(train_set), "seconds": [r.seconds for r in results],
            "loop_s": [r.loop_s for r in results], "eval_s": [r.eval_s for r in results],
            "setup_s": [r.setup_s for r in results], "fused": fused,
            "batch_size": recipe.batch_size or auto_batch_size(len(train_set), ws.num_classes, ws.dataset),
            "labels": labels, "eval_model": eval_model, "execution": execution}


def evaluate_selection(ws: TrainContext, selected: np.ndarray, eval_model: str, recipe: TrainRecipe,
                       temperature: float, num_eval: int, seed: int, fuse: bool = True,
                       label: str = "final evaluation", labels: str = "teacher") -> dict:
    """The final evaluation of docs/design.md §1.1 step 5: train on distilled ∪ selected."""
    train_set = np.concatenate([ws.distilled_rows, np.asarray(selected, np.int64)])
    return evaluate_train_set(ws, train_set, eval_model, recipe, temperature, num_eval, seed, fuse, label, labels)
