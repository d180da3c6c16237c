"""Wall-clock per curriculum: ccfs-fast against the paper's implementation approach
(benchmarks/baseline_paper.py), same models, recipe and algorithm, on generated data of
CIFAR-10 shape (50,000 pool / 10,000 test, 32x32, 10 classes) and Tiny-ImageNet shape (100,000 /
10,000, 64x64, 200 classes) with learnable class structure. Rows: each shape with a small model
(convnet_tiny, so input handling dominates) and CIFAR shape with resnet18, the paper's model. The
baseline predicts the whole pool every curriculum, as the paper's code does; ccfs-fast runs its
default lazy coarse pass (ccfs_fast.selection.coarse) and reports how many images it predicted.
Its teacher pass is lazy too (the teacher predicts a pool image when a coarse pass first reaches it),
so its curricula include those predictions; a third side, ccfs-fast with `--teacher-pass full`, is
measured in the same call for the teacher rows (predictions and seconds, lazy against full), and the
`run` row compares whole runs (set-up, teacher pass, every curriculum) with the baseline's. The
per-curriculum rows leave the lazy teacher's predictions out of ccfs-fast's curricula (the baseline
makes its teacher pass before them): they are counted in the teacher rows and the run row.

Each side runs in its own process (clean memory figures): a one-time setup (baseline: decode the
pool into a float32 tensor; ccfs-fast: open the .beton files, built once beforehand and timed
apart), the teacher pass, then K curricula. Per curriculum: train (filter on distilled ∪ selected,
incl. reading the train set and the final test evaluation), pool evaluation, selection. Then the
peak RSS of evaluating the whole pool. With `--repeats N` each side runs N times, interleaved in
alternating order, and each figure is that side's median over its runs (peaks: the largest). Run:
`ccfs-fast bench phase [--quick] [--repeats N] [--json FILE]`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.phase_data import SMALL_MODELS, BenchSpec, Shape, prepare
from benchmarks.phase_rows import check_same_selection, predicted_text, teacher_and_run_rows
from beton_builder.base.processes import available_cpus
from beton_builder.base.tables import format_table

from .common import HelpFormatter, competing_load, peak_rss_mb, reset_peak_rss, write_chart, write_rows

SHAPES = {"cifar10": Shape("cifar10", 50_000, 10_000, 32, 10, 50),
          "tiny-imagenet": Shape("tiny-imagenet", 100_000, 10_000, 64, 200, 20)}


@dataclass(frozen=True)
class Row:
    """One benchmark row: a data shape, the model of teacher / filters, and its epochs per curriculum
    (None: the --epochs flag)."""

    shape: str
    model: str
    epochs: int | None = None


ROWS = {"cifar10": Row("cifar10", "convnet_tiny"), "tiny-imagenet": Row("tiny-imagenet", "convnet_tiny"),
        # The paper's model: two epochs per filter keep a CPU run to minutes (the paper trains 200-500).
        "cifar10-resnet18": Row("cifar10", "resnet18", 2)}












def _phase_budget(spec: BenchSpec) -> tuple[int, list[int]]:
    from ccfs_fast.selection.kernels import curriculum_arrangement

    shape = Shape(**spec.shape)
    cpc = int(shape.ipc * spec.alpha + 1e-9)
    return cpc, curriculum_arrangement(shape.ipc - cpc, spec.curricula)


def worker_ccfs(spec: BenchSpec, teacher_pass: str = "lazy") -> dict:
    from dataclasses import replace

    import torch

    from beton_builder.base.digests import file_sha256
    from ccfs_fast.runs.config import Machine, RunConfig
    from ccfs_fast.runs.phase import run_phase
    from ccfs_fast.runs.teacher_pass import open_teacher_pass
    from ccfs_fast.runs.workspace import open_workspace
    from ccfs_fast.selection.kernels import warm_up_kernels
    from ccfs_fast.selection.scores import easy_first_key, load_scores
    from ccfs_fast.train.predict import predict
    from ccfs_fast.train.recipe import TrainRecipe
    from ccfs_fast.train.settings import compose

    root = Path(spec.root)
    shape = Shape(**spec.shape)
    cpc, arrangement = _phase_budget(spec)
    cfg = compose(RunConfig, dict(pool=root / "pool.beton", test=root / "test.beton",
                    distilled=root / "distilled.beton",
                    teacher=root / "teacher.pt", output_dir=root / "unused", score_path=root / "scores.npy",
                    image_per_class=shape.ipc, alpha=spec.alpha, curriculum_num=spec.curricula, shortfall="short",
                    temperature=spec.temperature, recipe=TrainRecipe(epochs=spec.epochs, lr=0.05, lr_warmup_epochs=1),
                    num_eval=0, filter_model=spec.model, teacher_model=spec.model, eval_model=spec.model,
                    seed=spec.seed, workers=spec.workers))
    start = time.perf_counter()
    ws = open_workspace(replace(cfg.inputs, teacher_model=spec.model), cpc, Machine(workers=spec.workers))
    key = easy_first_key(load_scores(cfg.selection.score_path, ws.pool_labels), "forgetting")
    warm_up_kernels()  # as run_curriculum does before the first curriculum
    ws.warm()
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    teacher = open_teacher_pass(ws, file_sha256(cfg.inputs.teacher), teacher_pass)
    teacher_s = time.perf_counter() - start
    selected = np.zeros(0, np.int64)
    phases = []
    rate = None
    for phase, curpc in enumerate(arrangement, 1):
        start = time.perf_counter()
        outcome = run_phase(ws, cfg, phase, curpc, selected, teacher, key, rate)
        r = outcome.record
        rate = r.survivor_rate
        # the stage rows compare like with like: the teacher predictions a lazy pass makes inside a
        # curriculum are the teacher pass's (the teacher rows, the run row), not the curriculum's
        phases.append({"train_s": r.train_s, "eval_s": r.eval_s - r.teacher_s, "select_s": r.select_s,
                       "curriculum_s": time.perf_counter() - start - r.teacher_s, "pool_evaluated": r.pool_evaluated,
                       "pool_eligible": r.pool_eligible, "coarse_pass": r.coarse_pass,
                       "filter_acc": r.filter_acc, "selection": outcome.picked.tolist(),
                       "train_size": r.train_size, "teacher_s": r.teacher_s,
                       "teacher_predicted": r.teacher_predicted})
        selected = np.concatenate([selected, outcome.picked])
    process_peak = peak_rss_mb()
    if spec.model in SMALL_MODELS:  # a large model's extra whole-pool pass would cost minutes: its run's peak
        reset_peak_rss()
        torch.manual_seed(0)
        from ccfs_fast.train.models import create_model
        predict(create_model(spec.model, shape.classes, shape.side), ws.pool_loader(np.arange(ws.space.n_pool)))
    return {"setup_s": setup_s, "teacher_pass_s": teacher_s + sum(p["teacher_s"] for p in phases),
            "teacher_upfront_s": teacher_s, "teacher_predicted": teacher.made, "teacher_pass": teacher_pass,
            "phases": phases, "process_peak_rss_mb": process_peak,
            "pool_eval_peak_rss_mb": peak_rss_mb(), "teacher_correct": int(teacher.correct_mask().sum())}


def worker_baseline(spec: BenchSpec) -> dict:
    import torch

    from beton_builder.manifest import read_manifest
    from ccfs_fast.train.models import create_model
    from ccfs_fast.train.recipe import TrainRecipe

    from .baseline_paper import BaselineRun

    root = Path(spec.root)
    shape = Shape(**spec.shape)
    cpc, arrangement = _phase_budget(spec)
    manifest = read_manifest(root / "pool.beton")  # the same normalisation constants as ccfs-fast
    run = BaselineRun(np.load(root / "pool_x.npy"), np.load(root / "pool_y.npy"), np.load(root / "test_x.npy"),
                      np.load(root / "test_y.npy"), root / "distilled", root / "teacher.pt", spec.model, cpc,
                      manifest.mean, manifest.std, TrainRecipe(epochs=spec.epochs, lr=0.05, lr_warmup_epochs=1),
                      spec.temperature, spec.workers, np.load(root / "scores.npy").astype(np.float64))
    setup_s = run.setup()
    start = time.perf_counter()
    teacher_ok = run.teacher_pass()
    teacher_s = time.perf_counter() - start
    selected: list[int] = []
    phases = []
    for phase, curpc in enumerate(arrangement, 1):
        start = time.perf_counter()
        result = run.phase(curpc, selected, teacher_ok, spec.seed * 1009 + phase)
        result["curriculum_s"] = time.perf_counter() - start
        selected += result["selection"]
        phases.append(result)
    process_peak = peak_rss_mb()
    if spec.model in SMALL_MODELS:  # as on the ccfs-fast side
        reset_peak_rss()
        torch.manual_seed(0)
        run.coarse_filtering(create_model(spec.model, shape.classes, shape.side))
    return {"setup_s": setup_s, "teacher_pass_s": teacher_s, "phases": phases, "process_peak_rss_mb": process_peak,
            "pool_eval_peak_rss_mb": peak_rss_mb(), "teacher_correct": len(teacher_ok),
            "teacher_predicted": shape.pool}


WORKERS = {"ccfs": worker_ccfs, "ccfs-full": lambda spec: worker_ccfs(spec, "full"), "baseline": worker_baseline}


def run_worker(kind: str, spec_path: Path, root: Path, repeat: int = 0) -> dict:
    """One side's worker in a fresh process. Each run gets its own empty cache folder, so every
    repeat computes its teacher pass (which also reads the pool file) as the first did."""
    out = root / f"{kind}.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(root / f"cache-{kind}-{repeat}"), "PYTHONUNBUFFERED": "1"}
    from ccfs_fast.data.threads import child_env

    env = child_env(env, kind.startswith("ccfs"))
    code = ("import sys, json, torch, numba; from benchmarks.curriculum_wallclock import main_worker; "
            f"main_worker({kind!r}, {str(spec_path)!r}, {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def main_worker(kind: str, spec_path: str, out_path: str) -> None:
    import numba
    import torch

    import beton_builder.ffcv_import  # noqa: F401  (FFCV's import resets thread counts; set ours after it)
    from ccfs_fast.train.models import create_model

    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    if kind.startswith("ccfs"):  # the process settings `ccfs-fast run` makes (threads, allocator, signals)
        from ccfs_fast.data.threads import process_settings

        process_settings(spec.workers)
    else:
        torch.set_num_threads(spec.workers)
        numba.set_num_threads(spec.workers)
    shape = Shape(**spec.shape)
    with torch.inference_mode():  # load the runtime's libraries before measuring its baseline RSS
        create_model(spec.model, shape.classes, shape.side)(torch.zeros(2, 3, shape.side, shape.side))
    runtime = current_rss_mb()
    result = WORKERS[kind](spec)
    result["runtime_rss_mb"] = runtime
    Path(out_path).write_text(json.dumps(result))


def _mean(phases: list[dict], key: str) -> float:
    return float(np.mean([p[key] for p in phases]))


def run_sides(spec_path: Path, root: Path, repeats: int, run: Callable[[str, Path, Path, int], dict] = run_worker,
              sides: tuple[str, ...] = ("ccfs", "baseline")) -> tuple[list[dict], ...]:
    """`repeats` runs of each side's worker (`run(kind, spec_path, root, repeat)`), interleaved and in
    alternating order (ccfs-fast first, then the baseline first, ...), so drift in the machine's
    speed falls on both sides alike. Returns each side's runs, in the order of `sides`."""
    runs: dict[str, list[dict]] = {kind: [] for kind in sides}
    for repeat in range(repeats):
        for kind in (sides if repeat % 2 == 0 else sides[::-1]):
            runs[kind].append(run(kind, spec_path, root, repeat))
    return tuple(runs[kind] for kind in sides)


