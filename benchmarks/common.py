"""Shared benchmark plumbing: environment facts, medians, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Machine and library versions recorded beside every figure."""
    from importlib.metadata import version

    import numba
    import numpy
    import torch
    import torchvision

    return {
        "machine": platform.machine(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": numpy.__version__, "numba": numba.__version__,
        "ffcv": version("ffcv"),  # ffcv.__version__ says 0.0.3rc1 in 1.0.2
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


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


def write_rows(path: str | Path | None, rows: list[dict], config: dict) -> None:
    """Writes the rows (a JSON list); each row carries the configuration and environment."""
    if path is None:
        return
    env = environment()
    out = [{**row, "config": config, "environment": env} for row in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)


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
