"""GPU device check: loader images/s, KD training images/s of resnet18_cifar (fast path on and
off), pool prediction images/s, and one small CCFS run on a generated CIFAR-shaped dataset; prints a
table, writes JSON. With `--graphs`: instead, `bench train` (eager / CUDA graphs / fused bank of 5),
a check that graph replay trains as the eager step does, and the whole `--preset cifar10-ipc500` run
on generated CIFAR-shaped data within a time budget (the curricula that fit, then a projection).
Meant for a lent GPU machine (benchmarks/gpu_check.sh brings FFCV's native libraries); runs on the
CPU too (`--quick`) as a smoke test."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from beton_builder.table import ImageTable
from beton_builder.writer import write_beton
from ccfs_fast.config import FastPath, RunConfig, TeacherConfig, TrainRecipe
from ccfs_fast.curriculum import run_curriculum
from ccfs_fast.data import BetonFile, EvalLoader, IndexSpace, ResidentTrainLoader
from ccfs_fast.models import create_model
from ccfs_fast.outputs import environment, write_json
from ccfs_fast.tables import format_table
from ccfs_fast.teacher import train_teacher
from ccfs_fast.train import kd_loss, make_optimizer, predict

from .curriculum_wallclock import class_images

WORKERS = min(8, os.cpu_count() or 1)
FAST_ON = FastPath(channels_last=True, bf16=True, cudnn_benchmark=True, fused_optimizer=True)
FAST_OFF = FastPath(channels_last=False, bf16=False, cudnn_benchmark=False, fused_optimizer=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(root: Path, pool: int, test: int, workers: int) -> dict:
    names = tuple(str(c) for c in range(10))
    px, py = class_images(pool, 10, 32, 1)
    tx, ty = class_images(test, 10, 32, 2)
    dx, dy = class_images(400, 10, 32, 3)
    order = np.argsort(dy, kind="stable")
    write_beton(ImageTable(px, py, names, "arrays", "gpu_check"), root / "pool.beton", True, workers)
    write_beton(ImageTable(tx, ty, names, "arrays", "gpu_check"), root / "test.beton", True, workers)
    write_beton(ImageTable(dx[order], dy[order], names, "arrays", "gpu_check"), root / "distilled.beton", True, workers)
    np.save(root / "scores.npy", (np.random.default_rng(0).integers(0, 20, pool) * 0.2).astype(np.float32))
    return {"pool": root / "pool.beton", "test": root / "test.beton", "distilled": root / "distilled.beton"}


def loader_rate(space: IndexSpace, n: int, batch: int, device: torch.device, epochs: int) -> float:
    loader = ResidentTrainLoader(space, np.arange(n), batch, device, seed=0, workers=WORKERS)
    for _ in loader:
        pass
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for _batch in loader:
            pass
    sync(device)
    return n * epochs / (time.perf_counter() - start)


def train_rate(space: IndexSpace, device: torch.device, fast: FastPath, batch: int, steps: int) -> float:
    """KD training images/s of resnet18_cifar (student fwd + bwd + teacher fwd on the same batch)."""
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark
    torch.manual_seed(0)
    layout = torch.channels_last if fast.channels_last else torch.contiguous_format
    student = create_model("resnet18_cifar", 10, 32).to(device, memory_format=layout)
    teacher = create_model("resnet18_cifar", 10, 32).to(device, memory_format=layout).eval()
    optimizer = make_optimizer(student, TrainRecipe(), fused=fast.fused_optimizer)
    loader = ResidentTrainLoader(space, np.arange(min(space.n_pool, batch * 64)), batch, device, seed=0,
                                 workers=WORKERS, channels_last=fast.channels_last)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=fast.bf16)

    def step(images):
        with torch.inference_mode(), torch.autocast(**amp):
            target = teacher(images)
        with torch.autocast(**amp):
            out = student(images)
        loss = kd_loss(out.float(), target.float().clone(), 20.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batches = iter([])
    done = timed = 0
    start = None
    while done < steps + 10:
        try:
            images, _, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        if done == 10:  # warm-up steps (cudnn autotuning, allocator) are not timed
            sync(device)
            start = time.perf_counter()
        step(images)
        done += 1
        timed += len(images) if done > 10 else 0
    sync(device)
    return timed / (time.perf_counter() - start)


def predict_rate(space: IndexSpace, device: torch.device, fast: FastPath, batch: int) -> float:
    layout = torch.channels_last if fast.channels_last else torch.contiguous_format
    model = create_model("resnet18_cifar", 10, 32).to(device, memory_format=layout).eval()
    loader = EvalLoader(space, np.arange(space.n_pool), batch, device, WORKERS, fast.channels_last)
    predict(model, EvalLoader(space, np.arange(batch * 2), batch, device, WORKERS, fast.channels_last), fast)
    sync(device)
    start = time.perf_counter()
    predict(model, loader, fast)
    sync(device)
    return space.n_pool / (time.perf_counter() - start)


def ccfs_run(files: dict, root: Path, device: str, epochs: int, model: str) -> dict:
    warmup = min(1, epochs - 1)
    recipe = TrainRecipe(epochs=epochs, lr=0.1, lr_warmup_epochs=warmup, weight_decay=5e-4, batch_size=512)
    start = time.perf_counter()
    teacher = train_teacher(TeacherConfig(pool=files["pool"], test=files["test"], output=root / "teacher.pt",
                                          model=model, recipe=recipe, device=device, workers=WORKERS, overwrite=True))
    teacher_s = time.perf_counter() - start
    cfg = RunConfig(pool=files["pool"], test=files["test"], distilled=files["distilled"], teacher=root / "teacher.pt",
                    output_dir=root / "run", score_path=root / "scores.npy", image_per_class=250, alpha=0.1,
                    curriculum_num=2, recipe=TrainRecipe(epochs=epochs, lr=0.2, lr_warmup_epochs=warmup), num_eval=1,
                    filter_model=model, teacher_model=model, eval_model=model, device=device, workers=WORKERS,
                    eval_batch_size=1024)
    start = time.perf_counter()
    state = run_curriculum(cfg)
    return {"teacher_train_s": teacher_s, "teacher_acc": teacher["test_acc"], "run_s": time.perf_counter() - start,
            "phases": [{k: p[k] for k in ("phase", "train_size", "train_s", "train_img_per_s", "pool_evaluated",
                                          "eval_s", "eval_img_per_s", "select_s", "filter_acc")}
                       for p in state["phases"]],
            "final_acc": state["final"]["acc_mean"], "fast_path": state["fast_path"]}


def graphs_match_eager(device: torch.device, steps: int = 12) -> dict:
    """The same resnet18 KD training (batch 64, one partial batch of 40) eagerly and through CUDA
    graphs: the largest parameter difference and each side's step time."""
    from ccfs_fast.step import GraphedStep

    from .train_throughput import make_step

    out = {}
    params = {}
    for mode in ("eager", "graphs"):
        step = make_step(device, 1, seed=7)
        runner = GraphedStep(step, [64, 40], [7]) if mode == "graphs" else step
        step.students.train()
        rows = torch.randint(0, 4096, (steps, 1, 64), generator=torch.Generator().manual_seed(1)).to(device)
        sync(device)
        start = time.perf_counter()
        for k in range(steps):
            runner(rows[k] if k % 4 else rows[k][:, :40])
        sync(device)
        out[f"{mode}_step_ms"] = (time.perf_counter() - start) / steps * 1000
        params[mode] = [p.detach().float().clone() for p in step.students.parameters()]
    out["max_param_diff"] = max(float((a - b).abs().max()) for a, b in zip(params["eager"], params["graphs"]))
    return out


