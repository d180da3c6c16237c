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
make_run_config), EvalConfig, TeacherConfig, ExportConfig (through make_config(EvalConfig, **settings)),
TrainRecipe, FastPath; the selection
kernels (pure numpy): curriculum_arrangement, candidate_mask, order_key, select_per_class, with
load_scores and easy_first_key; the loaders: BetonFile, IndexSpace, EvalLoader, ResidentTrainLoader.
Names are imported on first use, so `import ccfs_fast` itself is instant.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "run": "api", "evaluate": "api", "train_teacher": "api", "build": "api", "export": "api", "open_beton": "api",
    "configure_threads": "data.threads", "run_curriculum": "runs.curriculum",
    "make_run_config": "runs.presets", "make_config": "runs.presets", "RunConfig": "runs.config",
    "EvalConfig": "runs.config",
    "TeacherConfig": "runs.config", "ExportConfig": "runs.config", "TrainRecipe": "train.recipe",
    "FastPath": "train.recipe",
    "curriculum_arrangement": "selection.kernels", "candidate_mask": "selection.kernels",
    "order_key": "selection.kernels", "select_per_class": "selection.kernels", "load_scores": "selection.scores",
    "easy_first_key": "selection.scores",
    "BetonFile": "beton_builder.beton", "IndexSpace": "data.space", "EvalLoader": "data.loaders",
    "ResidentTrainLoader": "data.loaders", "read_labels": "data.readers", "open_run_set": "runs.runset",
    "write_report": "runs.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ccfs_fast' has no attribute {name!r}")
    module = _EXPORTS[name]
    where = module if module.startswith("beton_builder") else f"{__name__}.{module}"
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
