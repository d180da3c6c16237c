"""ccfs-fast: Curriculum Coarse-to-Fine Selection (CCFS, CVPR 2025) for high-IPC dataset distillation, on
FFCV loaders and numba kernels.

A whole run from Python (the same as `ccfs-fast run`; see docs/library.md in the repository):

    import ccfs_fast
    cfg = ccfs_fast.make_run_config(preset="cifar10-ipc500", smoke=True, device="cpu",
                                    pool="data/cifar10_train.beton", test="data/cifar10_test.beton",
                                    distilled="data/distilled.beton", teacher="teacher.pt",
                                    output_dir="runs/first")
    state = ccfs_fast.run(cfg)
    state["final"]["acc_mean"], state["selected"][:10]

Entry points: run, evaluate, train_teacher, build, export, open_beton; configs: RunConfig (through
make_run_config), EvalConfig, TeacherConfig, ExportConfig, TrainRecipe, FastPath; the selection
kernels (pure numpy): curriculum_arrangement, candidate_mask, order_key, select_per_class, with
load_scores and easy_first_key; the loaders: BetonFile, IndexSpace, EvalLoader, ResidentTrainLoader.
Names are imported on first use, so `import ccfs_fast` itself is instant.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "run": "api", "evaluate": "api", "train_teacher": "api", "build": "api", "export": "api", "open_beton": "api",
    "configure_threads": "processes", "run_curriculum": "curriculum",
    "make_run_config": "config", "RunConfig": "config", "EvalConfig": "config", "TeacherConfig": "config",
    "ExportConfig": "config", "TrainRecipe": "config", "FastPath": "config",
    "curriculum_arrangement": "select", "candidate_mask": "select", "order_key": "select",
    "select_per_class": "select", "load_scores": "scores", "easy_first_key": "scores",
    "BetonFile": "data", "IndexSpace": "data", "EvalLoader": "data", "ResidentTrainLoader": "data",
    "read_labels": "data", "open_run_set": "runset", "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ccfs_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
