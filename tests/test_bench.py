"""The benchmarks' own bookkeeping: how `bench phase` schedules its repeated runs and summarises them."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.curriculum_wallclock import main as bench_phase
from benchmarks.curriculum_wallclock import median_run, run_sides


def test_repeats_interleave_in_alternating_order():
    calls = []

    def record(kind: str, spec_path: Path, root: Path, repeat: int) -> dict:
        calls.append(kind)
        return {"kind": kind, "call": len(calls), "repeat": repeat}

    ccfs, base = run_sides(Path("spec.json"), Path("."), 3, run=record)
    assert calls == ["ccfs", "baseline", "baseline", "ccfs", "ccfs", "baseline"]
    assert [r["call"] for r in ccfs] == [1, 4, 5] and [r["call"] for r in base] == [2, 3, 6]
    assert [r["repeat"] for r in ccfs] == [0, 1, 2] == [r["repeat"] for r in base]


def test_median_run_takes_each_runs_mean_over_curricula_then_the_median():
    runs = [{"phases": [{"t": 10.0}, {"t": 20.0}]},  # mean 15
            {"phases": [{"t": 1.0}, {"t": 3.0}]},  # mean 2
            {"phases": [{"t": 100.0}, {"t": 0.0}]}]  # mean 50
    median, each = median_run(runs, "t")
    assert each == [15.0, 2.0, 50.0] and median == 15.0


def test_repeats_below_one_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_phase(["--repeats", "0"])
    assert exit_info.value.code == 2 and "--repeats must be at least 1, got 0" in capsys.readouterr().err
