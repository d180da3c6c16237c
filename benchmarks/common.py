"""Shared benchmark plumbing: environment facts, medians, JSON output."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from beton_builder.base.files import write_json
from ccfs_fast.runs.environment import environment


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each side's median value over `rounds` calls, the sides called in alternating order (A B, then
    B A, ...), so a machine whose speed drifts, or a job that starts or stops meanwhile, weighs on
    both sides alike."""
    values: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            values[name].append(sides[name]())
    return {name: statistics.median(v) for name, v in values.items()}


def machine_overloaded() -> tuple[bool, str]:
    """(whether the 1-minute load average exceeds the CPUs this process may use, the facts as text)."""
    import os

    from beton_builder.base.processes import available_cpus

    try:
        load = os.getloadavg()[0]
    except OSError:
        return False, "load average unknown"
    cpus = available_cpus()
    return load > cpus, f"load average {load:.2f} on {cpus} CPUs"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A benchmark's --help: its docstring as written, and every flag with its default."""


COMPETITOR = "while True: pass"  # another user's single-threaded job, one per CPU


@contextmanager
def competing_load(jobs: int | None = None) -> Iterator[int]:
    """Starts `jobs` busy CPU processes (default: one per CPU this process may use) for the duration of
    the block, as other users' jobs on a shared machine; yields their count and kills them after."""
    import subprocess
    import sys

    from beton_builder.base.processes import available_cpus

    count = available_cpus() if jobs is None else jobs
    procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let the scheduler see them
        yield count
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def write_rows(path: str | Path | None, rows: list[dict], config: dict) -> None:
    """Writes the rows (a JSON list); each row carries the configuration and environment."""
    if path is None:
        return
    env = environment()
    out = [{**row, "config": config, "environment": env} for row in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)


def reset_peak_rss() -> None:
    """Resets this process's peak RSS (VmHWM) on Linux, so a stage's own peak can be read after it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last reset_peak_rss(), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_chart(path: str | Path | None, labels: list[str], speedups: list[float], title: str,
                target: float | None = None) -> None:
    """A horizontal bar chart of speedups (PNG) beside a benchmark's JSON: FILE.json -> FILE.png."""
    if path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.5))
    ax.barh(range(len(labels)), speedups, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=1)
    if target is not None:
        ax.axvline(target, color="tab:red", linestyle="--", label=f"target {target:g}x")
        ax.legend()
    for y, value in enumerate(speedups):
        ax.text(value, y, f" {value:.1f}x", va="center")
    ax.set(xlabel="speedup over the baseline (log scale)", title=title)
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=90)
    plt.close(fig)
