"""KD training images/s of resnet18 (the paper's network) at 32x32, one process: the capturable step
run eagerly (`eager`), captured into a CUDA graph and replayed (`graphs`, CUDA only), and 5 models
trained as one fused bank (`bank`, graphs on CUDA when they capture); plus a projection of the
`cifar10-ipc500` preset's training wall-clock from the measured rates, per mode.

A step = each model's batch gathered from the resident uint8 set, augmented on the device, teacher
(resnet18) forward, student forward and backward, KD loss, SGD step. img/s counts model-images (a
bank step of batch b trains 5 b). The modes a ratio compares are measured together in one process, their
steps interleaved (graphs with eager; the 5 models together with the same 5 models trained one after
another by the single-model step, graphed on CUDA), and each ratio names its denominator.
Run: `ccfs-fast bench train [--quick] [--json FILE]`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import torch

from beton_builder.base.errors import CCFSError, one_line
from beton_builder.base.tables import format_table
from ccfs_fast.data.datasets import auto_batch_size
from ccfs_fast.runs.presets import PRESETS
from ccfs_fast.selection.kernels import curriculum_arrangement
from ccfs_fast.train.graphs import GraphedStep
from ccfs_fast.train.loop import sync
from ccfs_fast.train.models import create_model
from ccfs_fast.train.recipe import TrainRecipe
from ccfs_fast.train.step import Single, StepConfig, TrainStep

from .common import HelpFormatter, interleaved_medians, write_rows

BANK = 5
SIDE, CLASSES, RESIDENT = 32, 10, 4096


LAYOUT_MODES = ("bank_nchw", "bank_channels_last", "streams")  # M models together (ccfs_fast.train.students)


def make_step(device: torch.device, models: int, seed: int = 0, layout: str | None = None, bf16: bool = False,
              model: str = "resnet18", side: int = SIDE) -> TrainStep:
    """A KD step of `models` students (one: Single; more: together in `layout`, one of
    ccfs_fast.train.students.BANK_LAYOUTS) with a teacher of the same architecture, over a resident set."""
    from ccfs_fast.train.students import BANK_LAYOUTS

    cuda = device.type == "cuda"
    images = torch.randint(0, 256, (RESIDENT, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed)).to(device)
    nets = []
    for m in range(models):
        torch.manual_seed(seed + m)
        nets.append(create_model(model, CLASSES, side).to(device, memory_format=_layout(cuda)))
    torch.manual_seed(seed + 100)
    teacher = create_model(model, CLASSES, side).to(device, memory_format=_layout(cuda)).eval()
    students = Single(nets[0], cuda) if models == 1 else BANK_LAYOUTS[layout or "bank_nchw"](nets, side, cuda)
    inv = torch.full((1, 3, 1, 1), 1 / (255 * 0.2), device=device)
    shift = torch.full((1, 3, 1, 1), -0.48 / 0.2, device=device)
    gens = [torch.Generator(device=device).manual_seed(seed + m) for m in range(models)]
    cfg = StepConfig(TrainRecipe(lr=0.05), 4.0, fused_optimizer=cuda, channels_last=cuda, bf16=bf16)
    return TrainStep(students, students, teacher, images, gens, inv, shift, cfg)


def _layout(cuda: bool) -> torch.memory_format:
    return torch.channels_last if cuda else torch.contiguous_format


def bench_rows(steps: int, models: int, batch: int, high: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Random train-set rows int64 [steps, models, batch] drawn on the CPU from a generator of their own,
    then moved: never from a device's default generator, which a failed CUDA graph capture can leave
    in capture mode (a later draw from it raises)."""
    return torch.randint(0, high, (steps, models, batch), generator=torch.Generator().manual_seed(seed)).to(device)


def runner_for(step: TrainStep, batch: int, graphs: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], str | None]:
    """(the step, captured into a CUDA graph at `batch` when `graphs`, why graphs did not run or None).
    A capture that fails runs the step eagerly, and says so."""
    if not graphs:
        return step, None
    try:
        return GraphedStep(step, [batch], [0] * len(step.generators)), None
    except (RuntimeError, AssertionError) as exc:
        return step, f"capture failed ({' '.join(str(exc).split())[:120]}); ran eagerly"


