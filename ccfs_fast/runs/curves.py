"""Per-epoch training curves: one row per epoch per model of every training (a curriculum's filter,
each final-evaluation model, a teacher), appended to a CSV as training goes and, optionally, written
as TensorBoard event files (one TensorBoard run per model of a training, scalars named alike)."""
from __future__ import annotations

import csv
import importlib.util
import io
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from beton_builder.base.errors import ConfigError
from beton_builder.base.files import write_text

CURVE_COLUMNS = ("training", "model", "epoch", "loss", "lr", "seconds", "img_per_s", "test_acc")
SCALARS = ("loss", "lr", "img_per_s", "test_acc")  # TensorBoard tags (seconds is the event's own wall time)
TB_INSTALL = "pip install 'ccfs-fast[tb]' (or pip install tensorboard)"


def check_tensorboard(wanted: bool) -> None:
    """--tensorboard needs the optional tensorboard package: refused at once, with the install command."""
    if not wanted:
        return
    try:
        found = importlib.util.find_spec("tensorboard") is not None
    except ValueError:  # a module set to None in sys.modules (an import made to fail)
        found = False
    if not found:
        raise ConfigError(f"--tensorboard needs the tensorboard package, which is not installed; {TB_INSTALL}")


def tb_run_name(training: str, model: int, models: int) -> str:
    """The TensorBoard run of one model of a training: `filter_1`, `final_evaluation_model_2`."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", training).strip("_").lower()
    return slug if models == 1 else f"{slug}_model_{model + 1}"


class CurveLog:
    """Curves of one output: `csv_path` (appended, a header first) and, with `tensorboard`, TensorBoard
    runs under `tb_dir`. `keep`: the trainings whose rows (and TensorBoard runs in `tb_dir`, whether
    this process writes any or not) survive from an earlier, interrupted process: a resumed run keeps
    its finished curricula's curves and drops the rest, whose trainings are redone."""

    def __init__(self, csv_path: Path, tb_dir: Path | None = None, keep: set[str] | None = None,
                 tensorboard: bool = True):
        check_tensorboard(tensorboard and tb_dir is not None)
        self.csv_path, self.tb_dir, self.tensorboard = csv_path, tb_dir, tensorboard and tb_dir is not None
        self.writers: dict[str, object] = {}
        self._keep_only(keep or set())

    def _keep_only(self, keep: set[str]) -> None:
        rows = read_curves(self.csv_path) if self.csv_path.is_file() else []
        kept = [r for r in rows if r["training"] in keep]
        if len(kept) != len(rows) or not self.csv_path.is_file():
            out = io.StringIO()
            writer = csv.DictWriter(out, CURVE_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            write_text(self.csv_path, out.getvalue())
        if self.tb_dir is not None and self.tb_dir.is_dir():
            counts: dict[str, int] = {}
            for r in kept:
                counts[r["training"]] = max(counts.get(r["training"], 0), int(r["model"]))
            kept_runs = {tb_run_name(t, m, n) for t, n in counts.items() for m in range(n)}
            for run in self.tb_dir.iterdir():
                if run.is_dir() and run.name not in kept_runs:
                    shutil.rmtree(run, ignore_errors=True)

    def training(self, name: str, models: int) -> Callable[[int, dict], None]:
        """The on_epoch(model index, record) of a training called `name` with `models` models."""
        def on_epoch(model: int, record: dict) -> None:
            row = {"training": name, "model": model + 1, **{k: record.get(k) for k in CURVE_COLUMNS[2:]}}
            with open(self.csv_path, "a", newline="") as fh:
                csv.DictWriter(fh, CURVE_COLUMNS, lineterminator="\n").writerow(row)
            if self.tensorboard:
                self._tb(tb_run_name(name, model, models), record)
        return on_epoch

    def _tb(self, run: str, record: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = self.writers.get(run)
        if writer is None:
            writer = self.writers[run] = SummaryWriter(log_dir=str(self.tb_dir / run))
        for tag in SCALARS:
            if record.get(tag) is not None:
                writer.add_scalar(tag, record[tag], record["epoch"])
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def read_curves(path: Path) -> list[dict]:
    """The rows of a curves CSV as dicts of strings ('' for a missing value)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