def median_run(runs: list[dict], key: str) -> tuple[float, list[float]]:
    """(median over runs, each run's value) of the per-curriculum mean of `key`."""
    per_run = [_mean(r["phases"], key) for r in runs]
    return float(np.median(per_run)), per_run


def compare(row: Row, shape: Shape, args: argparse.Namespace, tmp: Path) -> list[dict]:
    name = f"{shape.name} {row.model}"
    root = tmp / name.replace(" ", "-")
    root.mkdir()
    spec = BenchSpec(root=str(root), shape=asdict(shape), epochs=row.epochs or args.epochs, curricula=args.curricula,
                     workers=args.workers, model=row.model)
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    prepared = prepare(spec)
    ccfs_runs, base_runs, full_runs = run_sides(spec_path, root, args.repeats, sides=("ccfs", "baseline", "ccfs-full"))
    ccfs, base = ccfs_runs[0], base_runs[0]  # counts, accuracies and one-time costs: each side's first run

    def peak(runs: list[dict], key: str) -> float:
        return max(r[key] for r in runs)

    rows = []
    for stage, key in (("train", "train_s"), ("pool_eval", "eval_s"), ("select", "select_s"),
                       ("curriculum", "curriculum_s")):
        (base_s, base_each), (ccfs_s, ccfs_each) = median_run(base_runs, key), median_run(ccfs_runs, key)
        out = {"dataset": shape.name, "model": row.model, "epochs": spec.epochs, "stage": stage,
               "baseline_s": base_s, "ccfs_s": ccfs_s, "repeats": len(ccfs_runs), "baseline_runs_s": base_each,
               "ccfs_runs_s": ccfs_each, "pool": shape.pool, "side": shape.side, "classes": shape.classes,
               "curricula": len(ccfs["phases"])}
        out["speedup"] = out["baseline_s"] / out["ccfs_s"]
        if stage == "pool_eval":
            out.update(baseline_peak_rss_mb=peak(base_runs, "pool_eval_peak_rss_mb"),
                       ccfs_peak_rss_mb=peak(ccfs_runs, "pool_eval_peak_rss_mb"),
                       baseline_data_rss_mb=base["pool_eval_peak_rss_mb"] - base["runtime_rss_mb"],
                       ccfs_data_rss_mb=ccfs["pool_eval_peak_rss_mb"] - ccfs["runtime_rss_mb"],
                       runtime_rss_mb=ccfs["runtime_rss_mb"], baseline_img_per_s=shape.pool / out["baseline_s"],
                       ccfs_img_per_s=_mean(ccfs["phases"], "pool_evaluated") / out["ccfs_s"],
                       ccfs_predicted=[p["pool_evaluated"] for p in ccfs["phases"]],
                       ccfs_eligible=[p["pool_eligible"] for p in ccfs["phases"]],
                       baseline_predicted=[p["pool_evaluated"] for p in base["phases"]],
                       coarse_pass=ccfs["phases"][0]["coarse_pass"])
        if stage == "curriculum":
            out.update(baseline_peak_rss_mb=peak(base_runs, "process_peak_rss_mb"),
                       ccfs_peak_rss_mb=peak(ccfs_runs, "process_peak_rss_mb"),
                       baseline_setup_s=base["setup_s"], ccfs_setup_s=ccfs["setup_s"],
                       beton_build_s=prepared["build_s"],
                       baseline_teacher_pass_s=base["teacher_pass_s"], ccfs_teacher_pass_s=ccfs["teacher_pass_s"],
                       teacher_acc=prepared["teacher_acc"],
                       baseline_filter_acc=[p["filter_acc"] for p in base["phases"]],
                       ccfs_filter_acc=[p["filter_acc"] for p in ccfs["phases"]])
        rows.append(out)
    rows += teacher_and_run_rows(rows[-1], ccfs_runs, base_runs, full_runs)
    if args.under_load:
        rows.append(under_load(next(r for r in rows if r["stage"] == "curriculum"), spec_path, root, args.repeats))
    return rows


