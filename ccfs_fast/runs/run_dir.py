"""A run directory's own files, and what may be removed or resumed there."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from beton_builder.base.errors import ConfigError
from beton_builder.base.files import TEMP_NAME, output_error, remove_stale_temps
from beton_builder.base.locks import LOCK_NAME

RUN_FILES = ("selected_indices.json", "metrics.json", "exp_log.txt", "state.json", "teacher_pass.npz",
             "metrics.csv", "report.png", "selection.png", "curves.csv", "eval.json")

RUN_FOLDERS = ("tb",)  # TensorBoard event files (--tensorboard)


def run_files(output_dir: Path) -> list[Path]:
    """The files a run writes that exist in `output_dir`."""
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    return found + sorted(output_dir.glob("phase*_candidates.npz"))


def own_files(output_dir: Path) -> list[Path]:
    """Every file and folder a run writes that exists in `output_dir`."""
    return run_files(output_dir) + [output_dir / n for n in RUN_FOLDERS if (output_dir / n).is_dir()]


def leftovers(output_dir: Path, ran_here: bool) -> list[Path]:
    """The files in `output_dir` of a ccfs-fast run that never finished a curriculum (`ran_here`: a run
    held its lock there; no state.json): what a run that failed early (a full disk, an interrupt)
    left, nothing to resume from. Files of the same names that no run of ours wrote are never these."""
    if not ran_here or (output_dir / "state.json").exists():
        return []
    return own_files(output_dir)


def output_dir_problem(output_dir: Path, resume: bool, overwrite: bool, ran_here: bool | None = None) -> str | None:
    """Why a run cannot use `output_dir` as asked (None when it can): a folder holding another run or
    other files needs --resume or --overwrite. Cheap (a directory listing): checked before any import.
    `ran_here` (default: its run lock file exists) tells whether a ccfs-fast run used the folder."""
    if resume or overwrite or not output_dir.is_dir():
        return None
    ran_here = (output_dir / LOCK_NAME).exists() if ran_here is None else ran_here
    existing = sorted(p for p in output_dir.iterdir() if p.name != LOCK_NAME and not TEMP_NAME.match(p.name))
    early = set(leftovers(output_dir, ran_here))
    foreign = [p for p in existing if p not in early]
    if not foreign:
        return None
    names = ", ".join(p.name for p in foreign[:3])
    if (output_dir / "state.json").exists():
        return (f"output directory {output_dir} holds a run ({names}...); pass --resume to continue it or --overwrite "
                "to start over")
    return f"output directory {output_dir} is not empty ({names}...); choose another --output-dir or pass --overwrite"


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, ran_here: bool = True) -> bool:
    """Checks a (locked) run directory: a folder holding a run or other files is refused unless
    resume (keeps it) or overwrite (removes the run's own files, nothing else); temp files of dead
    runs, and the files of a run that never finished a curriculum, are removed (with a note). Returns
    whether there is a run to resume (--resume with nothing to resume starts the run, saying so)."""
    remove_stale_temps(output_dir)
    problem = output_dir_problem(output_dir, resume, overwrite, ran_here)
    if problem:
        raise ConfigError(problem)
    if resume and (output_dir / "state.json").is_file():
        return True
    if resume:
        print(f"note: --resume: {output_dir} holds no finished curriculum (no state.json); starting the run",
              file=sys.stderr)
    found = own_files(output_dir) if overwrite else leftovers(output_dir, ran_here)
    if found and not overwrite:
        print(f"note: removed {', '.join(p.name for p in found)}: the files of a run in {output_dir} that never "
              "finished a curriculum", file=sys.stderr)
    for path in found:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as exc:
            raise output_error(path, exc) from exc
    return False