def preset_run(root: Path, device: str, budget_s: float, teacher_epochs: int) -> dict:
    """`ccfs-fast run --preset cifar10-ipc500` on generated CIFAR-shaped data (50,000 / 10,000, 50
    distilled images per class) in a child process stopped after `budget_s`; per-curriculum seconds
    from its outputs and, for what did not fit, a projection from the measured train rate."""
    import json
    import subprocess
    import sys

    from PIL import Image

    from .train_throughput import preset_trainings

    files = make_data(root, 50_000, 10_000, min(16, os.cpu_count() or 1))
    dx, _ = class_images(500, 10, 32, 5)
    for c in range(10):
        (root / "distilled" / f"{c:02d}").mkdir(parents=True, exist_ok=True)
        for k in range(50):
            Image.fromarray(dx[c * 50 + k]).save(root / "distilled" / f"{c:02d}" / f"{k:03d}.png")
    from beton_builder.build import BuildConfig, build

    build(BuildConfig("folder", root / "distilled", root / "d50.beton", overwrite=True))
    start = time.perf_counter()
    train_teacher(TeacherConfig(pool=files["pool"], test=files["test"], output=root / "t.pt", model="resnet18",
                                recipe=TrainRecipe(epochs=teacher_epochs, lr=0.1, lr_warmup_epochs=0, batch_size=512),
                                device=device, workers=WORKERS, overwrite=True))
    teacher_s = time.perf_counter() - start
    out = root / "preset_run"
    cmd = [sys.executable, "-m", "ccfs_fast.cli", "run", "--preset", "cifar10-ipc500", "--pool", str(files["pool"]),
           "--test", str(files["test"]), "--distilled", str(root / "d50.beton"), "--teacher", str(root / "t.pt"),
           "--score-path", str(root / "scores.npy"), "--device", device, "--eval-batch-size", "1024",
           "--workers", str(WORKERS), "--output-dir", str(out)]
    start = time.perf_counter()
    try:
        subprocess.run(cmd, timeout=max(10.0, budget_s - teacher_s), check=False, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pass
    wall = time.perf_counter() - start
    state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else {"phases": []}
    phases = [{"phase": p["phase"], "train_size": p["train_size"], "train_s": p["train_s"], "eval_s": p["eval_s"],
               "select_s": p["select_s"], "curriculum_s": p["train_s"] + p["eval_s"] + p["select_s"]}
              for p in state["phases"]]
    rates = [p["train_img_per_s"] for p in state["phases"] if p.get("train_img_per_s")]
    rate = float(np.median(rates)) if rates else None
    left = [t for t in preset_trainings() if not t["what"].startswith("filter")
            or int(t["what"].split()[1]) > len(phases)]
    if state.get("final"):
        left = []
    projected = None if rate is None else wall + sum(t["images"] * t["epochs"] * t["models"] / rate for t in left)
    return {"teacher_s": teacher_s, "run_wall_s": wall, "complete": bool(state.get("final")), "phases": phases,
            "final": state.get("final"), "projected_total_s": projected if left else wall,
            "projection_from_rate_img_per_s": rate, "not_run": [t["what"] for t in left]}


def main_graphs(args: argparse.Namespace) -> dict:
    from .train_throughput import measure, preset_trainings, project

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"environment": environment(), "config": {k: str(v) for k, v in vars(args).items()}}
    start = time.perf_counter()
    results["graphs_vs_eager"] = graphs_match_eager(device) if device.type == "cuda" else None
    batches = [32, 64] if args.quick else [32, 64, 128, 512]
    modes = ["eager", "graphs", "bank"] if device.type == "cuda" else ["eager", "bank"]
    results["bench_train"] = measure(device, batches, modes, 1 if args.quick else 3, 2 if args.quick else 20)
    results["projection"] = project(results["bench_train"], preset_trainings())
    used = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        results["preset_run"] = (None if args.quick else
                                 preset_run(Path(tmp), device.type, args.budget - used, args.epochs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, results)
    print(format_table(["mode", "batch", "models", "step ms", "img/s"],
                       [(r["mode"], r["batch_size"], r["models"], r["step_ms"], r["img_per_s"])
                        for r in results["bench_train"]]))
    if results["preset_run"]:
        run = results["preset_run"]
        print(format_table(["phase", "train set", "train s", "eval s", "select s", "curriculum s"],
                           [list(p.values()) for p in run["phases"]]))
        print(f"preset run: complete {run['complete']}, wall {run['run_wall_s']:.0f} s, total (projected where not "
              f"run) {run['projected_total_s']}")
    print(f"graphs vs eager: {results['graphs_vs_eager']}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--pool", type=int, default=50_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=150, help="timed KD training steps per setting")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the teacher and of each CCFS model")
    parser.add_argument("--model", default="resnet18_cifar", help="the CCFS run's models")
    parser.add_argument("--skip-rates", action="store_true", help="only the CCFS run")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: 3,000 images, few steps")
    parser.add_argument("--graphs", action="store_true",
                        help="bench train, graphs vs eager, and the cifar10-ipc500 preset run (issue 10's check)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole --graphs check")
    args = parser.parse_args(argv)
    if args.graphs:
        import numba

        torch.set_num_threads(WORKERS)
        numba.set_num_threads(min(WORKERS, numba.config.NUMBA_NUM_THREADS))
        return main_graphs(args)
    if args.quick:
        args.pool, args.test, args.steps, args.epochs = 3000, 500, 4, 1
    import numba

    torch.set_num_threads(WORKERS)  # importing FFCV set both to 1 (ffcv/pipeline/compiler.py)
    numba.set_num_threads(min(WORKERS, numba.config.NUMBA_NUM_THREADS))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"environment": environment(), "config": {k: str(v) for k, v in vars(args).items()}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        files = make_data(root, args.pool, args.test, min(16, os.cpu_count() or 1))
        results["data_s"] = time.perf_counter() - start
        space = IndexSpace(BetonFile.open(files["pool"]))
        for batch in () if args.skip_rates else (128, 512):
            rate = loader_rate(space, min(args.pool, 20_000), batch, device, 3)
            rows.append(("train loader (resident, crop+flip+normalise)", f"batch {batch}", rate))
        settings = () if args.skip_rates else (("on", FAST_ON if device.type == "cuda" else FAST_ON.resolve("cpu")),
                                               ("off", FAST_OFF))
        for name, fast in settings:
            for batch in (128, 512):
                rows.append((f"KD training resnet18_cifar, fast path {name}", f"batch {batch}",
                             train_rate(space, device, fast, batch, args.steps)))
            rows.append((f"pool prediction resnet18_cifar, fast path {name}", "batch 1024",
                         predict_rate(space, device, fast, 1024)))
        results["rates"] = [{"what": w, "setting": s, "img_per_s": r} for w, s, r in rows]
        results["ccfs_run"] = ccfs_run(files, root, device.type, args.epochs, args.model)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, results)
    if rows:
        print(format_table(["measure", "setting", "images/s"], rows))
    print(format_table(["phase", "train set", "train s", "train img/s", "evaluated", "eval s", "eval img/s",
                        "select s", "filter acc"],
                       [list(p.values()) for p in results["ccfs_run"]["phases"]]))
    print(f"device: {results['environment']['cuda'] or 'cpu'}; teacher acc {results['ccfs_run']['teacher_acc']}, "
          f"final acc {results['ccfs_run']['final_acc']}")
    return results


if __name__ == "__main__":
    main()
