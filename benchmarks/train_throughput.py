"""KD training images/s of resnet18 (the paper's network) at 32x32, one process: the capturable step
run eagerly (`eager`), captured into a CUDA graph and replayed (`graphs`, CUDA only), and 5 models
trained as one fused bank (`bank`, graphs on CUDA when they capture); plus a projection of the
`cifar10-ipc500` preset's training wall-clock from the measured rates, per mode.

A step = each model's batch gathered from the resident uint8 set, augmented on the device, teacher
(resnet18) forward, student forward and backward, KD loss, SGD step. img/s counts model-images (a
bank step of batch b trains 5 b). Run: `ccfs-fast bench train [--quick] [--json FILE]`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ccfs_fast.config import PRESETS, TrainRecipe
from ccfs_fast.datasets import auto_batch_size
from ccfs_fast.fused import FusedBank
from ccfs_fast.models import create_model
from ccfs_fast.select import curriculum_arrangement
from ccfs_fast.step import GraphedStep, KDStep, Single, StepConfig
from ccfs_fast.tables import format_table

from .common import write_rows

BANK = 5
SIDE, CLASSES, RESIDENT = 32, 10, 4096


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(device: torch.device, models: int, seed: int = 0) -> KDStep:
    """A KD step of `models` resnet18 students (fused when more than one) with a resnet18 teacher."""
    cuda = device.type == "cuda"
    images = torch.randint(0, 256, (RESIDENT, 3, SIDE, SIDE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed)).to(device)
    nets = []
    for m in range(models):
        torch.manual_seed(seed + m)
        nets.append(create_model("resnet18", CLASSES, SIDE).to(device, memory_format=_layout(cuda)))
    torch.manual_seed(seed + 100)
    teacher = create_model("resnet18", CLASSES, SIDE).to(device, memory_format=_layout(cuda)).eval()
    students = FusedBank(nets, cuda) if models > 1 else Single(nets[0], cuda)
    inv = torch.full((1, 3, 1, 1), 1 / (255 * 0.2), device=device)
    shift = torch.full((1, 3, 1, 1), -0.48 / 0.2, device=device)
    gens = [torch.Generator(device=device).manual_seed(seed + m) for m in range(models)]
    cfg = StepConfig(TrainRecipe(lr=0.05), 4.0, fused_optimizer=cuda, channels_last=cuda)
    return KDStep(students, students, teacher, images, gens, inv, shift, cfg)


def _layout(cuda: bool) -> torch.memory_format:
    return torch.channels_last if cuda else torch.contiguous_format


def step_seconds(step: KDStep, batch: int, graphs: bool, warmup: int, repeats: int) -> float:
    """Median seconds of one step (of every model) at batch size `batch`."""
    device = step.device
    runner = GraphedStep(step, [batch], [0] * len(step.generators)) if graphs else step
    rows = torch.randint(0, RESIDENT, (repeats + warmup, len(step.generators), batch), device=device)
    step.students.train()
    times = []
    for k in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        runner(rows[k])
        _sync(device)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: torch.device, batch_sizes: list[int], modes: list[str], warmup: int, repeats: int) -> list[dict]:
    rows = []
    for mode in modes:
        models = BANK if mode == "bank" else 1
        graphs = mode == "graphs" or (mode == "bank" and device.type == "cuda")
        for batch in batch_sizes:
            step = make_step(device, models)
            try:
                seconds = step_seconds(step, batch, graphs, warmup, repeats)
            except RuntimeError as exc:  # e.g. a bank too large for the device at this batch size
                print(f"{mode} batch {batch}: skipped ({' '.join(str(exc).split())[:120]})")
                continue
            rows.append({"mode": mode, "batch_size": batch, "models": models, "graphs": graphs,
                         "step_ms": seconds * 1000, "img_per_s": models * batch / seconds, "device": str(device)})
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def preset_trainings(name: str = "cifar10-ipc500", classes: int = CLASSES) -> list[dict]:
    """The KD trainings a preset runs: each filter and the final evaluation (train-set size, batch
    size from the dataset's 'auto' rule, epochs, models)."""
    preset = PRESETS[name]
    cpc = int(preset["image_per_class"] * preset["alpha"] + 1e-9)
    arrangement = curriculum_arrangement(preset["image_per_class"] - cpc, preset["curriculum_num"])
    size, out = cpc * classes, []
    for phase, curpc in enumerate(arrangement, 1):
        out.append({"what": f"filter {phase}", "images": size, "models": 1})
        size += curpc * classes
    out.append({"what": "final evaluation", "images": size, "models": preset["num_eval"]})
    for t in out:
        t.update(epochs=preset["epochs"], batch_size=auto_batch_size(t["images"], classes, "cifar10"))
    return out


def project(rows: list[dict], trainings: list[dict]) -> list[dict]:
    """Seconds of each preset training per mode, from the measured rates: eager and graphs train the
    evaluation models one after another; bank trains them as one fused bank (filters at the best
    single-model mode). None where a needed rate was not measured."""
    rate = {(r["mode"], r["batch_size"]): r["img_per_s"] for r in rows}
    single = "graphs" if any(r["mode"] == "graphs" for r in rows) else "eager"
    out = []
    for mode in sorted({r["mode"] for r in rows}):
        total = 0.0
        for t in trainings:
            work = t["images"] * t["epochs"] * t["models"]  # model-images
            fused = mode == "bank" and t["models"] > 1
            key = (mode if fused or mode != "bank" else single, t["batch_size"])
            if key not in rate:
                total = None
                break
            total += work / rate[key]
        out.append({"mode": mode, "preset": "cifar10-ipc500", "projected_s": total})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ccfs-fast bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 512])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--quick", action="store_true",
                        help="batch 32 and 64, 1 warm-up and 2 timed steps on the CPU (5 on CUDA)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        args.batch_sizes, args.warmup, args.repeats = [32, 64], 1, (5 if cuda else 2)
    modes = ["eager", "graphs", "bank"] if cuda else ["eager", "bank"]
    rows = measure(device, args.batch_sizes, modes, args.warmup, args.repeats)
    trainings = preset_trainings()
    projections = project(rows, trainings)
    config = {"batch_sizes": args.batch_sizes, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
              "model": "resnet18", "teacher": "resnet18", "side": SIDE, "bank_models": BANK,
              "preset_trainings": trainings}
    write_rows(args.json, rows + [{"projection": True, **p} for p in projections], config)
    print(format_table(["mode", "batch", "models", "graphs", "step ms", "img/s", "device"],
                       [(r["mode"], r["batch_size"], r["models"], r["graphs"], r["step_ms"], r["img_per_s"],
                         r["device"]) for r in rows]))
    print(format_table(["mode", "cifar10-ipc500 training, projected", "hours"],
                       [(p["mode"], "n/a" if p["projected_s"] is None else f"{p['projected_s']:,.0f} s",
                         "n/a" if p["projected_s"] is None else f"{p['projected_s'] / 3600:.2f}")
                        for p in projections]))
    return rows


if __name__ == "__main__":
    main()
