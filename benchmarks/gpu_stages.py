"""The device check's stages, each run in its own child process by benchmarks/gpu_check.py (which
orchestrates them, keeps their rows and writes the JSON). A stage sends every figure to its row sink as
soon as it exists, so a stage stopped by its limit, an error or a failed capture keeps what it measured.

  exactness     CUDA graphs against eager steps (TF32 off, deterministic cuDNN, CUBLAS_WORKSPACE_CONFIG
                set by the parent), then a capture made to fail and the steps after it
  kd_fp32       one model's KD step eager and graphed at batch 32, 64 and 128 (interleaved pairs)
  kd_bank_fp32  5 models together (each layout) beside the same 5 graphed one after another, at 64 and 32
  data          CIFAR-shaped pool / test / distilled .beton files and scores (no CUDA)
  teacher       a resnet18 teacher, 2 epochs
  preset_fp32   the complete `run --preset cifar10-ipc500` at --preset-epochs, projected to 500
  kd_bf16       kd_fp32 at 64 and 128, and the bank at 64, in bf16
  preset_bf16   preset_fp32 with --bf16
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .stages import RowSink, result_path

PRESET = "cifar10-ipc500"
PRESET_EPOCHS = 8  # enough for the loop's rate: the projection scales the loop alone (set-up counted once)
TARGET_EPOCHS = 500
QUICK_RUN = {"image_per_class": 20, "alpha": 0.2, "filter_model": "convnet_tiny", "eval_model": "convnet_tiny",
             "num_eval": 2, "lr_warmup_epochs": 0}  # CPU-sized, same algorithm
QUICK_KD = {"model": "convnet_tiny", "side": 16}
EXACTNESS_STEPS = (1, 12)  # parameters compared after the first step and after the twelfth


def workers() -> int:
    from beton_builder.base.processes import available_cpus

    return min(8, available_cpus())


def files(root: Path) -> dict[str, Path]:
    """The inputs the stages share, by convention under the check's folder."""
    return {"pool": root / "pool.beton", "test": root / "test.beton", "distilled": root / "d.beton",
            "scores": root / "scores.npy", "teacher": root / "teacher.pt"}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stage_data(args: argparse.Namespace, sink: RowSink) -> dict:
    """CIFAR-shaped pool / test .beton files, a distilled folder of 50 images per class (5 with
    --quick) built with `build folder`, and a score file."""
    from PIL import Image

    from beton_builder.build import BuildConfig, build
    from beton_builder.table import ImageTable
    from beton_builder.writer import write_beton
    from ccfs_fast.runs.environment import environment

    from .phase_data import class_images

    root, paths = args.root, files(args.root)
    pool, test, per_class = (1000, 200, 5) if args.quick else (50_000, 10_000, 50)
    names = tuple(str(c) for c in range(10))
    for path, (n, seed) in ((paths["pool"], (pool, 1)), (paths["test"], (test, 2))):
        x, y = class_images(n, 10, 32, seed)
        write_beton(ImageTable(x, y, names, "arrays", "gpu_check"), path, True, workers())
    np.save(paths["scores"], (np.random.default_rng(0).integers(0, 20, pool) * 0.2).astype(np.float32))
    dx, _ = class_images(per_class * 10, 10, 32, 5)
    for c in range(10):
        (root / "distilled" / f"{c:02d}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(dx[c * per_class + k]).save(root / "distilled" / f"{c:02d}" / f"{k:03d}.png")
    build(BuildConfig("folder", root / "distilled", paths["distilled"], overwrite=True))
    return {"pool": pool, "test": test, "distilled_per_class": per_class, "environment": environment("cpu")}


def stage_teacher(args: argparse.Namespace, sink: RowSink) -> dict:
    from ccfs_fast.runs.config import TeacherConfig
    from ccfs_fast.runs.environment import environment
    from ccfs_fast.runs.teacher import train_teacher
    from ccfs_fast.train.recipe import TrainRecipe
    from ccfs_fast.train.settings import compose

    device = _device()
    start = time.perf_counter()
    model = "convnet_tiny" if args.quick else "resnet18"
    paths = files(args.root)
    out = train_teacher(compose(TeacherConfig, dict(
        pool=paths["pool"], test=paths["test"], output=paths["teacher"], model=model, device=device.type,
        recipe=TrainRecipe(epochs=1 if args.quick else 2, lr=0.1, lr_warmup_epochs=0, batch_size=512),
        workers=workers(), overwrite=True)))
    return {"model": model, "test_acc": out["test_acc"], "seconds": time.perf_counter() - start,
            "environment": environment(device.type)}


def stage_exactness(args: argparse.Namespace, sink: RowSink) -> dict:
    """Graph replay against eager steps with TF32 off and deterministic cuDNN (and cuBLAS, whose
    results are reproducible across streams only with CUBLAS_WORKSPACE_CONFIG, which the parent sets
    for this stage): the same resnet18 KD training (batch 64 and a partial batch of 40) eagerly twice and
    once through CUDA graphs. Passes when, after the first step and after the twelfth, graphs are no
    further from eager than eager is from eager (0 from 0 included). The verdict goes to the rows
    before the failure probe (capture_fallback), which runs last."""
    import torch

    from ccfs_fast.train.graphs import GraphedStep

    from .train_throughput import RESIDENT, bench_rows, make_step, timed_step

    device = _device()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    steps = max(EXACTNESS_STEPS)
    params: dict[str, dict[int, list]] = {}
    ms = {}
    for mode in ("eager_a", "eager_b", "graphs"):
        step = make_step(device, 1, seed=7)
        runner = GraphedStep(step, [64, 40], [7]) if mode == "graphs" else step
        step.students.train()
        rows = bench_rows(steps, 1, 64, RESIDENT, device, seed=1)
        seconds, params[mode] = 0.0, {}
        for k in range(steps):
            seconds += timed_step(step, runner, rows[k] if k % 4 else rows[k][:, :40])
            if k + 1 in EXACTNESS_STEPS:
                params[mode][k + 1] = [p.detach().double().clone() for p in step.students.parameters()]
        ms[mode] = seconds / steps * 1000
        sink({"mode": mode, "step_ms": ms[mode]})

    def gap(a: str, b: str, after: int) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(params[a][after], params[b][after]))

    after = {k: {"graphs_vs_eager": gap("graphs", "eager_a", k), "eager_vs_eager": gap("eager_b", "eager_a", k)}
             for k in EXACTNESS_STEPS}
    passed = all(g["graphs_vs_eager"] <= g["eager_vs_eager"] for g in after.values())
    verdict = {"after_steps": after, "passed": passed, "graphs_vs_eager": after[steps]["graphs_vs_eager"],
               "eager_vs_eager": after[steps]["eager_vs_eager"], "step_ms": ms,
               "criterion": "graphs no further from eager than eager from eager, after step 1 and step 12"}
    sink({"verdict": verdict})
    fallback = capture_fallback(make_step(device, 1, seed=3), make_step(device, 1, seed=4))
    sink({"capture_fallback": fallback})
    return {**verdict, "capture_fallback": fallback}


