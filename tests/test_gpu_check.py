"""The staged device check (benchmarks/gpu_check.py) in its --quick CPU form and its parts: every stage
in its own child process (a pid per stage), a stage stopped part-way keeps its rows, the budget skips
stages it cannot hold instead of starting them, the preset's projection counts set-up once, and the
device's environment is checked first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.stages import Stage, Stages, result_path, rows_path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_check_keeps_a_hung_stages_rows_and_goes_on(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--hang-stage", "kd_fp32",
                           "--stage-limit", "kd_fp32=20", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    records = {r["stage"]: r for r in report["stages"]}
    assert {k: r["status"] for k, r in records.items()} == {
        "data": "ok", "teacher": "ok", "exactness": "skipped", "kd_fp32": "timeout", "preset_fp32": "ok",
        "kd_bf16": "skipped", "preset_bf16": "skipped"}
    ran = [r for r in records.values() if r["status"] != "skipped"]
    pids = [r["pid"] for r in ran]
    assert len(set(pids)) == len(ran) and os.getpid() not in pids  # each stage its own child process
    hung = records["kd_fp32"]
    assert hung["seconds"] < 30 and [r["mode"] for r in hung["rows"]] == ["eager"]  # the row before the hang
    assert hung["rows"][0]["step_ms"] > 0
    preset = records["preset_fp32"]["figures"]
    assert preset["complete"] and preset["exit_code"] == 0 and preset["epochs"] == 1
    assert [t["what"] for t in preset["trainings"]] == ["filter 1", "filter 2", "filter 3", "final evaluation"]
    for t in preset["trainings"]:
        assert t["loop_s"] > 0 and t["setup_s"] >= 0 and t["eval_s"] > 0
        assert t["projected_s"] == pytest.approx(t["setup_s"] + t["loop_s"] * 500 + t["eval_s"] * t["evals"][1])
        assert t["execution"]["cuda_graphs"] is False
    projected = preset["fixed_s"] + sum(t["projected_s"] for t in preset["trainings"])
    assert preset["projected_s"] == pytest.approx(projected)
    assert preset["final_execution"]["bank"]
    assert report["elapsed_s"] < report["budget_s"]
    lines = done.stdout.strip().splitlines()
    assert any(ln.startswith("kd_fp32") and "timeout" in ln for ln in lines)  # the table, printed last
    assert lines[-1].startswith("preset_fp32: 1 epochs in")


def _child(tmp_path: Path, name: str, code: str) -> list[str]:
    """A stage child that runs `code` (with `rows` and `result` paths bound) in a fresh Python."""
    prelude = (f"import json, sys, time; rows = {str(rows_path(tmp_path, name))!r}; "
               f"result = {str(result_path(tmp_path, name))!r}\n")
    return [sys.executable, "-c", prelude + code]


def test_stages_record_errors_and_skip_what_the_budget_cannot_hold(tmp_path):
    """An erroring child keeps its rows and its last error line; the next stage still runs; a stage
    that needs a failed stage, or more time than the budget leaves, is skipped without starting."""
    stages = Stages(tmp_path / "check.json", budget_s=40.0, root=tmp_path)
    stages.run(Stage("broken", cap_s=10, min_s=1), _child(tmp_path, "broken", (
        "open(rows, 'a').write(json.dumps({'n': 1}) + '\\n')\n"
        "raise RuntimeError('CUDA error: an illegal memory access was encountered')")))
    stages.run(Stage("after", cap_s=10, min_s=1, needs=("broken",)), _child(tmp_path, "after", "pass"))
    figures = stages.run(Stage("fine", cap_s=10, min_s=1), _child(tmp_path, "fine", (
        "json.dump({'answer': 42}, open(result, 'w'))")))
    stages.run(Stage("too_long", cap_s=100, min_s=60), _child(tmp_path, "too_long", "pass"))
    records = {r["stage"]: r for r in json.loads((tmp_path / "check.json").read_text())["stages"]}
    broken = records["broken"]
    assert broken["status"] == "error" and broken["rows"] == [{"n": 1}] and broken["exit_code"] == 1
    assert "illegal memory access" in broken["error"] and broken["pid"] > 0
    assert records["after"]["status"] == "skipped" and "needs stage broken" in records["after"]["why"]
    assert figures == {"answer": 42} and records["fine"]["status"] == "ok"
    assert records["too_long"]["status"] == "skipped" and "needs at least 60 s" in records["too_long"]["why"]
    assert "pid" not in records["too_long"]  # never started


def test_projection_counts_set_up_once():
    """Each training's set-up counts once, its loop scales with the epochs and its test evaluations with
    the evaluated epochs; the run's fixed costs are its wall-clock less the trainings."""
    from benchmarks.gpu_check import evaluated_epochs, preset_projection

    phase = {"phase": 1, "train_s": 10.0, "train_setup_s": 6.0, "train_loop_s": 3.0, "train_eval_s": 1.0,
             "filter_acc_rule": "end"}
    final = {"seconds": [20.0], "setup_s": [8.0], "loop_s": [10.0], "eval_s": [2.0], "fused": True,
             "accs": [50.0, 51.0]}
    out = preset_projection({"phases": [phase], "final": final}, wall_s=40.0, epochs=20, target=500)
    assert evaluated_epochs(20, "last_fifth") == 3 and evaluated_epochs(500, "last_fifth") == 99  # epoch > 0.8 E
    assert out["fixed_s"] == pytest.approx(10.0)
    assert out["trainings"][0]["projected_s"] == pytest.approx(6 + 3 * 25 + 1)
    assert out["trainings"][1]["projected_s"] == pytest.approx(8 + 10 * 25 + 2 * 99 / 3)
    assert out["projected_s"] == pytest.approx(10 + 82 + 324) and out["complete"]
    naive = 10 + (10 + 20) * 25  # the whole training span scaled, set-up included: what this replaces
    assert out["projected_s"] < naive


