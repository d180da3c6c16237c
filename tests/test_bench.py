"""The benchmarks' own bookkeeping: how `bench phase` schedules its repeated runs and summarises them."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.curriculum_wallclock import main as bench_phase
from benchmarks.curriculum_wallclock import median_run, run_sides
from benchmarks.imagenet_scale import main as bench_imagenet_scale
from benchmarks.imagenet_scale import repeated


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


def test_imagenet_scale_repeats_give_median_times_and_the_largest_peak(capsys):
    runs = [{"teacher_pass_s": 50.0, "teacher_pass_img_per_s": 30.0, "rss_anon_peak_gb": 1.1, "pool_evaluated": 7},
            {"teacher_pass_s": 70.0, "teacher_pass_img_per_s": 10.0, "rss_anon_peak_gb": 3.9, "pool_evaluated": 7},
            {"teacher_pass_s": 60.0, "teacher_pass_img_per_s": 20.0, "rss_anon_peak_gb": 1.3, "pool_evaluated": 7}]
    merged = repeated(runs)
    assert merged["teacher_pass_s"] == 60.0 and merged["teacher_pass_img_per_s"] == 20.0
    assert merged["rss_anon_peak_gb"] == 3.9 and merged["pool_evaluated"] == 7 and merged["runs"] == runs
    assert repeated(runs[:1]) == runs[0]
    with pytest.raises(SystemExit) as exit_info:
        bench_imagenet_scale(["--ccfs-repeats", "0"])
    assert exit_info.value.code == 2 and "--ccfs-repeats must be at least 1, got 0" in capsys.readouterr().err


def test_bench_against_passes_on_its_own_figures_and_fails_on_a_slowed_kernel(tmp_path, monkeypatch, capsys):
    """`bench select --quick --against FILE`: exit 0 against the figures it just wrote (same machine,
    same code); exit 1, naming the rows, once the kernel is made 5x slower; no ratio-less benchmark."""
    import time

    from benchmarks import select_kernel
    from ccfs_fast.cli import main

    stored = tmp_path / "select.json"
    assert main(["bench", "select", "--quick", "--repeats", "3", "--json", str(stored)]) == 0
    assert main(["bench", "select", "--quick", "--repeats", "3", "--against", str(stored), "--tolerance",
                 "0.6"]) == 0
    out = capsys.readouterr().out
    assert "stored ratio" in out and out.count(" ok") >= 2 and "REGRESSED" not in out
    fast = select_kernel.kernel_path

    def slowed(p):
        start = time.perf_counter()
        picked = fast(p)
        time.sleep(4 * (time.perf_counter() - start))  # the engine, 5x slower
        return picked

    monkeypatch.setattr(select_kernel, "kernel_path", slowed)
    assert main(["bench", "select", "--quick", "--repeats", "3", "--against", str(stored), "--tolerance",
                 "0.6"]) == 1
    captured = capsys.readouterr()
    assert "REGRESSED" in captured.out and "fell by more than 60%" in captured.err
    assert main(["bench", "train", "--against", str(stored)]) == 2
    assert "carry no ratio" in capsys.readouterr().err


def test_against_prefers_this_cpu_models_figures_and_record_replaces_only_them(tmp_path, capsys):
    """A stored file holding rows of two CPU models: each row is judged against its own model's figure
    (a ratio fine on one model fails against the other's), and --record's refresh replaces only this
    model's rows, keeping the other machine's."""
    import json

    import pytest

    from benchmarks import regression
    from beton_builder.base.errors import RegressionError

    here = regression.environment()["cpu"]

    def row(cpu: str, speedup: float) -> dict:
        return {"scale": "CIFAR-10", "n": 50000, "classes": 10, "speedup": speedup, "kernel_s": 0.001,
                "environment": {"cpu": cpu}}

    stored = tmp_path / "select.json"
    stored.write_text(json.dumps([row("Other CPU", 50.0), row(here, 30.0)]))
    measured = [{k: v for k, v in row(here, 29.0).items() if k != "environment"}]
    compared = regression.check("select", measured, stored, 0.15)
    assert compared[0]["stored_ratio"] == 30.0 and compared[0]["same_cpu"]
    stored.write_text(json.dumps([row("Other CPU", 50.0)]))
    with pytest.raises(RegressionError, match="50.00x -> 29.00x"):
        regression.check("select", measured, stored, 0.15)
    assert "ratios shift between CPU models" in capsys.readouterr().out
    regression.check("select", measured, stored, 0.15, record_rows=True)
    kept = json.loads(stored.read_text())
    assert sorted((r["environment"]["cpu"], r["speedup"]) for r in kept) == sorted([("Other CPU", 50.0), (here, 29.0)])
    regression.check("select", measured, stored, 0.15)  # now judged against its own figure
    regression.check("select", [dict(measured[0], speedup=31.0)], stored, 0.15, record_rows=True)
    assert [r["speedup"] for r in json.loads(stored.read_text()) if r["environment"]["cpu"] == here] == [31.0]
    assert len(json.loads(stored.read_text())) == 2 and not list(tmp_path.glob("*.tmp"))


def test_teacher_and_whole_run_rows_from_the_sides_runs():
    """The teacher rows compare each side's median teacher seconds and name the predictions; the run
    row adds set-up, the whole teacher pass and every curriculum; lazy and full must select alike."""
    from benchmarks.phase_rows import check_same_selection, predicted_text, teacher_and_run_rows, whole_run_s

    def run(setup, teacher, curricula, predicted, picks):
        return {"setup_s": setup, "teacher_pass_s": teacher, "teacher_predicted": predicted,
                "phases": [{"curriculum_s": c, "selection": picks} for c in curricula]}

    lazy = [run(1.0, 2.0, [3.0, 4.0], 300, [1, 2]), run(1.0, 4.0, [3.0, 4.0], 300, [1, 2])]
    base = [run(0.5, 10.0, [20.0, 20.0], 1000, [1, 2]), run(0.5, 12.0, [20.0, 20.0], 1000, [1, 2])]
    full = [run(1.0, 8.0, [3.0, 4.0], 1000, [1, 2]), run(1.0, 8.0, [3.0, 4.0], 1000, [1, 2])]
    shared = {"dataset": "cifar10", "model": "m", "epochs": 2, "pool": 1000, "side": 32, "classes": 10,
              "curricula": 2}
    teacher, teacher_full, whole = teacher_and_run_rows(shared, lazy, base, full)
    assert whole_run_s(lazy[0]) == 10.0
    assert teacher["ccfs_s"] == 3.0 and teacher["baseline_s"] == 11.0 and teacher["speedup"] == 11.0 / 3.0
    assert predicted_text(teacher) == "300 / 1,000" and predicted_text(teacher_full) == "1,000 / 1,000"
    assert whole["ccfs_s"] == 11.0 and whole["baseline_s"] == 51.5 and whole["same_selection_as_full_teacher"]
    check_same_selection([whole])
    full[0]["phases"][1]["selection"] = [1, 3]
    wrong = teacher_and_run_rows(shared, lazy, base, full)[2]
    assert predicted_text(wrong) == "selection differs from --teacher-pass full!"
    with pytest.raises(RuntimeError, match="selected different images on cifar10 m"):
        check_same_selection([wrong])


def test_the_baseline_worker_runs_without_ccfs_fasts_openmp_setting(tmp_path, monkeypatch):
    """Started from the console script (GOMP_SPINCOUNT set by ccfs-fast), bench phase's baseline worker
    gets the environment a user's shell would give the paper's code; a user's own setting is kept."""
    import json

    from benchmarks import curriculum_wallclock
    from ccfs_fast.data.threads import openmp_defaults

    envs = {}

    def fake_run(cmd, check, env, stdout):
        kind = "ccfs" if "'ccfs'" in cmd[-1] else "baseline"
        envs[kind] = env
        (tmp_path / f"{kind}.json").write_text(json.dumps({"kind": kind}))

    monkeypatch.setattr(curriculum_wallclock.subprocess, "run", fake_run)
    environ = {k: v for k, v in curriculum_wallclock.os.environ.items()
               if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "CCFS_FAST_OPENMP_DEFAULTS")}
    monkeypatch.setattr(curriculum_wallclock.os, "environ", environ)  # this test's own, restored after
    openmp_defaults(curriculum_wallclock.os.environ)  # as the console script does at start
    for kind in ("ccfs", "baseline"):
        curriculum_wallclock.run_worker(kind, tmp_path / "spec.json", tmp_path)
    assert envs["ccfs"]["GOMP_SPINCOUNT"] == "10000" and "GOMP_SPINCOUNT" not in envs["baseline"]
    curriculum_wallclock.os.environ.clear()
    curriculum_wallclock.os.environ["GOMP_SPINCOUNT"] = "7"  # the user's own: both sides keep it
    for kind in ("ccfs", "baseline"):
        curriculum_wallclock.run_worker(kind, tmp_path / "spec.json", tmp_path)
    assert envs["ccfs"]["GOMP_SPINCOUNT"] == envs["baseline"]["GOMP_SPINCOUNT"] == "7"
