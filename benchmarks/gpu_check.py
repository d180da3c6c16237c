"""GPU device check. `--graphs` (the current check; `benchmarks/gpu_check.sh --graphs` on a lent GPU
machine): stages, each under its own time limit and try/except, the JSON (a `stages` list) rewritten
after every stage, the whole under --budget seconds by its own clock, a table last:

  data         CIFAR-shaped pool / test / distilled .beton files and scores, before CUDA starts
  teacher      a resnet18 teacher, 2 epochs
  exactness    CUDA graphs against eager steps with TF32 off and deterministic cuDNN
  kd_steps     KD steps at batch 32 / 64, fp32 (PyTorch's defaults: TF32 convolutions) and bf16:
               eager, graphs, and 5 models together (fused NCHW, fused channels-last, 5 streams)
  preset_fp32  the complete `run --preset cifar10-ipc500` at --preset-epochs (50), projected to 500
  preset_bf16  the same with --bf16

`--quick` is the CPU form the tests run (small data, tiny models, 1 epoch). Without --graphs: the
earlier check (loader, training and prediction rates with the fast path on and off, a small run)."""
from __future__ import annotations

import argparse
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
from ccfs_fast.processes import available_cpus
from ccfs_fast.tables import format_table
from ccfs_fast.teacher import train_teacher
from ccfs_fast.train import kd_loss, make_optimizer, predict, sync

from .curriculum_wallclock import class_images
from .stages import Stages

WORKERS = min(8, available_cpus())
FAST_ON = FastPath(channels_last=True, bf16=True, cudnn_benchmark=True, fused_optimizer=True)
FAST_OFF = FastPath(channels_last=False, bf16=False, cudnn_benchmark=False, fused_optimizer=False)


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


# --- the staged device check (--graphs): every stage guarded, the JSON written after each -------------

PRESET = "cifar10-ipc500"
QUICK_RUN = ["--image-per-class", "20", "--alpha", "0.2", "--filter-model", "convnet_tiny", "--eval-model",
             "convnet_tiny", "--num-eval", "2", "--lr-warmup-epochs", "0"]  # CPU-sized, same algorithm


def stage_data(root: Path, quick: bool, files: dict) -> dict:
    """CIFAR-shaped pool / test .beton files, a distilled folder of 50 images per class (5 with
    --quick) built with `build folder`, and a score file; before CUDA starts (the writer forks)."""
    from PIL import Image

    from beton_builder.build import BuildConfig, build

    pool, test, per_class = (1000, 200, 5) if quick else (50_000, 10_000, 50)
    files.update(make_data(root, pool, test, min(16, available_cpus())))
    dx, _ = class_images(per_class * 10, 10, 32, 5)
    for c in range(10):
        (root / "distilled" / f"{c:02d}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(dx[c * per_class + k]).save(root / "distilled" / f"{c:02d}" / f"{k:03d}.png")
    build(BuildConfig("folder", root / "distilled", root / "d.beton", overwrite=True))
    files.update(distilled=root / "d.beton", scores=root / "scores.npy")
    return {"pool": pool, "test": test, "distilled_per_class": per_class}


def stage_teacher(files: dict, root: Path, device: str, quick: bool) -> dict:
    start = time.perf_counter()
    model = "convnet_tiny" if quick else "resnet18"
    out = train_teacher(TeacherConfig(pool=files["pool"], test=files["test"], output=root / "teacher.pt", model=model,
                                      recipe=TrainRecipe(epochs=1 if quick else 2, lr=0.1, lr_warmup_epochs=0,
                                                         batch_size=512),
                                      device=device, workers=WORKERS, overwrite=True))
    files["teacher"] = root / "teacher.pt"
    return {"model": model, "test_acc": out["test_acc"], "seconds": time.perf_counter() - start}


def stage_exactness(device: torch.device, steps: int = 12) -> dict:
    """Graph replay against eager steps with TF32 off and deterministic cuDNN: the same resnet18 KD
    training (batch 64 and a partial batch of 40) eagerly twice and once through CUDA graphs. Passes
    when graphs differ from eager by 0 or by no more than eager differs from eager."""
    from ccfs_fast.step import GraphedStep

    from .train_throughput import make_step

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
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
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved

    def gap(a: str, b: str) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(params[a], params[b]))

    graphs, eager = gap("graphs", "eager_a"), gap("eager_b", "eager_a")
    return {"graphs_vs_eager": graphs, "eager_vs_eager": eager, "passed": graphs == 0 or graphs <= eager,
            "step_ms": ms}


def stage_kd_steps(device: torch.device, quick: bool) -> dict:
    """bench train at the preset's batches (32, 64) in the paper's precision and bf16: eager, graphs,
    the three ways of training 5 models together, with cudnn.benchmark on as real runs have it."""
    from .train_throughput import LAYOUT_MODES, measure, preset_trainings, project, targets

    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    precisions = ("fp32", "bf16") if cuda else ("fp32",)
    modes = ["eager", "graphs", *LAYOUT_MODES] if cuda else ["eager", *LAYOUT_MODES]
    kwargs = {"model": "convnet_tiny", "side": 16} if quick else {}
    rows = measure(device, [8] if quick else [32, 64], modes, 1 if quick else 3, 2 if quick else 15, precisions,
                   **kwargs)
    return {"rows": rows, "targets": [targets(rows, p) for p in precisions],
            "projection": project(rows, preset_trainings())}


