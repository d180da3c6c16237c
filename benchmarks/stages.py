"""A check made of stages that cannot lose each other's numbers: each stage runs under its own time
limit and its own try/except, the JSON (a top-level `stages` list) is rewritten after every stage,
and the whole stays within a budget kept by its own clock, so an outer timeout never kills it mid-way.
A device lent for minutes must settle its question in one run."""
from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ccfs_fast.outputs import environment, write_json
from ccfs_fast.tables import format_table

RESERVE_S = 10.0  # kept back from every stage for writing and the final table
MIN_STAGE_S = 5.0  # a stage with less time than this is skipped, not started


class StageTimeout(Exception):
    """A stage ran past its limit (raised by SIGALRM in the main thread)."""


def _alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise StageTimeout


@dataclass
class Stages:
    """Runs stages in order and records them. `path`: the JSON (None: not written); `budget_s`: the
    whole check's wall-clock; `meta`: configuration written beside the stages."""

    path: Path | None
    budget_s: float
    meta: dict = field(default_factory=dict)
    fail: str | None = None  # a stage name made to fail on purpose (tests of the check itself)
    records: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, fn: Callable[[float], dict], limit_s: float) -> dict | None:
        """Runs fn(limit) as stage `name` within min(limit_s, what the budget leaves); records its
        status (ok / error / timeout / skipped), seconds and figures or error, writes the JSON, and
        returns the figures (None unless ok)."""
        limit = min(limit_s, self.left() - RESERVE_S)
        if limit < MIN_STAGE_S:
            return self.skip(name, f"no time left ({self.left():.0f} s of the {self.budget_s:.0f} s budget)")
        record: dict = {"stage": name, "limit_s": round(limit, 1)}
        began = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            if name == self.fail:
                raise RuntimeError(f"forced failure of stage {name!r} (--fail-stage)")
            figures = fn(limit)
            record.update(status="ok", figures=figures)
        except StageTimeout:
            record.update(status="timeout", error=f"ran past its limit of {limit:.0f} s")
        except Exception as exc:  # a stage's failure must not take the other stages' numbers with it
            record.update(status="error", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}",
                          trace=traceback.format_exc(limit=-4)[-2000:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        record["seconds"] = round(time.perf_counter() - began, 2)
        self.records.append(record)
        self.write()
        return record.get("figures") if record["status"] == "ok" else None

    def skip(self, name: str, why: str) -> None:
        self.records.append({"stage": name, "status": "skipped", "why": why, "seconds": 0.0})
        self.write()
        return None

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"stages": self.records, "budget_s": self.budget_s,
                               "elapsed_s": round(time.perf_counter() - self.start, 2), "environment": environment(),
                               **self.meta})

    def table(self) -> str:
        rows = [(r["stage"], r["status"], r["seconds"], r.get("error") or r.get("why") or "") for r in self.records]
        return format_table(["stage", "status", "seconds", "note"], rows)