def timed_step(step: TrainStep, runner: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> float:
    """Seconds of one step of every model, the device's queue drained before and after."""
    sync(step.device)
    start = time.perf_counter()
    runner(rows)
    sync(step.device)
    return time.perf_counter() - start


def step_seconds(step: TrainStep, batch: int, graphs: bool, warmup: int, repeats: int) -> tuple[float, str | None]:
    """(median seconds of one step of every model at batch `batch`, why graphs did not run or None)."""
    runner, off = runner_for(step, batch, graphs)
    rows = bench_rows(repeats + warmup, len(step.generators), batch, step.images.shape[0], step.device)
    step.students.train()
    times = [timed_step(step, runner, rows[k]) for k in range(warmup + repeats)]
    return statistics.median(times[warmup:]), off


def measure(device: torch.device, groups: list[tuple[int, list[str]]], warmup: int, repeats: int,
            precisions: tuple[str, ...] = ("fp32",), model: str = "resnet18", side: int = SIDE,
            on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per mode x precision x batch: `eager` / `graphs` (one model), `bank_nchw`,
    `bank_channels_last`, `streams` (BANK models together; graphs on CUDA), each row saying what
    actually ran (graphs used or why not, the layout) or why it was skipped. `groups`: (batch, modes)
    measured together, their steps interleaved in one process (measure_group), so each ratio within a
    group compares like with like. `on_row(row)` gets each group's rows as soon as they are measured (a
    caller that may be stopped keeps what was done)."""
    rows = []
    for precision in precisions:
        for batch, modes in groups:
            group = measure_group(device, modes, batch, precision, warmup, repeats, model, side)
            for row in group:
                rows.append(row)
                if "skipped" in row:
                    print(f"{row['mode']} {precision} batch {batch}: skipped ({row['skipped']})")
                if on_row is not None:
                    on_row(row)
    return rows


def measure_group(device: torch.device, modes: list[str], batch: int, precision: str, warmup: int, repeats: int,
                  model: str = "resnet18", side: int = SIDE) -> list[dict]:
    """Rows of `modes` at one batch size, measured interleaved: every mode's step is built (and captured)
    first, then each round times one step of every mode, in alternating order (interleaved_medians), so
    a drifting clock or another job weighs on every mode alike. A mode that cannot be built (out of
    memory, a layout that cannot hold the models, a failed CUDA call) is its row's `skipped` reason;
    the memory is freed in every case."""
    heads, runners = {}, {}
    group = f"{precision} b{batch}: {' + '.join(modes)}"
    try:
        for mode in modes:
            models = BANK if mode in LAYOUT_MODES else 1
            want = mode == "graphs" or (mode in LAYOUT_MODES and device.type == "cuda")
            heads[mode] = {"mode": mode, "precision": precision, "batch_size": batch, "models": models,
                           "model": model, "side": side, "device": str(device), "group": group,
                           "measured_with": [m for m in modes if m != mode]}
            try:
                step = make_step(device, models, layout=mode if models > 1 else None, bf16=precision == "bf16",
                                 model=model, side=side)
                runner, off = runner_for(step, batch, want)
                step.students.train()
                runners[mode] = (step, runner, bench_rows(warmup + repeats, models, batch, RESIDENT, device))
                heads[mode].update(graphs=want and off is None, graphs_off=off)
            except (RuntimeError, CCFSError) as exc:
                heads[mode]["skipped"] = one_line(exc)
        single = next((m for m in ("graphs", "eager") if m in heads), None)
        for mode in modes:
            if mode in LAYOUT_MODES and single is not None:  # what a bank's rate is divided by
                graphed = "graphed" if heads[single].get("graphs") else "eager"
                heads[mode].update(denominator=single, denominator_is=f"the same {BANK} models, each {graphed}, "
                                                                      f"one after another ({single} row)")
        for step, runner, rows in runners.values():
            for k in range(warmup):
                timed_step(step, runner, rows[k])
        counters = dict.fromkeys(runners, warmup)

        def one(mode: str) -> float:
            step, runner, rows = runners[mode]
            counters[mode] += 1
            return timed_step(step, runner, rows[counters[mode] - 1])

        medians = interleaved_medians({mode: (lambda mode=mode: one(mode)) for mode in runners}, repeats)
        for mode, seconds in medians.items():
            heads[mode].update(step_ms=seconds * 1000, img_per_s=heads[mode]["models"] * batch / seconds)
        return [heads[mode] for mode in modes]
    except (RuntimeError, CCFSError) as exc:  # a step that fails while timed: every unfinished row says so
        return [{**heads.get(mode, {"mode": mode, "batch_size": batch, "precision": precision}),
                 "skipped": one_line(exc)} if "img_per_s" not in heads.get(mode, {}) else heads[mode]
                for mode in modes]
    finally:
        runners.clear()
        if device.type == "cuda":
            with suppress(RuntimeError):  # a sticky CUDA error: the row says what failed
                torch.cuda.empty_cache()


def default_groups(batch_sizes: list[int], cuda: bool) -> list[tuple[int, list[str]]]:
    """Per batch size, the single model eager and graphed, then the BANK models together beside the best
    single-model step (their denominator), each group measured interleaved."""
    single = ["eager", "graphs"] if cuda else ["eager"]
    return [(b, single) for b in batch_sizes] + [(b, [single[-1], *LAYOUT_MODES]) for b in batch_sizes]


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
    """Seconds of the preset's trainings per mode and precision, from the measured rates: `eager` and
    `graphs` train the evaluation models one after another; a layout mode trains them together (its
    filters at the best single-model mode). None where a needed rate was not measured."""
    rate = {(r["mode"], r["precision"], r["batch_size"]): r["img_per_s"] for r in rows if "img_per_s" in r}
    out = []
    for precision in sorted({r["precision"] for r in rows}):
        single = "graphs" if any(k[:2] == ("graphs", precision) for k in rate) else "eager"
        for mode in sorted({k[0] for k in rate if k[1] == precision}):
            total = 0.0
            for t in trainings:
                work = t["images"] * t["epochs"] * t["models"]  # model-images
                together = mode in LAYOUT_MODES and t["models"] > 1
                key = (mode if together or mode not in LAYOUT_MODES else single, precision, t["batch_size"])
                if key not in rate:
                    total = None
                    break
                total += work / rate[key]
            out.append({"mode": mode, "precision": precision, "preset": "cifar10-ipc500", "projected_s": total})
    return out


def _group(rows: list[dict], precision: str, batch: int, member: str, *also: str) -> dict[str, dict]:
    """The measured rows, by mode, of the last group at `batch` (rows measured together) that holds
    `member` and every mode of `also` ({} when none does)."""
    groups = {}
    for r in rows:
        if r.get("precision") == precision and r["batch_size"] == batch and "img_per_s" in r:
            groups.setdefault(r.get("group"), {})[r["mode"]] = r
    found = [g for g in groups.values() if member in g and all(m in g for m in also)]
    return found[-1] if found else {}


def targets(rows: list[dict], precision: str = "fp32") -> dict:
    """The ratios the GPU targets are stated in, each between rows measured together (measure_group):
    graphs over eager at batch 32 (target 4x), and the fastest way of training BANK models together at
    batch 64 over the same BANK models trained one after another with the single-model step of their
    group (graphed where graphs ran, else eager: one after another trains at that step's img/s; target
    1.5x), the denominator named. None where not measured."""
    pair = _group(rows, precision, 32, "graphs", "eager")
    graphs = (pair["graphs"]["img_per_s"] / pair["eager"]["img_per_s"]
              if "eager" in pair and pair["graphs"].get("graphs") else None)
    bank = next((g for m in LAYOUT_MODES if (g := _group(rows, precision, 64, m))), {})
    single = next((bank[m] for m in ("graphs", "eager") if m in bank), None)
    together = {m: bank[m]["img_per_s"] for m in LAYOUT_MODES if m in bank}
    best = max(together, key=together.get) if together else None
    denominator = None if single is None else (
        f"{BANK} separate models {'graphed' if single.get('graphs') else 'eager'}, one after another "
        f"({single['mode']} row, batch 64)")
    ratio = {m: v / single["img_per_s"] for m, v in together.items()} if single else {}
    return {"precision": precision, "graphs_over_eager_b32": graphs,
            "bank_over_sequential_b64": ratio.get(best) if best else None, "bank_best_layout": best,
            "bank_denominator": denominator, "per_layout_over_sequential_b64": ratio}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ccfs-fast bench train", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64], help="the preset's batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "bf16"),
                        help="fp32 = PyTorch's defaults (TF32 convolutions on a GPU, as the paper's code); "
                             "default: fp32 and bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--model", default="resnet18", help="students' and teacher's architecture")
    parser.add_argument("--side", type=int, default=SIDE, help="image side in pixels")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up and 2 timed steps on the CPU (5 on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # as real runs have it
    if args.quick:
        args.warmup, args.repeats = 1, (5 if cuda else 2)
    precisions = tuple(args.precisions or (("fp32", "bf16") if cuda else ("fp32",)))
    rows = measure(device, default_groups(args.batch_sizes, cuda), args.warmup, args.repeats, precisions, args.model,
                   args.side)
    trainings = preset_trainings()
    projections = project(rows, trainings)
    ratios = [targets(rows, p) for p in precisions]
    config = {"batch_sizes": args.batch_sizes, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
              "model": args.model, "teacher": args.model, "side": args.side, "bank_models": BANK,
              "precisions": list(precisions), "preset_trainings": trainings}
    write_rows(args.json, rows + [{"projection": True, **p} for p in projections]
               + [{"targets": True, **r} for r in ratios], config)
    print(format_table(["mode", "precision", "batch", "models", "graphs ran", "step ms", "img/s"],
                       [(r["mode"], r["precision"], r["batch_size"], r["models"],
                         r.get("graphs_off") or r.get("skipped") or r.get("graphs"), r.get("step_ms", "-"),
                         r.get("img_per_s", "-")) for r in rows]))
    print(format_table(["mode", "precision", "cifar10-ipc500 training, projected", "hours"],
                       [(p["mode"], p["precision"], "n/a" if p["projected_s"] is None else f"{p['projected_s']:,.0f} s",
                         "n/a" if p["projected_s"] is None else f"{p['projected_s'] / 3600:.2f}")
                        for p in projections]))
    print(format_table(["precision", "graphs / eager b32 (4x)", "best together / sequential b64 (1.5x)", "layout",
                        "sequential = "],
                       [(r["precision"], r["graphs_over_eager_b32"] or "n/a", r["bank_over_sequential_b64"] or "n/a",
                         r["bank_best_layout"] or "n/a", r["bank_denominator"] or "n/a") for r in ratios]))
    return rows


if __name__ == "__main__":
    main()
