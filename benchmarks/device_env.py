"""The device machine's environment, checked before anything else of the device check: imports FFCV
(through beton_builder.ffcv_import, as every command does), torch and numba, asks torch for CUDA, and
prints one line with the versions, or one line that says exactly what is missing (exit 3).

Run as the device command's first line: `python3 -m benchmarks.device_env` (benchmarks/gpu_check.sh
does)."""
from __future__ import annotations

import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

# What the check needs, in import order: the name, and how to make it available when it is missing.
CARRY = "run scripts/prepare_devcheck.sh here and carry .devcheck"
NEEDED = (
    ("numpy", "the device's Python needs numpy"),
    ("torch", "the device's Python needs torch with CUDA"),
    ("torchvision", "the device's Python needs torchvision (the models)"),
    ("numba", "the device's Python needs numba"),
    ("PIL", CARRY),
    ("tqdm", CARRY),
    ("psutil", CARRY),
    ("matplotlib", CARRY),  # a run ends with report.png
    ("pandas", CARRY),  # and metrics.csv
    ("beton_builder.ffcv_import", CARRY),  # FFCV, its compiled library and OpenCV
)


def probe() -> tuple[dict, list[str]]:
    """(versions and CUDA facts, what is missing: one entry per failed import or check)."""
    found: dict = {"python": platform.python_version()}
    missing = []
    for name, fix in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import failure is reported, never raised: this is the check
            missing.append(f"{name} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}; {fix})")
    for dist in ("numpy", "torch", "torchvision", "numba", "ffcv"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    if "torch" in sys.modules:
        import torch

        found["cuda_runtime"] = torch.version.cuda
        found["cuda"] = torch.cuda.is_available()
        if found["cuda"]:
            found["device"] = torch.cuda.get_device_name(0)
        else:
            missing.append(f"CUDA (torch {torch.__version__} sees no CUDA device)")
    return found, missing


def main() -> int:
    found, missing = probe()
    line = ", ".join(f"{k} {v}" for k, v in found.items())
    if missing:
        print(f"device environment: MISSING {'; '.join(missing)} (have: {line})", flush=True)
        return 3
    print(f"device environment: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
