"""The staged device check (benchmarks/gpu_check.py) in its --quick CPU form and its parts: every stage
in its own child process (a pid per stage), a stage stopped part-way keeps its rows, the budget skips
stages it cannot hold instead of starting them, the preset's projection counts set-up once, and the
device's environment is checked first."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    assert [r["stage"] for r in report["stages"]] == ["exactness", "kd_fp32", "kd_bank_fp32", "data", "teacher",
                                                      "preset_fp32", "kd_bf16", "preset_bf16"]  # KD before data
    assert {k: r["status"] for k, r in records.items()} == {
        "exactness": "skipped", "kd_fp32": "timeout", "kd_bank_fp32": "ok", "data": "ok", "teacher": "ok",
        "preset_fp32": "ok", "kd_bf16": "skipped", "preset_bf16": "skipped"}
    ran = [r for r in records.values() if r["status"] != "skipped"]
    pids = [r["pid"] for r in ran]
    assert len(set(pids)) == len(ran) and os.getpid() not in pids  # each stage its own child process
    hung = records["kd_fp32"]
    assert hung["seconds"] < 30 and [r["mode"] for r in hung["rows"]] == ["eager"]  # the row before the hang
    assert hung["rows"][0]["step_ms"] > 0
    bank = records["kd_bank_fp32"]["figures"]["rows"]
    assert [r["mode"] for r in bank] == ["eager", "bank_nchw", "bank_channels_last", "streams"]
    for row in bank[1:]:  # each bank row names what it is divided by: the same 5 models one after another
        assert row["denominator"] == "eager" and "one after another" in row["denominator_is"]
        assert row["group"] == bank[0]["group"]  # measured together, interleaved
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
    assert report["elapsed_s"] < report["budget_s"] and report["call"] == "all"
    lines = done.stdout.strip().splitlines()
    assert any(ln.startswith("kd_fp32") and "timeout" in ln for ln in lines)  # the table, printed last
    assert lines[-1].startswith("preset_fp32: 1 epochs in")


def test_the_two_calls_split_the_stages_within_their_budgets():
    """smoke: exactness and the single-model KD pairs in 120 s; main: the bank first, then data, teacher,
    the presets and bf16 in 360 s; each stage's own limit fits its call's budget."""
    from benchmarks.gpu_check import CALLS, STAGES

    smoke, main = CALLS["smoke"], CALLS["main"]
    assert smoke[0] == ("exactness", "kd_fp32") and smoke[1] <= 120
    assert main[0][:2] == ("kd_bank_fp32", "data") and main[1] <= 360
    assert set(smoke[0]) | set(main[0]) == set(STAGES) and not set(smoke[0]) & set(main[0])
    assert sum(STAGES[n].cap_s for n in smoke[0]) <= smoke[1]
    assert dict(STAGES["exactness"].env) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_a_killed_check_leaves_no_stage_running(tmp_path):
    """The check killed by its caller's time limit (SIGKILL, no chance to clean up) takes its stage's
    child with it: no stage keeps running (on a GPU machine, holding the GPU)."""
    import signal
    import time

    import psutil

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--call", "smoke",
                               "--hang-stage", "kd_fp32", "--stage-limit", "kd_fp32=300"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline:
            rows = list(tmp_path.glob("gpu-check-*/kd_fp32.rows.jsonl"))
            if rows and rows[0].read_text().strip():  # the stage is mid-way: its first row is out, then it hangs
                child = next(c for c in psutil.Process(parent.pid).children() if "--stage" in c.cmdline())
            time.sleep(0.2)
        assert child is not None, "the stage never started"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        gone = psutil.wait_procs([child], timeout=15)[0]
        assert gone == [child] or child.status() == psutil.STATUS_ZOMBIE
    finally:
        for proc in (parent, child):
            with contextlib.suppress(Exception):
                (proc.kill() if proc is not None else None)


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
    from benchmarks.gpu_stages import evaluated_epochs, preset_projection

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
    """The bank's KD stage on the CPU (tiny model): every way of training 5 models together is timed beside
    the single-model step, interleaved, each row streamed as it is measured, and each row says whether
    graphs ran (never on a CPU)."""
    import argparse

    from benchmarks.gpu_stages import stage_kd
    from benchmarks.stages import RowSink, read_rows

    args = argparse.Namespace(quick=True, root=tmp_path)
    figures = stage_kd(args, RowSink(tmp_path, "kd_fp32"), "kd_bank_fp32")
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


class DefaultGeneratorDraws(TorchDispatchMode):
    """Records every random op that draws from a default generator (no generator given)."""

    RANDOM = {"rand", "randn", "randint", "randperm", "uniform_", "normal_", "bernoulli_", "bernoulli",
              "exponential_", "random_", "multinomial", "rand_like", "randn_like", "randint_like", "native_dropout",
              "cauchy_", "geometric_", "log_normal_"}

    def __init__(self):
        super().__init__()
        self.draws: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self.RANDOM and kwargs.get("generator") is None:
            self.draws.append(str(func))
        return func(*args, **kwargs)


class FailingCapture:
    """Captures as an invalidated CUDA capture does: the step runs, then capture_end refuses."""

    def warm_up(self, fn, times):
        for _ in range(times):
            fn()

    def capture(self, fn, generators):
        from ccfs_fast.train.graphs import CaptureFailed

        fn()
        raise CaptureFailed("operation not permitted when stream is capturing (made to fail)")


def test_after_a_failed_capture_nothing_draws_from_a_default_generator():
    """A capture made to fail, then what the check and the benchmarks run after it: eager steps whose
    rows are drawn as the check draws them, and a step timed as `bench train` times one that asks for
    graphs. None of it draws from the device's default generator, which on CUDA a failed capture can
    leave capturing (a draw then raises "Offset increment outside graph capture"); the verdict holds."""
    from benchmarks.gpu_stages import capture_fallback
    from benchmarks.train_throughput import make_step

    cpu = torch.device("cpu")
    step, after = (make_step(cpu, 1, seed=s, model="convnet_tiny", side=16) for s in (3, 4))
    with DefaultGeneratorDraws() as watch:
        figures = capture_fallback(step, after, steps=4, capture=FailingCapture())
    assert watch.draws == []
    assert "made to fail" in figures["capture_failed"] and figures["held"]
    assert figures["after_graphs_off"].startswith("capture failed") and figures["after_step_ms"] > 0


def test_targets_on_rows_shaped_like_the_cuda_groups():
    """On CUDA, batch 32 is measured twice (eager + graphs; graphs + the bank layouts): the graphs
    ratio comes from the group that holds both, the bank ratio from the bank's group."""
    from benchmarks.train_throughput import default_groups, targets

    rates = {"eager": 1000.0, "graphs": 4000.0, "bank_nchw": 5000.0, "bank_channels_last": 6500.0, "streams": 5500.0}
    rows = []
    for batch, modes in default_groups([32, 64], cuda=True):
        group = f"fp32 b{batch}: {' + '.join(modes)}"
        for mode in modes:
            # a second measurement of graphs (inside the bank group) differs, as it would
            rate = rates[mode] * (1.1 if mode == "graphs" and len(modes) > 2 else 1.0)
            rows.append({"mode": mode, "precision": "fp32", "batch_size": batch, "group": group, "img_per_s": rate,
                         "graphs": mode == "graphs"})
    t = targets(rows)
    assert t["graphs_over_eager_b32"] == pytest.approx(4.0)
    assert t["bank_best_layout"] == "bank_channels_last"
    assert t["bank_over_sequential_b64"] == pytest.approx(6500 / 4400)
    assert "graphed" in t["bank_denominator"]
