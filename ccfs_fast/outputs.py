"""Atomic output files (temp file + rename) and the run directory's bookkeeping."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from .errors import ConfigError

RUN_FILES = ("selected_indices.json", "metrics.json", "exp_log.txt", "state.json", "teacher_pass.npz",
             "metrics.csv", "report.png")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable))


def write_text(path: Path, text: str) -> None:
    """Writes `text` to a temp file beside `path`, then renames it over `path`."""
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = _tmp(path).with_suffix(".npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def write_npy(path: Path, array: np.ndarray) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _jsonable(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_files(output_dir: Path) -> list[Path]:
    """The files a run writes that exist in `output_dir`."""
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    return found + sorted(output_dir.glob("phase*_candidates.npz"))


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Creates the directory; a non-empty one is refused unless resume (keeps it) or overwrite
    (removes the run's own files, nothing else)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(output_dir.iterdir())
    if resume:
        if not (output_dir / "state.json").is_file():
            raise ConfigError(f"--resume: {output_dir} has no state.json; nothing to resume (drop --resume)")
        return
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:3])
        raise ConfigError(f"output directory {output_dir} is not empty ({names}...); pass --resume to continue "
                          "that run or --overwrite to start over")
    for path in run_files(output_dir):
        path.unlink()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | None = None) -> dict:
    """Machine, device and library versions recorded beside every result (device default: cuda
    when available, else cpu)."""
    import time
    from importlib.metadata import version

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": version("torchvision"),
            "ffcv": version("ffcv"),  # ffcv.__version__ says 0.0.3rc1 in 1.0.2
            "numba": version("numba"), "numpy": np.__version__, "machine": platform.machine(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "cuda": torch.cuda.get_device_name(0) if cuda else None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