class _SyncsInCapture:
    """A KD step that reads a value back to the host while a capture is under way: the capture is
    invalidated (a synchronisation inside a capture), as an unsupported op would invalidate a real one."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name: str):
        return getattr(self.step, name)

    def __call__(self, rows):
        import torch

        losses = self.step(rows)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            float(losses.sum())  # not allowed while capturing: the capture fails
        return losses


def capture_fallback(step, after, steps: int = 30, capture=None) -> dict:
    """A capture of `step` made to fail, then what runs after a failed capture in a real run and in the
    benchmarks: `steps` eager steps of `step` (their rows drawn as the check draws them), then `after`
    (a second step, built beforehand) timed the way `bench train` times a step that asks for graphs.
    Holds when the capture raised CaptureFailed, nothing after it failed (no draw from a device's
    default generator: a failed capture may leave it capturing), the allocated memory stayed flat over
    the eager steps (CUDA), and `after` ran eagerly, saying why (graphs off for the process).
    `capture`: how to capture (default: CudaCapture; the CPU tests give one that fails)."""
    import torch

    from ccfs_fast.train.graphs import CaptureFailed, GraphedStep

    from .train_throughput import RESIDENT, bench_rows, step_seconds

    failed = None
    try:
        GraphedStep(_SyncsInCapture(step), [64], [3], capture)
    except CaptureFailed as exc:
        failed = str(exc)[:160]
    cuda = step.device.type == "cuda"
    rows = bench_rows(steps, 1, 64, RESIDENT, step.device, seed=2)
    step.students.train()
    allocated = []
    for k in range(steps):
        step(rows[k])
        if cuda:
            torch.cuda.synchronize(step.device)
            allocated.append(torch.cuda.memory_allocated(step.device))
    growth = allocated[-1] - allocated[steps // 3] if cuda else 0
    seconds, off = step_seconds(after, 64, graphs=True, warmup=1, repeats=3)
    return {"capture_failed": failed, "allocated_growth_bytes": int(growth), "steps": steps,
            "after_step_ms": seconds * 1000, "after_graphs_off": off,
            "held": failed is not None and growth <= 1 << 20 and off is not None}


def kd_groups(stage: str, quick: bool, cuda: bool) -> list[tuple[int, list[str]]]:
    """The (batch, modes) groups of a KD stage, each measured interleaved (train_throughput.measure_group):
    kd_fp32 graphs with eager at 32, 64 and 128; kd_bank_fp32 the 5 models together in every layout
    beside the single-model step (graphed on CUDA: their denominator) at 64, then 32; kd_bf16 both, in bf16."""
    from .train_throughput import LAYOUT_MODES

    single = ["eager", "graphs"] if cuda else ["eager"]
    together = [single[-1], *LAYOUT_MODES]
    if quick:
        return {"kd_fp32": [(8, single)], "kd_bank_fp32": [(8, together)], "kd_bf16": [(8, single)]}[stage]
    return {"kd_fp32": [(32, single), (64, single), (128, single)],
            "kd_bank_fp32": [(64, together), (32, together)],
            "kd_bf16": [(64, single), (128, single), (64, together)]}[stage]


def stage_kd(args: argparse.Namespace, sink: RowSink, stage: str) -> dict:
    """bench train's groups for `stage` with cudnn.benchmark on as real runs have it; rows streamed to the
    parent as each group is measured."""
    import torch

    from .train_throughput import measure, preset_trainings, project, targets

    device = _device()
    torch.backends.cudnn.benchmark = device.type == "cuda"
    precision = "bf16" if stage.endswith("bf16") else "fp32"
    rows = measure(device, kd_groups(stage, args.quick, device.type == "cuda"), 1 if args.quick else 3,
                   2 if args.quick else 15, (precision,), on_row=sink, **(QUICK_KD if args.quick else {}))
    return {"rows": rows, "targets": targets(rows, precision), "projection": project(rows, preset_trainings())}


def stage_preset(args: argparse.Namespace, sink: RowSink, bf16: bool) -> dict:
    """The complete `run --preset cifar10-ipc500` (every filter and the final evaluation) at
    --preset-epochs, in this process; per training how it ran and its parts, and the projection to
    500 epochs (preset_projection)."""
    import json

    from beton_builder.base.errors import CCFSError
    from ccfs_fast.api import run
    from ccfs_fast.runs.presets import make_run_config

    paths, out = files(args.root), preset_dir(args.root, bf16)
    settings = {"pool": paths["pool"], "test": paths["test"], "distilled": paths["distilled"],
                "teacher": paths["teacher"], "score_path": paths["scores"], "device": _device().type,
                "eval_batch_size": 1024, "workers": workers(), "output_dir": out, "epochs": args.preset_epochs,
                **(QUICK_RUN if args.quick else {}), **({"bf16": True} if bf16 else {})}
    start = time.perf_counter()
    try:
        run(make_run_config(preset=PRESET, **settings), overwrite=True, threads=workers())
        code = 0
    except CCFSError as exc:
        print(f"ccfs-fast: error: {exc}", flush=True)
        code = 2
    wall = time.perf_counter() - start
    state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else {"phases": []}
    return {"bf16": bf16, "exit_code": code, "wall_s": wall, **preset_projection(state, wall, args.preset_epochs),
            "final_execution": (state.get("final") or {}).get("execution"),
            "final_acc": (state.get("final") or {}).get("acc_mean")}


def preset_dir(root: Path, bf16: bool) -> Path:
    return root / f"preset_{'bf16' if bf16 else 'fp32'}"


def evaluated_epochs(epochs: int, rule: str) -> int:
    """How many epochs a training of `epochs` evaluates test accuracy on: the final evaluation's rule
    (the last fifth, train.last_fifth_epochs) or a filter's ('end': once; 'best_last_20': as the final)."""
    from ccfs_fast.train.loop import last_fifth_epochs

    return 1 if rule == "end" else sum(map(last_fifth_epochs(epochs), range(epochs)))


