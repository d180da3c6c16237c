"""The Python entry points for notebooks and scripts: each does what its `ccfs-fast` command does, with
the same configs (ccfs_fast.runs.config), and returns what the command prints as data."""
from __future__ import annotations

from pathlib import Path

from ccfs_fast.data.threads import configure_threads
from ccfs_fast.runs.config import EvalConfig, ExportConfig, RunConfig, TeacherConfig


def run(config: RunConfig, resume: bool = False, overwrite: bool = False, threads: int | None = None) -> dict:
    """Runs (or, with `resume`, continues) CCFS as `ccfs-fast run` does, into config.output_dir; returns
    the run's state: `phases` (one record per curriculum), `selected` (pool indices, in selection
    order), `final` (the final evaluation: `accs`, `acc_mean`, `acc_std`). Sets the thread counts first
    (configure_threads). Make the config with `make_run_config(preset=..., smoke=..., pool=..., ...)`."""
    from ccfs_fast.runs.curriculum import run_curriculum

    configure_threads(threads)
    return run_curriculum(config.check_files(), resume=resume, overwrite=overwrite)


def evaluate(config: EvalConfig, threads: int | None = None) -> dict:
    """`ccfs-fast eval`: num_eval models trained on distilled ∪ a selection (or on a whole exported set,
    config.train_set); returns `accs`, `acc_mean`, `acc_std` and what was trained on."""
    from ccfs_fast.runs.evaluation import evaluate_selection_file

    configure_threads(threads)
    return evaluate_selection_file(config.check_files())


def train_teacher(config: TeacherConfig, threads: int | None = None) -> dict:
    """`ccfs-fast teacher`: a teacher trained on the pool (forgetting scores with forgetting_out);
    returns its summary (test accuracy, seconds)."""
    from ccfs_fast.runs.teacher import train_teacher as train

    configure_threads(threads)
    return train(config.check_files())


def build(kind: str, src: str | Path, out: str | Path, **options: object) -> list:
    """`ccfs-fast build KIND`: converts a dataset once into .beton files; `options` are BuildConfig's
    (per_class, side, normalized_with, labels, ...). Returns (path, manifest, seconds) per file."""
    from beton_builder.build import BuildConfig
    from beton_builder.build import build as build_files

    configure_threads(None)
    return build_files(BuildConfig(kind=kind, src=Path(src), out=Path(out), **options))


def export(run_dir: str | Path, out: str | Path, **options: object) -> dict:
    """`ccfs-fast export`: a run's final set as an image folder, a .beton and manifest.csv; `options` are
    ExportConfig's (format, allow_incomplete, overwrite, workers)."""
    from ccfs_fast.runs.set_export import export_run

    return export_run(ExportConfig(Path(run_dir), Path(out), **options).check_files())


def open_beton(path: str | Path):
    """A .beton with its checked manifest (`beton_builder.beton.BetonFile`): `.n`, `.manifest` (class names,
    side, mean / std, ...); read its rows with `IndexSpace` and the loaders."""
    from beton_builder.beton import BetonFile

    return BetonFile.open(path)
