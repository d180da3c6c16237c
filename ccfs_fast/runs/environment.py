"""Machine, device and library versions recorded beside every result."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from beton_builder.base.processes import available_cpus


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: str | None = None) -> dict:
    """Machine, device and library versions recorded beside every result (device default: cuda
    when available, else cpu)."""
    from importlib.metadata import version

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": version("torchvision"),
            "ffcv": version("ffcv"),  # ffcv.__version__ says 0.0.3rc1 in 1.0.2
            "numba": version("numba"), "numpy": np.__version__, "machine": platform.machine(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "available_cpus": available_cpus(), "load_average": _load(),
            "torch_threads": torch.get_num_threads(), "device": device,
            "cuda": torch.cuda.get_device_name(0) if cuda else None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def tf32_switches() -> dict:
    """The TF32 switches in force (PyTorch's defaults, which the paper's code ran with: TF32 cuDNN
    convolutions, full-fp32 matmuls); they act on Ampere and later GPUs only."""
    return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