def under_load(idle: dict, spec_path: Path, root: Path, repeats: int) -> dict:
    """The curriculum row measured again with one busy CPU job per available CPU running (started
    here), both sides interleaved as before; `speedup_kept` = its speedup over the idle one's."""
    with competing_load() as jobs:
        ccfs_runs, base_runs = run_sides(spec_path, root, repeats)
    (base_s, base_each), (ccfs_s, ccfs_each) = median_run(base_runs, "curriculum_s"), median_run(ccfs_runs,
                                                                                                  "curriculum_s")
    return {**{k: idle[k] for k in ("dataset", "model", "epochs", "pool", "side", "classes", "curricula")},
            "stage": f"curriculum, {jobs} busy jobs", "baseline_s": base_s, "ccfs_s": ccfs_s, "repeats": repeats,
            "baseline_runs_s": base_each, "ccfs_runs_s": ccfs_each, "speedup": base_s / ccfs_s,
            "speedup_kept": (base_s / ccfs_s) / idle["speedup"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ccfs-fast bench phase", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="which rows (data shape and model) to measure")
    parser.add_argument("--quick", action="store_true", help="a tenth of each pool and test set")
    parser.add_argument("--epochs", type=int, default=40,
                        help="filter epochs per curriculum of the convnet rows (the paper uses 200-500; 40 keeps "
                             "this to minutes); the resnet18 row trains 2")
    parser.add_argument("--curricula", type=int, default=2, help="curricula per run")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="reader threads / worker processes")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each side per row, interleaved in alternating order; the table reports each "
                             "side's median (use 3 or more on a shared or noisy machine)")
    parser.add_argument("--under-load", action="store_true",
                        help="also measure each row's curriculum with one busy CPU job per available CPU running "
                             "(started by the benchmark): how much of the idle speedup it keeps")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ccfs-phase-") as tmp:
        for name in args.rows:
            row = ROWS[name]
            shape = SHAPES[row.shape]
            if args.quick:
                shape = Shape(shape.name, shape.pool // 10, shape.test // 10, shape.side, shape.classes, shape.ipc)
            rows += compare(row, shape, args, Path(tmp))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_rows(args.json, rows, config)
    write_chart(args.json, [f"{r['dataset']} {r['model']} {r['stage']}" for r in rows], [r["speedup"] for r in rows],
                "per-curriculum wall-clock: ccfs-fast vs the paper's approach", 3.0)
    print(format_table(["dataset", "model", "stage", "baseline s", "ccfs-fast s", "speedup", "predicted / full pass",
                        "baseline peak MiB", "ccfs peak MiB"],
                       [(r["dataset"], r["model"], r["stage"], r["baseline_s"], r["ccfs_s"], f"{r['speedup']:.1f}x",
                         predicted_text(r), r.get("baseline_peak_rss_mb", ""), r.get("ccfs_peak_rss_mb", ""))
                        for r in rows]))
    check_same_selection(rows)
    return rows


if __name__ == "__main__":
    main()