def preset_projection(state: dict, wall_s: float, epochs: int, target: int = TARGET_EPOCHS) -> dict:
    """Per training (each filter, the final evaluation) its set-up seconds (model builds, fusion check,
    resident read, capture and warm-up: paid once), loop seconds (its epochs' steps: scaled by
    target / epochs) and test-evaluation seconds (scaled by the evaluated epochs' ratio); the run's
    fixed costs (teacher pass, coarse passes, selection, reading the inputs) are wall_s less the
    trainings. Projected = fixed + sum of set-up + scaled loops + scaled evaluations; every part is
    returned. Complete only when every training finished."""
    trainings = [{"what": f"filter {p['phase']}", "seconds": p["train_s"], "setup_s": p.get("train_setup_s"),
                  "loop_s": p.get("train_loop_s"), "eval_s": p.get("train_eval_s"),
                  "evals": (evaluated_epochs(epochs, p.get("filter_acc_rule", "end")),
                            evaluated_epochs(target, p.get("filter_acc_rule", "end"))),
                  "batch_size": p.get("batch_size"), "train_size": p.get("train_size"),
                  "execution": p.get("execution")} for p in state.get("phases", [])]
    final = state.get("final") or {}
    if final.get("seconds"):
        together = final.get("fused")
        for m in range(1 if together else len(final["seconds"])):
            part = {k: (final.get(k) or [None] * (m + 1))[m] for k in ("setup_s", "loop_s", "eval_s")}
            trainings.append({"what": "final evaluation" + ("" if together else f" {m + 1}"),
                              "seconds": final["seconds"][m], **part,
                              "evals": (evaluated_epochs(epochs, "last_fifth"), evaluated_epochs(target, "last_fifth")),
                              "batch_size": final.get("batch_size"), "train_size": final.get("train_size"),
                              "execution": final.get("execution")})
    for t in trainings:
        parts = (t["setup_s"], t["loop_s"], t["eval_s"])
        t["projected_s"] = None if None in parts else \
            t["setup_s"] + t["loop_s"] * target / epochs + t["eval_s"] * t["evals"][1] / max(1, t["evals"][0])
    fixed = wall_s - sum(t["seconds"] for t in trainings)
    complete = bool(final.get("accs")) and all(t["projected_s"] is not None for t in trainings)
    projected = fixed + sum(t["projected_s"] for t in trainings) if complete else None
    return {"epochs": epochs, "target_epochs": target, "complete": complete, "trainings": trainings,
            "trainings_s": sum(t["seconds"] for t in trainings), "fixed_s": fixed,
            "projected_s": projected, "projected_min": None if projected is None else projected / 60}


