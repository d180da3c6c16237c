"""The staged GPU device check (`benchmarks/gpu_check.sh --graphs` on a lent GPU machine). Each stage
runs in its own child process under its own limit (benchmarks/stages.py); the parent only orchestrates
and writes the JSON after every stage; the whole stays under --budget seconds by its own clock. The
headline figures come first, bf16 after:

  data         CIFAR-shaped pool / test / distilled .beton files and scores (no CUDA)
  teacher      a resnet18 teacher, 2 epochs
  exactness    CUDA graphs against eager steps with TF32 off and deterministic cuDNN
  kd_fp32      KD steps in the paper's precision (TF32 convolutions): eager and graphs at batch 32 and
               64, then 5 models together at 64 (fused NCHW, fused channels-last, 5 streams), then at 32
  preset_fp32  the complete `run --preset cifar10-ipc500` at --preset-epochs, projected to 500
  kd_bf16      kd_fp32 in bf16
  preset_bf16  preset_fp32 with --bf16

Every stage keeps what it measured when it fails or runs out of time (rows streamed to the parent).
`--quick` is the CPU form the tests run (small data, tiny models, 1 epoch, fp32 only)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .stages import RowSink, Stage, Stages, result_path

BUDGET_S = 480.0  # within the device tool's 600 s per call, with margin for the shell and the machine
PRESET = "cifar10-ipc500"
PRESET_EPOCHS = 20  # enough for the loop's rate: the projection scales the loop alone (set-up counted once)
TARGET_EPOCHS = 500
QUICK_RUN = ["--image-per-class", "20", "--alpha", "0.2", "--filter-model", "convnet_tiny", "--eval-model",
             "convnet_tiny", "--num-eval", "2", "--lr-warmup-epochs", "0"]  # CPU-sized, same algorithm

STAGES = {s.name: s for s in (
    Stage("data", cap_s=90, min_s=20),
    Stage("teacher", cap_s=60, min_s=20, needs=("data",)),
    Stage("exactness", cap_s=60, min_s=20, cuda_only=True),
    Stage("kd_fp32", cap_s=100, min_s=30),
    Stage("preset_fp32", cap_s=180, min_s=60, needs=("teacher",)),
    Stage("kd_bf16", cap_s=80, min_s=30, cuda_only=True),
    Stage("preset_bf16", cap_s=150, min_s=60, needs=("teacher",), cuda_only=True),
)}


def workers() -> int:
    from ccfs_fast.processes import available_cpus

    return min(8, available_cpus())


def files(root: Path) -> dict[str, Path]:
    """The inputs the stages share, by convention under the check's folder."""
    return {"pool": root / "pool.beton", "test": root / "test.beton", "distilled": root / "d.beton",
            "scores": root / "scores.npy", "teacher": root / "teacher.pt"}


# --- the stages (each runs in its own child process) -----------------------------------------------

def stage_data(args: argparse.Namespace, sink: RowSink) -> dict:
    """CIFAR-shaped pool / test .beton files, a distilled folder of 50 images per class (5 with
    --quick) built with `build folder`, and a score file."""
    from PIL import Image

    from beton_builder.build import BuildConfig, build
    from beton_builder.table import ImageTable
    from beton_builder.writer import write_beton
    from ccfs_fast.outputs import environment

    from .curriculum_wallclock import class_images

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
    from ccfs_fast.config import TeacherConfig, TrainRecipe
    from ccfs_fast.outputs import environment
    from ccfs_fast.teacher import train_teacher

    device = _device()
    start = time.perf_counter()
    model = "convnet_tiny" if args.quick else "resnet18"
    paths = files(args.root)
    out = train_teacher(TeacherConfig(pool=paths["pool"], test=paths["test"], output=paths["teacher"], model=model,
                                      recipe=TrainRecipe(epochs=1 if args.quick else 2, lr=0.1, lr_warmup_epochs=0,
                                                         batch_size=512),
                                      device=device.type, workers=workers(), overwrite=True))
    return {"model": model, "test_acc": out["test_acc"], "seconds": time.perf_counter() - start,
            "environment": environment(device.type)}


def stage_exactness(args: argparse.Namespace, sink: RowSink, steps: int = 12) -> dict:
    """Graph replay against eager steps with TF32 off and deterministic cuDNN: the same resnet18 KD
    training (batch 64 and a partial batch of 40) eagerly twice and once through CUDA graphs. Passes
    when graphs differ from eager by 0 or by no more than eager differs from eager."""
    import torch

    from ccfs_fast.step import GraphedStep
    from ccfs_fast.train import sync

    from .train_throughput import make_step

    device = _device()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    params, ms = {}, {}
    for mode in ("eager_a", "eager_b", "graphs"):
        step = make_step(device, 1, seed=7)
        runner = GraphedStep(step, [64, 40], [7]) if mode == "graphs" else step
        step.students.train()
        rows = torch.randint(0, 4096, (steps, 1, 64), generator=torch.Generator().manual_seed(1)).to(device)
        sync(device)
        start = time.perf_counter()
        for k in range(steps):
            runner(rows[k] if k % 4 else rows[k][:, :40])
        sync(device)
        ms[mode] = (time.perf_counter() - start) / steps * 1000
        params[mode] = [p.detach().double().clone() for p in step.students.parameters()]
        sink({"mode": mode, "step_ms": ms[mode]})

    def gap(a: str, b: str) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(params[a], params[b]))

    graphs, eager = gap("graphs", "eager_a"), gap("eager_b", "eager_a")
    return {"graphs_vs_eager": graphs, "eager_vs_eager": eager, "passed": graphs == 0 or graphs <= eager,
            "step_ms": ms, "capture_fallback": capture_fallback(device)}