def stage_preset(files: dict, root: Path, device: str, epochs: int, bf16: bool, limit: float, quick: bool) -> dict:
    """The complete `run --preset cifar10-ipc500` (all filters and the final evaluation) at `epochs`
    in a child process; per training its seconds, rate and how it ran (graphs, layout, fallbacks);
    and the 500-epoch projection: the fixed costs measured here (teacher pass, coarse passes,
    selection, warm-ups) plus the trainings' seconds scaled by 500 / epochs."""
    import json
    import subprocess
    import sys

    out = root / f"preset_{'bf16' if bf16 else 'fp32'}"
    cmd = [sys.executable, "-m", "ccfs_fast.cli", "run", "--preset", PRESET, "--pool", str(files["pool"]),
           "--test", str(files["test"]), "--distilled", str(files["distilled"]), "--teacher", str(files["teacher"]),
           "--score-path", str(files["scores"]), "--device", device, "--eval-batch-size", "1024",
           "--workers", str(WORKERS), "--output-dir", str(out), "--overwrite", "--epochs", str(epochs),
           *(QUICK_RUN if quick else []), *(["--bf16"] if bf16 else [])]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, timeout=max(5.0, limit - 5), capture_output=True, text=True)
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, err = None, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
    wall = time.perf_counter() - start
    state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else {"phases": []}
    final = state.get("final") or {}
    phases = [{k: p.get(k) for k in ("phase", "train_size", "batch_size", "train_s", "train_img_per_s", "eval_s",
                                      "select_s", "execution")} for p in state["phases"]]
    trainings_s = sum(p["train_s"] for p in phases)
    if final.get("seconds"):
        trainings_s += final["seconds"][0] if final.get("fused") else sum(final["seconds"])
    complete = bool(final.get("accs")) and code == 0
    fixed = wall - trainings_s
    return {"epochs": epochs, "bf16": bf16, "exit_code": code, "complete": complete, "wall_s": wall,
            "phases": phases, "final_execution": final.get("execution"), "final_acc": final.get("acc_mean"),
            "trainings_s": trainings_s, "fixed_s": fixed,
            "projected_500_epochs_s": fixed + trainings_s * 500 / epochs if complete else None,
            "stderr_tail": [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()][-8:]}


def main_graphs(args: argparse.Namespace) -> dict:
    """The staged device check: data (before CUDA), teacher, exactness, KD steps, the complete preset
    in fp32 and in bf16; a table last. Targets on an H200: graphs >= 4x eager at batch 32; 5 models
    together >= 3x five sequential eager models at batch 64; the preset projected under 10 minutes in
    fp32 and under 6 with --bf16."""
    stages = Stages(args.json, args.budget, {"config": {k: str(v) for k, v in vars(args).items()}}, args.fail_stage)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root, files = Path(tmp), {}
        stages.run("data", lambda limit: stage_data(root, args.quick, files), 90)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CUDA starts after the data
        stages.meta["device"] = str(device)
        stages.run("teacher", lambda limit: stage_teacher(files, root, device.type, args.quick), 60)
        if device.type == "cuda":
            stages.run("exactness", lambda limit: stage_exactness(device), 45)
        else:
            stages.skip("exactness", "CUDA only (graphs against eager)")
        stages.run("kd_steps", lambda limit: stage_kd_steps(device, args.quick), 100)
        for bf16 in (False, True):
            name = "preset_bf16" if bf16 else "preset_fp32"
            if "teacher" not in files:
                stages.skip(name, "no teacher (its stage failed)")
                continue
            if bf16 and args.quick:
                stages.skip(name, "--quick runs the preset in fp32 only")
                continue
            stages.run(name, lambda limit, bf16=bf16: stage_preset(files, root, device.type, args.preset_epochs, bf16,
                                                                    limit, args.quick), 170 if not bf16 else 150)
    print(summary(stages))
    return {"stages": stages.records}


def summary(stages: Stages) -> str:
    """The stage table, then the figures the targets are stated in."""
    lines = [stages.table()]
    for record in stages.records:
        figures = record.get("figures") or {}
        if record["stage"] == "kd_steps":
            for t in figures.get("targets", []):
                lines.append(f"{t['precision']}: graphs / eager at batch 32 {t['graphs_over_eager_b32']} (target 4x); "
                             f"5 together / sequential at batch 64 {t['bank_over_sequential_b64']} (target 3x, "
                             f"{t['bank_best_layout']})")
        if record["stage"].startswith("preset_") and figures:
            projected = figures["projected_500_epochs_s"]
            lines.append(f"{record['stage']}: {figures['epochs']} epochs in {figures['wall_s']:.0f} s, complete "
                         f"{figures['complete']}; 500 epochs projected "
                         f"{'n/a' if projected is None else f'{projected / 60:.1f} min'}")
        if record["stage"] == "exactness" and figures:
            lines.append(f"exactness: graphs vs eager {figures['graphs_vs_eager']:.3g}, eager vs eager "
                         f"{figures['eager_vs_eager']:.3g}: {'pass' if figures['passed'] else 'FAIL'}")
    return "\n".join(lines)


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
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for the whole --graphs check")
    parser.add_argument("--fail-stage", default=None, help="make this stage fail on purpose (tests the check)")
    parser.add_argument("--preset-epochs", type=int, default=None,
                        help="--graphs: epochs of the preset runs (default: 50; 1 with --quick)")
    args = parser.parse_args(argv)
    if args.graphs:
        import numba

        args.preset_epochs = args.preset_epochs or (1 if args.quick else 50)
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
        files = make_data(root, args.pool, args.test, min(16, available_cpus()))
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
