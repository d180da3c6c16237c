"""ImageNet-1K at full scale on this machine: a generated ILSVRC-2012 train tree of 1,281,167 images
in 1,000 classes (small JPEGs of varying size, so the build takes minutes, not days), built once
by `build imagenet` into a JPEG .beton, then the teacher pass and one curriculum with a small model,
against the paper's approach measured in the same call.

Stages (each in its own process: clean memory figures; JSON rewritten after every stage):
  tree      the ILSVRC-format tree (train/<wnid>/<wnid>_<k>.JPEG, flat val + LOC_val_solution.csv),
            written once and reused while its marker matches;
  build     `ccfs-fast build imagenet` of it (reused when already built from the same files);
  inputs    a CDA-style distilled folder (ipc x alpha per class), a teacher trained on a sample of the
            pool (4 epochs), c-scores keyed by file name (shuffled rows, as the published file is matched);
  ccfs      open the run (scores aligned by name), the teacher pass over the whole pool (streamed,
            cached on disk) and curriculum 1 (filter trained on the distilled set, lazy coarse pass,
            selection), as `ccfs-fast run --teacher-pass full` does; run --ccfs-repeats times, each in a fresh process
            with an empty cache (the JSON keeps every run; the table shows the median times and the
            largest memory peak);
  ccfs-lazy the same with the lazy teacher pass (the run's default): its seconds and predictions to the
            end of curriculum 1, and the same selection as after the full pass (checked);
  paper     the paper's approach: torchvision ImageFolder over the train tree with PIL decoding and
            per-image transforms in a DataLoader, the whole pool predicted for the teacher pass and by
            every curriculum's filter; the filter trained on the distilled folder with per-sample
            transforms; selection with Python sets and sorts. Its two pool passes are timed on a
            stride sample of --baseline-fraction of the pool (its files read once beforehand, untimed,
            so they come from the page cache as the ccfs side's .beton does) and scaled by its inverse
            (said in the JSON); training and selection run at full scale (selection on predictions
            extrapolated from the sample).

Memory: the peak anonymous resident memory (RssAnon, sampled every 20 ms: the process's own memory,
not the file pages FFCV maps) of each stage's main process, against the pool's size on disk.
Run: `ccfs-fast bench imagenet-scale [--pool N] [--root DIR] [--json FILE]`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from benchmarks.imagenet_tree import ILSVRC_TRAIN, ScaleSpec, class_pattern, write_tree
from beton_builder.base.tables import format_table

from .common import HelpFormatter, write_rows

TARGET_RSS_ANON_GB = 3.0
TARGET_SPEEDUP = 5.0
















class AnonPeak:
    """Samples this process's RssAnon (anonymous resident memory: heap, tensors, arrays; not mapped
    file pages) every 20 ms in a thread; `peak_gb` is the largest seen."""

    def __init__(self):
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, self.now_kb())

    def __enter__(self) -> AnonPeak:
        self.peak_kb = self.now_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.now_kb())

    @property
    def peak_gb(self) -> float:
        return self.peak_kb / 2**20


def stage_build(spec: ScaleSpec) -> dict:
    from beton_builder.build import BuildConfig, build, kept_stream
    from beton_builder.imagenet import read_imagenet

    train = spec.betons / "imagenet_train.beton"
    config = BuildConfig("imagenet", spec.tree, spec.betons, workers=spec.workers, max_side=spec.max_side)
    stale = train.exists() and kept_stream(train, read_imagenet(spec.tree)["train"], config.jpeg()) is None
    with AnonPeak() as anon:  # a build of other files (an older tree) is replaced, a build of these kept
        start = time.perf_counter()
        results = build(replace(config, overwrite=stale))
        seconds = time.perf_counter() - start
    train = results[0]
    return {"seconds": seconds, "reused": train[2] == 0.0, "images": train[1].n,
            "img_per_s": train[1].n / seconds if train[2] else None, "beton_bytes": train[1].beton_size,
            "rss_anon_peak_gb": anon.peak_gb}


def stage_inputs(spec: ScaleSpec) -> dict:
    """Distilled folder, teacher (trained on a sample of the pool), shuffled name-keyed c-scores."""
    import torch
    from PIL import Image

    from beton_builder.beton import BetonFile
    from beton_builder.build import BuildConfig, build
    from beton_builder.manifest import recorded_names
    from ccfs_fast.data.readers import read_labels
    from ccfs_fast.data.space import IndexSpace
    from ccfs_fast.train.models import create_model, save_checkpoint
    from ccfs_fast.train.recipe import FastPath, TrainRecipe
    from ccfs_fast.train.supervised import train_supervised

    root = Path(spec.root)
    start = time.perf_counter()
    cpc = int(spec.ipc * spec.alpha + 1e-9)
    rng = np.random.default_rng(spec.seed + 1)
    for c in range(spec.classes):
        folder = root / "distilled" / f"new{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(cpc):
            Image.fromarray(class_pattern(c, spec.side, spec.side, rng)).save(folder / f"class{c:03d}_id{k:03d}.jpg",
                                                                               quality=95)
    distilled = root / "distilled.beton"
    build(BuildConfig("folder", root / "distilled", distilled, overwrite=True, workers=spec.workers))
    pool_path = spec.betons / "imagenet_train.beton"
    pool = BetonFile.open(pool_path)
    labels = read_labels(pool, spec.workers)
    sample = np.sort(rng.choice(pool.n, min(spec.teacher_sample, pool.n), replace=False))
    space = IndexSpace(pool, side=spec.side)
    torch.manual_seed(spec.seed)
    teacher = create_model(spec.model, spec.classes, spec.side)
    # crops of half the image or more keep most of the class's cell layout
    result = train_supervised(teacher, space, sample, 256, TrainRecipe(epochs=4, lr=0.1, lr_warmup_epochs=0),
                              FastPath().resolve("cpu"), torch.device("cpu"), spec.seed, spec.workers, scale=(0.5, 1.0))
    save_checkpoint(teacher, root / "teacher.pt", arch=spec.model, num_classes=spec.classes)
    names = recorded_names(pool_path)
    perm = rng.permutation(pool.n)
    base = np.char.rpartition(names.astype(str), "/")[:, 2]
    np.savez(root / "cscores.npz", filenames=np.char.encode(base[perm]), labels=labels[perm],
             scores=rng.random(pool.n)[perm])
    return {"seconds": time.perf_counter() - start, "distilled_per_class": cpc, "teacher_sample": len(sample),
            "teacher_train_s": result.seconds}


def stage_ccfs(spec: ScaleSpec, teacher_pass: str = "full") -> dict:
    """The run's set-up, teacher pass and curriculum 1, as `ccfs-fast run` makes them. `full`: the
    teacher predicts the whole pool first (the stage the paper's pass is compared with); `lazy` (the
    run's default): it predicts what curriculum 1's coarse pass reaches, timed and counted apart."""
    from ccfs_fast.data.threads import process_settings

    process_settings(spec.workers)
    from beton_builder.base.digests import file_sha256
    from beton_builder.manifest import recorded_names
    from ccfs_fast.runs.config import Machine, RunConfig
    from ccfs_fast.runs.phase import run_phase
    from ccfs_fast.runs.teacher_pass import open_teacher_pass
    from ccfs_fast.runs.workspace import open_workspace
    from ccfs_fast.selection.kernels import curriculum_arrangement, warm_up_kernels
    from ccfs_fast.selection.scores import easy_first_key, load_scores
    from ccfs_fast.train.recipe import TrainRecipe
    from ccfs_fast.train.settings import compose

    root = Path(spec.root)
    cfg = compose(RunConfig, dict(pool=spec.betons / "imagenet_train.beton", test=spec.betons / "imagenet_test.beton",
                    distilled=root / "distilled.beton", teacher=root / "teacher.pt", output_dir=root / "unused",
                    score_path=root / "cscores.npz", score="cscore", image_per_class=spec.ipc, alpha=spec.alpha,
                    shortfall="short", recipe=TrainRecipe(epochs=spec.epochs, lr=0.05, lr_warmup_epochs=1),
                    num_eval=0, filter_model=spec.model, eval_model=spec.model, seed=spec.seed, workers=spec.workers,
                    train_side=spec.side))
    with AnonPeak() as anon:
        start = time.perf_counter()
        ws = open_workspace(cfg.inputs, cfg.selection.cpc, Machine(workers=spec.workers, eval_batch_size=1024))
        key = easy_first_key(load_scores(cfg.selection.score_path, ws.pool_labels, [],
                                         lambda: recorded_names(cfg.inputs.pool)), "cscore")
        warm_up_kernels()
        ws.warm()
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        teacher = open_teacher_pass(ws, file_sha256(cfg.inputs.teacher), teacher_pass)
        teacher_s = time.perf_counter() - start
        curpc = curriculum_arrangement(cfg.selection.spc, cfg.selection.curriculum_num)[0]
        start = time.perf_counter()
        outcome = run_phase(ws, cfg, 1, curpc, np.zeros(0, np.int64), teacher, key)
        curriculum_s = time.perf_counter() - start
    r = outcome.record
    teacher_s += r.teacher_s  # a lazy pass's predictions inside the curriculum are the teacher pass's
    ok, cached = teacher.correct_mask(), teacher.made == 0
    return {"setup_s": setup_s, "teacher_pass_s": teacher_s, "teacher_pass_cached": cached,
            "teacher_pass": teacher_pass, "teacher_predicted": teacher.known,
            "curriculum_without_teacher_s": curriculum_s - r.teacher_s,
            "teacher_pass_img_per_s": teacher.known / teacher_s, "teacher_correct": int(ok.sum()),
            "curriculum_s": curriculum_s, "train_s": r.train_s, "eval_s": r.eval_s, "select_s": r.select_s,
            "pool_evaluated": r.pool_evaluated, "pool_eligible": r.pool_eligible,
            "selected": len(outcome.picked), "train_data": r.execution["train_data"],
            "selection_sha256": hashlib.sha256(np.asarray(outcome.picked, np.int64).tobytes()).hexdigest(),
            "rss_anon_peak_gb": anon.peak_gb}


def stage_paper(spec: ScaleSpec) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from beton_builder.manifest import read_manifest
    from ccfs_fast.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from ccfs_fast.selection.kernels import curriculum_arrangement
    from ccfs_fast.train.models import create_model, load_checkpoint
    from ccfs_fast.train.recipe import TrainRecipe

    from .baseline_paper import FirstPerClass, train_kd
    from .paper_selection import reference_select

    torch.set_num_threads(spec.workers)
    root = Path(spec.root)
    with AnonPeak() as anon:
        start = time.perf_counter()
        eval_tf = transforms.Compose([transforms.Resize(round(spec.side * 256 / 224)), transforms.CenterCrop(spec.side),
                                      transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder = datasets.ImageFolder(str(spec.tree / "train"), transform=eval_tf)
        labels = np.asarray(folder.targets, np.int64)
        teacher = load_checkpoint(create_model(spec.model, spec.classes, spec.side), root / "teacher.pt", spec.model)
        setup_s = time.perf_counter() - start
        stride = max(1, round(1 / spec.baseline_fraction))
        sample = np.arange(0, len(folder), stride)
        scale = len(folder) / len(sample)
        for i in sample:  # untimed: the files into the page cache, as the ccfs side's .beton is after its build
            Path(folder.samples[i][0]).read_bytes()

        @torch.inference_mode()
        def pool_pass(model) -> tuple[np.ndarray, float]:
            model.eval()
            loader = DataLoader(Subset(folder, sample.tolist()), batch_size=256, num_workers=spec.workers)
            begin = time.perf_counter()
            pred = torch.cat([model(x).argmax(1) for x, _ in loader]).numpy()
            return pred, time.perf_counter() - begin

        teacher_pred, teacher_sample_s = pool_pass(teacher)
        full = lambda values: np.repeat(values, stride)[: len(folder)]  # noqa: E731  (the sample's, extrapolated)
        teacher_ok = np.flatnonzero(full(teacher_pred) == labels).tolist()
        cpc = int(spec.ipc * spec.alpha + 1e-9)
        curpc = curriculum_arrangement(spec.ipc - cpc, 3)[0]
        start = time.perf_counter()
        train_tf = transforms.Compose([transforms.RandomResizedCrop(spec.side), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        distilled = FirstPerClass(str(root / "distilled"), cpc, train_tf)
        torch.manual_seed(spec.seed)
        filt = create_model(spec.model, spec.classes, spec.side)
        loader = DataLoader(distilled, batch_size=64, shuffle=True, num_workers=spec.workers)
        train_kd(filt, teacher, loader, TrainRecipe(epochs=spec.epochs, lr=0.05, lr_warmup_epochs=1), 20.0)
        train_s = time.perf_counter() - start
        filter_pred, filter_sample_s = pool_pass(filt)
        start = time.perf_counter()
        with np.load(root / "cscores.npz") as stored:  # the paper's code reads scores in pool order
            order = np.argsort(np.char.decode(stored["filenames"]))
            scores = stored["scores"][order]
        reference_select(teacher_ok, [], full(filter_pred), labels, spec.classes, scores, "cscore", "simple", curpc,
                         True, "short")
        select_s = time.perf_counter() - start
    eval_s = filter_sample_s * scale
    return {"setup_s": setup_s, "teacher_pass_s": teacher_sample_s * scale, "train_s": train_s, "eval_s": eval_s,
            "select_s": select_s, "curriculum_s": train_s + eval_s + select_s, "pool_evaluated": len(folder),
            "pass_sample": len(sample), "pass_scale": scale,
            "pass_img_per_s": len(sample) / filter_sample_s, "manifest_n": read_manifest(
                spec.betons / "imagenet_train.beton").n, "rss_anon_peak_gb": anon.peak_gb}


def stage_ccfs_lazy(spec: ScaleSpec) -> dict:
    return stage_ccfs(spec, "lazy")


STAGES = {"tree": write_tree, "build": stage_build, "inputs": stage_inputs, "ccfs": stage_ccfs,
          "ccfs-lazy": stage_ccfs_lazy, "paper": stage_paper}


def run_stage(name: str, spec: ScaleSpec) -> dict:
    """One stage in a fresh process (its own memory figures; the ccfs stage its own empty cache)."""
    out = Path(spec.root) / f"stage-{name}.json"
    out.unlink(missing_ok=True)
    from ccfs_fast.data.threads import child_env

    env = child_env({**os.environ, "PYTHONUNBUFFERED": "1"}, name != "paper")
    if name.startswith("ccfs"):
        env["XDG_CACHE_HOME"] = str(Path(spec.root) / f"cache-{time.time_ns()}")
    code = ("import json, sys; from benchmarks.imagenet_scale import STAGES, ScaleSpec; "
            f"spec = ScaleSpec(**json.loads({json.dumps(json.dumps(asdict(spec)))})); "
            f"open({str(out)!r}, 'w').write(json.dumps(STAGES[{name!r}](spec)))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return json.loads(out.read_text())


def repeated(runs: list[dict]) -> dict:
    """One stage's figures over its runs: the median of each time and rate (keys ending in _s), the
    largest RssAnon peak, the rest from the first run; every run kept under "runs" (a single run is
    returned as it is)."""
    if len(runs) == 1:
        return runs[0]
    merged = {key: (max(r[key] for r in runs) if key == "rss_anon_peak_gb"
                    else float(np.median([r[key] for r in runs])) if key.endswith("_s")
                    else runs[0][key]) for key in runs[0]}
    return {**merged, "runs": runs}


def summary_rows(results: dict, spec: ScaleSpec) -> list[dict]:
    """teacher pass (full), curriculum 1 (after a full pass), and, when measured, the lazy teacher pass
    (seconds and predictions up to the end of curriculum 1) against the paper's whole-pool pass."""
    ccfs, paper, lazy = results.get("ccfs"), results.get("paper"), results.get("ccfs-lazy")
    if not ccfs or not paper:
        return []
    rows = [{"what": "teacher pass", "ccfs_s": ccfs["teacher_pass_s"], "paper_s": paper["teacher_pass_s"],
             "speedup": paper["teacher_pass_s"] / ccfs["teacher_pass_s"]},
            {"what": "curriculum 1", "ccfs_s": ccfs["curriculum_s"], "paper_s": paper["curriculum_s"],
             "speedup": paper["curriculum_s"] / ccfs["curriculum_s"]}]
    if lazy:
        rows.append({"what": f"teacher pass, lazy, to the end of curriculum 1 ({lazy['teacher_predicted']:,} of "
                             f"{spec.pool:,} predicted)", "ccfs_s": lazy["teacher_pass_s"],
                     "paper_s": paper["teacher_pass_s"], "speedup": paper["teacher_pass_s"] / lazy["teacher_pass_s"],
                     "teacher_predicted": lazy["teacher_predicted"],
                     "same_selection": lazy["selection_sha256"] == ccfs["selection_sha256"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="ccfs-fast bench imagenet-scale", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ccfs-imagenet-scale",
                        help="where the generated tree, .beton files and inputs live (reused between calls)")
    parser.add_argument("--pool", type=int, default=ILSVRC_TRAIN, help="train images (ILSVRC-2012: 1,281,167)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--side", type=int, default=16, help="train / eval side of the run")
    parser.add_argument("--epochs", type=int, default=2, help="filter epochs")
    parser.add_argument("--teacher-sample", type=int, default=200_000, help="pool images the teacher trains on")
    parser.add_argument("--baseline-fraction", type=float, default=0.1,
                        help="share of the pool the paper approach's passes are timed on (then scaled)")
    parser.add_argument("--ccfs-repeats", type=int, default=3,
                        help="runs of the ccfs stage (fresh processes): median times, largest memory peak")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/imagenet_scale.json")
    args = parser.parse_args(argv)
    if args.ccfs_repeats < 1:
        parser.error(f"--ccfs-repeats must be at least 1, got {args.ccfs_repeats}")
    spec = ScaleSpec(str(args.root), args.pool, args.classes, side=args.side, epochs=args.epochs,
                     teacher_sample=args.teacher_sample, baseline_fraction=args.baseline_fraction,
                     workers=args.workers)
    Path(spec.root).mkdir(parents=True, exist_ok=True)
    results: dict = {}
    config = {**asdict(spec), "ccfs_repeats": args.ccfs_repeats,
              "targets": {"rss_anon_gb": TARGET_RSS_ANON_GB, "curriculum_speedup": TARGET_SPEEDUP}}
    for name in STAGES:
        runs = []
        for _ in range(args.ccfs_repeats if name == "ccfs" else 1):
            start = time.perf_counter()
            runs.append({**run_stage(name, spec), "stage_s": time.perf_counter() - start})
            results[name] = repeated(runs)
            write_rows(args.json, [results], config)  # after every run: a cut-short call keeps what it measured
    tree, build, ccfs, paper = results["tree"], results["build"], results["ccfs"], results["paper"]
    results["summary"] = summary_rows(results, spec)
    results["targets_met"] = {
        "rss_anon": max(build["rss_anon_peak_gb"], ccfs["rss_anon_peak_gb"]) < TARGET_RSS_ANON_GB,
        "curriculum_speedup": results["summary"][1]["speedup"] >= TARGET_SPEEDUP}
    write_rows(args.json, [results], config)
    print(format_table(["stage", "seconds", "images/s", "RssAnon peak GB", "note"], [
        ["tree (generated)", tree["seconds"], "", "", f"{spec.pool} JPEGs, {tree['disk_bytes'] / 1e9:.2f} GB on disk"
         + (" (reused)" if tree["reused"] else "")],
        ["build imagenet", build["seconds"], build["img_per_s"] or "", build["rss_anon_peak_gb"],
         f".beton {build['beton_bytes'] / 1e9:.2f} GB" + (" (reused)" if build["reused"] else "")],
        ["ccfs teacher pass", ccfs["teacher_pass_s"], ccfs["teacher_pass_img_per_s"], "",
         "streamed, cached" + (f"; median of {len(ccfs['runs'])} runs" if "runs" in ccfs else "")],
        ["ccfs curriculum 1", ccfs["curriculum_s"], "", ccfs["rss_anon_peak_gb"],
         f"predicted {ccfs['pool_evaluated']} of {ccfs['pool_eligible']} eligible"
         + (f"; peak: largest of {len(ccfs['runs'])} runs" if "runs" in ccfs else "")],
        ["paper teacher pass", paper["teacher_pass_s"], paper["pass_img_per_s"], "",
         f"timed on {paper['pass_sample']} images, x{paper['pass_scale']:.1f}"],
        ["paper curriculum 1", paper["curriculum_s"], "", paper["rss_anon_peak_gb"],
         f"predicted {paper['pool_evaluated']} (scaled)"]]))
    print(format_table(["what", "ccfs-fast s", "paper approach s", "speedup"],
                       [[r["what"], r["ccfs_s"], r["paper_s"], f"{r['speedup']:.1f}x"] for r in results["summary"]]))
    if not all(r.get("same_selection", True) for r in results["summary"]):
        raise RuntimeError("curriculum 1 selected differently after the lazy and the full teacher pass")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
