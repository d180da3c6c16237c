"""Throughput regression tests: ccfs-fast and its baseline measured in the same test, asserting a
ratio well below what the benchmarks show (benchmarks/results/), never an absolute time."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from benchmarks.baseline_paper import SelectedTensors
from benchmarks.common import competing_load, interleaved_medians, machine_overloaded, median_time
from benchmarks.loader_throughput import epoch_rate, paper_transforms, synthetic_images
from benchmarks.select_kernel import SCALES, kernel_path, make_problem, reference_path
from beton_builder.beton import BetonFile
from beton_builder.table import ImageTable
from beton_builder.writer import write_beton
from ccfs_fast.data.loaders import ResidentTrainLoader
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.selection.kernels import warm_up_kernels

pytestmark = pytest.mark.throughput


def holds(measure: Callable[[], tuple[float, str]], threshold: float, what: str) -> None:
    """Asserts measure()'s ratio > threshold. A miss on a measurably overloaded machine (load average
    above the CPUs this process may use) is measured once more, saying so; a second miss fails,
    so an engine that is really slower still fails."""
    ratio, detail = measure()
    if ratio <= threshold:
        overloaded, load = machine_overloaded()
        if overloaded:
            print(f"\nnote: {what} {ratio:.2f}x (needs > {threshold}x) with {load}: the machine is overloaded; "
                  "measuring once more")
            ratio, detail = measure()
    assert ratio > threshold, f"{what} only {ratio:.2f}x (needs > {threshold}x): {detail}"


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "under-load"])
def test_train_loader_beats_tensordataset_path(tmp_path, busy):
    """Benchmark: 16.6x at 32x32, batch 128, 5,000 images, 2 workers. Asserted: 4x, as the ratio of
    the two sides' median epoch rates, epochs taken in alternating order; also with one busy CPU job
    per CPU running (other users' jobs), where the baseline's worker processes degrade gracefully
    and the engine must keep its lead."""
    n = 2000
    images, labels = synthetic_images(n, 32, 10, seed=0)
    manifest = write_beton(ImageTable(images, labels, tuple("0123456789"), "arrays", "synthetic"),
                           tmp_path / "t.beton", workers=2)
    torch.set_num_threads(2)
    ccfs = ResidentTrainLoader(IndexSpace(BetonFile.open(tmp_path / "t.beton")), np.arange(n), 128, "cpu", seed=0)
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    dataset = SelectedTensors(tensors, torch.from_numpy(labels), paper_transforms(32, manifest.mean, manifest.std,
                                                                                     False))
    baseline = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True, num_workers=2)
    epoch_rate(ccfs, n, 1)  # warm-ups outside the alternation
    epoch_rate(baseline, n, 1)

    def measure() -> tuple[float, str]:
        rates = interleaved_medians({"ccfs": lambda: epoch_rate(ccfs, n, 1, warmup=0),
                                     "baseline": lambda: epoch_rate(baseline, n, 1, warmup=0)}, 3)
        return rates["ccfs"] / rates["baseline"], f"{rates}"

    with competing_load() if busy else nullcontext():
        holds(measure, 4.0, "train loader vs the TensorDataset path" + (" under load" if busy else ""))


def test_cpu_share_gives_way_to_other_jobs():
    """With one busy job per CPU, per-element work is granted fewer threads than the process has."""
    from beton_builder.base.processes import available_cpus
    from ccfs_fast.data.threads import CpuShare

    share = CpuShare(interval_s=0.3)
    assert 1 <= share.threads(available_cpus()) <= available_cpus()
    with competing_load() as jobs:
        time.sleep(0.8)
        share.threads(available_cpus())  # a fresh measurement over the loaded interval
        time.sleep(0.8)
        granted = share.threads(available_cpus())
    assert jobs == available_cpus() and granted < available_cpus() or available_cpus() == 1
    assert share.threads(1) == 1


def test_selection_kernel_beats_sets_and_sorted():
    """Benchmark: ~45x at Tiny-ImageNet scale (100,000 images, 200 classes). Asserted: 8x."""
    warm_up_kernels()
    problem = make_problem(SCALES[1])
    tc = np.flatnonzero(problem["teacher_correct"]).tolist()
    sel = np.flatnonzero(problem["selected"]).tolist()
    assert kernel_path(problem).tolist() == reference_path(problem, tc, sel)
    ratio = median_time(lambda: reference_path(problem, tc, sel), 3) / median_time(lambda: kernel_path(problem), 5)
    assert ratio > 8.0, f"selection kernel only {ratio:.1f}x the sets+sorted reference"


def test_curriculum_wallclock_beats_paper_approach(tmp_path):
    """Benchmark (benchmarks/results/curriculum_wallclock.json): several x per curriculum with a
    small model and the lazy coarse pass. Asserted here on a 3,000-image CIFAR-shaped pool, 2
    curricula: 2x."""
    import dataclasses
    import json

    import numba

    from benchmarks.curriculum_wallclock import BenchSpec, Shape, prepare, worker_baseline, worker_ccfs

    numba.set_num_threads(2)
    spec = BenchSpec(root=str(tmp_path), shape=dataclasses.asdict(Shape("cifar10", 3000, 500, 32, 10, 50)),
                     epochs=8, curricula=2)
    prepare(spec)
    runs = {}

    def measure() -> tuple[float, str]:  # one run of each side, the baseline first on a second try
        order = ("ccfs", "baseline") if not runs else ("baseline", "ccfs")
        for side in order:
            runs[side] = (worker_ccfs if side == "ccfs" else worker_baseline)(spec)
        seconds = {side: sum(p["curriculum_s"] for p in run["phases"]) for side, run in runs.items()}
        return seconds["baseline"] / seconds["ccfs"], json.dumps(seconds)

    holds(measure, 2.0, "curriculum wall-clock vs the paper's approach")
    ccfs, base = runs["ccfs"], runs["baseline"]
    # the lazy coarse pass (the default) predicted a part of the eligible pool; the baseline all of it
    assert all(p["coarse_pass"] == "lazy" for p in ccfs["phases"])
    # (the teacher pass is lazy too: eligible counts only what the pass reached, so compare with the pool)
    assert sum(p["pool_evaluated"] for p in ccfs["phases"]) < sum(p["pool_evaluated"] for p in base["phases"])
    assert all(p["pool_evaluated"] == 3000 for p in base["phases"])