STAGE_FNS: dict[str, Callable[[argparse.Namespace, RowSink], dict]] = {
    "exactness": stage_exactness,
    "kd_fp32": lambda args, sink: stage_kd(args, sink, "kd_fp32"),
    "kd_bank_fp32": lambda args, sink: stage_kd(args, sink, "kd_bank_fp32"),
    "data": stage_data,
    "teacher": stage_teacher,
    "preset_fp32": lambda args, sink: stage_preset(args, sink, False),
    "kd_bf16": lambda args, sink: stage_kd(args, sink, "kd_bf16"),
    "preset_bf16": lambda args, sink: stage_preset(args, sink, True),
}


class HangAfterFirstRow:
    """--hang-stage: the stage stops answering after its first row, as a hung CUDA call would (tests
    that a stage stopped by its limit keeps its rows)."""

    def __init__(self, sink: RowSink):
        self.sink = sink

    def __call__(self, row: dict) -> None:
        self.sink(row)
        while True:
            time.sleep(60)


def child_main(args: argparse.Namespace) -> int:
    """One stage, in this (child) process: its figures to result_path, its rows as it goes."""
    import numba
    import torch

    import beton_builder.ffcv_import  # noqa: F401  (sets torch's / numba's threads to 1: set ours after)
    from beton_builder.base.files import write_json
    from beton_builder.base.processes import children_die_with_parent

    children_die_with_parent()  # what this stage forks (build workers) dies with it, as it dies with the check

    torch.set_num_threads(workers())
    numba.set_num_threads(min(workers(), numba.config.NUMBA_NUM_THREADS))
    sink: RowSink | HangAfterFirstRow = RowSink(args.root, args.stage)
    if args.hang_stage == args.stage:
        sink = HangAfterFirstRow(sink)
    if args.fail_stage == args.stage:
        raise RuntimeError(f"forced failure of stage {args.stage!r} (--fail-stage)")
    figures = STAGE_FNS[args.stage](args, sink)
    write_json(result_path(args.root, args.stage), figures)
    return 0
