"""A check made of stages that cannot lose each other's numbers. Every stage runs in its own child
process under its own time limit; the parent only orchestrates, records and writes the JSON (a
top-level `stages` list, rewritten after every stage), so a crash, a sticky CUDA error or a failed
capture in one stage cannot touch the next. A stage streams its rows to a file as it measures them,
so a stage stopped by its limit or by an error keeps every row it finished. Each stage declares the
least time it needs and is skipped, not started, when the check's budget (kept by its own clock)
leaves less. A device lent for minutes must settle its question in one run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from beton_builder.base.files import write_json
from beton_builder.base.processes import die_with_parent
from beton_builder.base.tables import format_table

RESERVE_S = 10.0  # kept back from the budget for writing, the final table and a stage's stop (3 + 5 s)
KILL_GRACE_S = 3.0  # a stage past its limit gets SIGTERM, then SIGKILL after this


@dataclass(frozen=True)
class Stage:
    """One stage: its own time limit (`cap_s`), the least time it needs (`min_s`), the stages whose
    success it needs (`needs`), whether it runs only on CUDA, and environment variables for its child."""

    name: str
    cap_s: float
    min_s: float
    needs: tuple[str, ...] = ()
    cuda_only: bool = False
    env: tuple[tuple[str, str], ...] = ()  # set in this stage's child only


def rows_path(root: Path, name: str) -> Path:
    """Where a stage's child appends its rows, one JSON object a line."""
    return root / f"{name}.rows.jsonl"


def result_path(root: Path, name: str) -> Path:
    """Where a stage's child writes its figures when it finishes."""
    return root / f"{name}.result.json"


def log_path(root: Path, name: str) -> Path:
    return root / f"{name}.log"


class RowSink:
    """A child's rows, appended and flushed one by one (the parent reads them even if the child dies)."""

    def __init__(self, root: Path, name: str):
        self.path = rows_path(root, name)

    def __call__(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def read_rows(root: Path, name: str) -> list[dict]:
    """The rows a stage's child finished (a torn last line, from a kill mid-write, is left out)."""
    path = rows_path(root, name)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


@dataclass
class Stages:
    """Runs stages in order, each as a child process, and records them. `path`: the JSON (None: not
    written); `budget_s`: the whole check's wall-clock; `root`: the folder the children share;
    `meta`: written beside the stages."""

    path: Path | None
    budget_s: float
    root: Path
    meta: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def status(self, name: str) -> str | None:
        return next((r["status"] for r in self.records if r["stage"] == name), None)

    def run(self, stage: Stage, argv: list[str], limit_s: float | None = None,
            salvage: Callable[[Path], dict] | None = None) -> dict | None:
        """Runs `argv` (a child running `stage`) within min(its cap or `limit_s`, what the budget
        leaves); records its status (ok / error / timeout / skipped), pid, seconds, rows, figures or
        error, writes the JSON, and returns the figures (None unless ok). `salvage(root)`: what a
        stage stopped part-way left that is worth keeping (besides its rows)."""
        unmet = [n for n in stage.needs if self.status(n) != "ok"]
        if unmet:
            return self.skip(stage.name, f"needs stage {', '.join(unmet)}, which did not finish")
        least = min(stage.min_s, limit_s or stage.min_s)  # a limit set by hand may be shorter
        limit = min(limit_s or stage.cap_s, self.left() - RESERVE_S)
        if limit < least:
            return self.skip(stage.name, f"needs at least {least:.0f} s; {max(0.0, self.left()):.0f} s of the "
                                         f"{self.budget_s:.0f} s budget left")
        record: dict = {"stage": stage.name, "limit_s": round(limit, 1), "min_s": stage.min_s}
        began = time.perf_counter()
        with open(log_path(self.root, stage.name), "w") as log:
            # its own process group (stopped whole at its limit), and killed by the kernel if this
            # parent dies first (a check killed by its caller's time limit leaves no stage holding the GPU)
            child = subprocess.Popen(argv + ["--limit", f"{limit:.1f}"], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=partial(die_with_parent, os.getpid()),
                                     env={**os.environ, **dict(stage.env)})
            record["pid"] = child.pid
            try:
                code = child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _stop(child)
                code = None
        record["seconds"] = round(time.perf_counter() - began, 2)
        record.update(self._outcome(stage.name, code, limit))
        rows = read_rows(self.root, stage.name)
        if rows:
            record["rows"] = rows
        if record["status"] != "ok" and salvage is not None:
            record["salvaged"] = salvage(self.root)
        self.records.append(record)
        self.write()
        return record.get("figures") if record["status"] == "ok" else None

    def _outcome(self, name: str, code: int | None, limit: float) -> dict:
        tail = [ln for ln in _tail(log_path(self.root, name)).replace("\r", "\n").splitlines() if ln.strip()][-12:]
        if code is None:
            return {"status": "timeout", "error": f"ran past its limit of {limit:.0f} s; stopped", "log_tail": tail}
        result = result_path(self.root, name)
        if code == 0 and result.is_file():
            return {"status": "ok", "figures": json.loads(result.read_text())}
        why = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        error = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), why)
        return {"status": "error", "exit_code": code, "error": f"{why}: {error[:400]}", "log_tail": tail}

    def skip(self, name: str, why: str) -> None:
        self.records.append({"stage": name, "status": "skipped", "why": why, "seconds": 0.0})
        self.write()
        return None

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"stages": self.records, "budget_s": self.budget_s,
                               "elapsed_s": round(time.perf_counter() - self.start, 2), **self.meta})

    def table(self) -> str:
        rows = [(r["stage"], r["status"], r.get("pid", "-"), r["seconds"], len(r.get("rows", [])),
                 r.get("error") or r.get("why") or "") for r in self.records]
        return format_table(["stage", "status", "pid", "seconds", "rows", "note"], rows)


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL if it is still there after KILL_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, size: int = 8000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""