def test_kd_stage_says_what_ran(tmp_path):
    """The KD-step stage on the CPU (tiny model): every way of training 5 models together is timed,
    each row streamed as it is measured, and each row says whether graphs ran (never on a CPU)."""
    import argparse

    from benchmarks.gpu_check import stage_kd
    from benchmarks.stages import RowSink, read_rows

    args = argparse.Namespace(quick=True, root=tmp_path)
    figures = stage_kd(args, RowSink(tmp_path, "kd_fp32"), "fp32")
    modes = [r["mode"] for r in figures["rows"]]
    assert modes == ["eager", "bank_nchw", "bank_channels_last", "streams"]
    assert read_rows(tmp_path, "kd_fp32") == json.loads(json.dumps(figures["rows"]))
    measured = [r for r in figures["rows"] if "skipped" not in r]
    assert measured == figures["rows"]  # none skipped on the CPU
    assert all(r["step_ms"] > 0 and r["graphs"] is False and r["graphs_off"] is None and r["precision"] == "fp32"
               for r in measured)
    assert figures["targets"]["graphs_over_eager_b32"] is None  # batch 8 only


def test_device_environment_line():
    """The device command's first line: versions, or exactly what is missing (exit 3). FFCV imports on
    a Python without distutils (3.12 without setuptools: made missing here)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.device_env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    line = done.stdout.strip()
    assert line.startswith("device environment:") and "torch " in line and "ffcv 1.0.2" in line
    if torch.cuda.is_available():
        assert done.returncode == 0 and "MISSING" not in line
    else:
        assert done.returncode == 3 and "MISSING CUDA (torch" in line
    code = ("import sys; sys.modules['distutils'] = None\n"  # what `import distutils` meets on Python 3.12
            "import beton_builder.ffcv_import, ffcv.pipeline.graph as g\n"
            "print(g.warn.__module__, sys.modules['distutils.log'].__name__)")
    shim = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shim.returncode == 0, shim.stderr[-1500:]
    assert shim.stdout.split() == ["beton_builder.ffcv_import", "distutils.log"]