class _SyncsInCapture:
    """A KD step that reads a value back to the host on its first calls: a capture of it is invalidated
    (a synchronisation inside a capture), as an unsupported op would invalidate a real one."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name: str):
        return getattr(self.step, name)

    def __call__(self, rows):
        losses = self.step(rows)
        if torch_is_capturing():
            float(losses.sum())  # not allowed while capturing: the capture fails
        return losses


def torch_is_capturing() -> bool:
    import torch

    return torch.cuda.is_current_stream_capturing()


def capture_fallback(device, steps: int = 30) -> dict:
    """A capture made to fail on the device: it must raise CaptureFailed, and the eager steps after it
    must neither grow the allocated memory (the allocator no longer routing to the failed capture's
    pool) nor fail. Returns the figures and whether it held."""
    import torch

    from ccfs_fast.step import CaptureFailed, GraphedStep

    from .train_throughput import make_step

    step = make_step(device, 1, seed=3)
    failed = None
    try:
        GraphedStep(_SyncsInCapture(step), [64], [3])
    except CaptureFailed as exc:
        failed = str(exc)[:160]
    rows = torch.randint(0, 4096, (steps, 1, 64), device=device)
    step.students.train()
    allocated = []
    for k in range(steps):
        step(rows[k])
        torch.cuda.synchronize(device)
        allocated.append(torch.cuda.memory_allocated(device))
    growth = allocated[-1] - allocated[steps // 3]
    return {"capture_failed": failed, "allocated_growth_bytes": int(growth), "steps": steps,
            "held": failed is not None and growth <= 1 << 20}


def kd_order(quick: bool, cuda: bool) -> list[tuple[str, int]]:
    """The (mode, batch) rows of a KD stage, headline ratios first: graphs / eager at 32 and 64, then
    the 5 models together at 64, then at 32."""
    from .train_throughput import LAYOUT_MODES

    if quick:
        return [("eager", 8), *((m, 8) for m in LAYOUT_MODES)]
    singles = ["eager", "graphs"] if cuda else ["eager"]
    return [(m, b) for b in (32, 64) for m in singles] + [(m, b) for b in (64, 32) for m in LAYOUT_MODES]


def stage_kd(args: argparse.Namespace, sink: RowSink, precision: str) -> dict:
    """bench train at the preset's batches (32, 64) with cudnn.benchmark on as real runs have it; rows
    streamed to the parent as they are measured."""
    import torch

    from .train_throughput import measure, preset_trainings, project, targets

    device = _device()
    torch.backends.cudnn.benchmark = device.type == "cuda"
    order = kd_order(args.quick, device.type == "cuda")
    kwargs = {"model": "convnet_tiny", "side": 16} if args.quick else {}
    rows = measure(device, [], [], 1 if args.quick else 3, 2 if args.quick else 15, (precision,), on_row=sink,
                   order=order, **kwargs)
    return {"rows": rows, "targets": targets(rows, precision), "projection": project(rows, preset_trainings())}


def stage_preset(args: argparse.Namespace, sink: RowSink, bf16: bool) -> dict:
    """The complete `run --preset cifar10-ipc500` (every filter and the final evaluation) at
    --preset-epochs, in this process; per training how it ran and its parts, and the projection to
    500 epochs (preset_projection)."""
    import json

    from ccfs_fast.cli import main

    paths, out = files(args.root), preset_dir(args.root, bf16)
    argv = ["run", "--preset", PRESET, "--pool", str(paths["pool"]), "--test", str(paths["test"]),
            "--distilled", str(paths["distilled"]), "--teacher", str(paths["teacher"]), "--score-path",
            str(paths["scores"]), "--device", _device().type, "--eval-batch-size", "1024", "--workers", str(workers()),
            "--output-dir", str(out), "--overwrite", "--epochs", str(args.preset_epochs),
            *(QUICK_RUN if args.quick else []), *(["--bf16"] if bf16 else [])]
    start = time.perf_counter()
    code = main(argv)
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
    from ccfs_fast.train import last_fifth_epochs

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
    "data": stage_data,
    "teacher": stage_teacher,
    "exactness": stage_exactness,
    "kd_fp32": lambda args, sink: stage_kd(args, sink, "fp32"),
    "preset_fp32": lambda args, sink: stage_preset(args, sink, False),
    "kd_bf16": lambda args, sink: stage_kd(args, sink, "bf16"),
    "preset_bf16": lambda args, sink: stage_preset(args, sink, True),
}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    from ccfs_fast.outputs import write_json

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


# --- the parent: orchestrates, records, prints -----------------------------------------------------

def salvage_preset(bf16: bool) -> Callable[[Path], dict]:
    """What a preset stage stopped part-way leaves: the curricula its run finished (state.json)."""
    def salvage(root: Path) -> dict:
        import json

        path = preset_dir(root, bf16) / "state.json"
        state = json.loads(path.read_text()) if path.is_file() else {"phases": []}
        return {"phases_finished": len(state.get("phases", [])),
                "trainings": preset_projection(state, 0.0, 1)["trainings"]}
    return salvage


def parent_main(args: argparse.Namespace) -> dict:
    """Runs the stages in order, each in a child; JSON after each; the table and the headline lines last."""
    started = time.perf_counter() - since_shell_start()  # the budget counts from the command's start
    cuda = _cuda_visible()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        stages = Stages(args.json, args.budget, root, {"config": {k: str(v) for k, v in vars(args).items()},
                                                       "device": "cuda" if cuda else "cpu"}, start=started)
        limits = dict(item.split("=", 1) for item in args.stage_limit)
        for name, stage in STAGES.items():
            if stage.cuda_only and not cuda:
                stages.skip(name, "CUDA only")
                continue
            argv = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, "--root", str(root),
                    "--preset-epochs", str(args.preset_epochs), *(["--quick"] if args.quick else []),
                    *(["--fail-stage", args.fail_stage] if args.fail_stage else []),
                    *(["--hang-stage", args.hang_stage] if args.hang_stage else [])]
            salvage = salvage_preset(name.endswith("bf16")) if name.startswith("preset_") else None
            stages.run(stage, argv, float(limits[name]) if name in limits else None, salvage)
            print(f"{name}: {stages.records[-1]['status']} ({stages.records[-1]['seconds']:.0f} s)", flush=True)
    print(summary(stages))
    return {"stages": stages.records}


def since_shell_start() -> float:
    """Seconds since benchmarks/gpu_check.sh started (its CCFS_CHECK_STARTED), 0 when run directly."""
    import os

    try:
        return max(0.0, time.time() - float(os.environ.get("CCFS_CHECK_STARTED", "")))
    except ValueError:
        return 0.0


def _cuda_visible() -> bool:
    """Whether a CUDA device is there, asked in a child so that this process never starts CUDA."""
    import subprocess

    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False  # recorded as device "cpu": the CUDA stages are then skipped, saying so
    return probe.stdout.strip().endswith("True")


def summary(stages: Stages) -> str:
    """The stage table, then the figures the targets are stated in."""
    lines = [stages.table()]
    for record in stages.records:
        figures = record.get("figures") or {}
        if record["stage"].startswith("kd_") and figures:
            t = figures["targets"]
            lines.append(f"{t['precision']}: graphs / eager at batch 32 {_ratio(t['graphs_over_eager_b32'])} (target "
                         f"4x); 5 together / sequential at batch 64 {_ratio(t['bank_over_sequential_b64'])} (target "
                         f"3x, {t['bank_best_layout']})")
        if record["stage"].startswith("preset_") and figures:
            projected = figures["projected_min"]
            lines.append(f"{record['stage']}: {figures['epochs']} epochs in {figures['wall_s']:.0f} s, complete "
                         f"{figures['complete']}; {figures['target_epochs']} epochs projected "
                         f"{'n/a' if projected is None else f'{projected:.1f} min'} (fixed {figures['fixed_s']:.0f} s)")
        if record["stage"] == "exactness" and figures:
            fallback = figures["capture_fallback"]
            lines.append(f"exactness: graphs vs eager {figures['graphs_vs_eager']:.3g}, eager vs eager "
                         f"{figures['eager_vs_eager']:.3g}: {'pass' if figures['passed'] else 'FAIL'}; a failed "
                         f"capture then {fallback['steps']} eager steps: allocated memory grew "
                         f"{fallback['allocated_growth_bytes']:,} bytes ({'pass' if fallback['held'] else 'FAIL'})")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> dict | int:
    parser = argparse.ArgumentParser(prog="benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the stages here (after every stage)")
    parser.add_argument("--graphs", action="store_true", help="(the staged check; accepted for older commands)")
    parser.add_argument("--quick", action="store_true", help="the CPU form the tests run: small data, 1 epoch")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for the whole check by its own clock (default: {BUDGET_S:.0f})")
    parser.add_argument("--preset-epochs", type=int, default=None,
                        help=f"epochs of the preset runs (default: {PRESET_EPOCHS}; 1 with --quick)")
    parser.add_argument("--stage-limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override a stage's own limit (repeatable)")
    parser.add_argument("--fail-stage", default=None, help="make this stage fail on purpose (tests the check)")
    parser.add_argument("--hang-stage", default=None,
                        help="make this stage hang after its first row (tests the check's limits)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a child: run this one stage
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset_epochs = args.preset_epochs or (1 if args.quick else PRESET_EPOCHS)
    if args.stage:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
