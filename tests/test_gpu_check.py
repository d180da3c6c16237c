"""The staged device check (benchmarks/gpu_check.py --graphs) in its --quick CPU form: every stage is
recorded in the JSON, and a stage made to fail leaves the other stages' results in place."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_quick_check_records_every_stage_and_survives_a_failed_one(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--graphs", "--quick", "--fail-stage",
                           "kd_steps", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    status = {r["stage"]: r["status"] for r in report["stages"]}
    assert status == {"data": "ok", "teacher": "ok", "exactness": "skipped", "kd_steps": "error",
                      "preset_fp32": "ok", "preset_bf16": "skipped"}, status
    failed = next(r for r in report["stages"] if r["stage"] == "kd_steps")
    assert "forced failure" in failed["error"]
    # the stage after the failure ran whole, with its figures
    figures = next(r for r in report["stages"] if r["stage"] == "preset_fp32")["figures"]
    assert figures["complete"] and figures["exit_code"] == 0 and len(figures["phases"]) == 3
    assert figures["projected_500_epochs_s"] > figures["fixed_s"] >= 0
    assert all(p["execution"]["cuda_graphs"] is False for p in figures["phases"])
    assert figures["final_execution"]["bank"] and not figures["bf16"]
    assert report["elapsed_s"] < report["budget_s"]
    lines = done.stdout.strip().splitlines()
    assert any(ln.startswith("kd_steps") and "error" in ln for ln in lines)  # the table, printed last
    assert lines[-1].startswith("preset_fp32: 1 epochs in")


def test_kd_steps_stage_says_what_ran():
    """The KD-step stage on the CPU (tiny model): every way of training 5 models together is timed and
    each row says whether graphs ran (never on a CPU) and why not."""
    from benchmarks.gpu_check import stage_kd_steps

    figures = stage_kd_steps(torch.device("cpu"), quick=True)
    modes = [r["mode"] for r in figures["rows"]]
    assert modes == ["eager", "bank_nchw", "bank_channels_last", "streams"]
    assert all(r["step_ms"] > 0 and r["graphs"] is False and r["precision"] == "fp32" for r in figures["rows"])
    target = figures["targets"][0]
    assert target["graphs_over_eager_b32"] is None and target["bank_best_layout"] is None  # batch 8 only
