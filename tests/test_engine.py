"""`ccfs-fast run` / `eval` end to end on generated CIFAR-format data with tiny models."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import check_snapshot, run_args, snapshot_machine

from beton_builder.beton import BetonFile
from ccfs_fast.cli import main
from ccfs_fast.data.readers import read_labels
from ccfs_fast.selection.kernels import candidate_mask, curriculum_arrangement, order_key, select_per_class
from ccfs_fast.selection.scores import easy_first_key, load_scores


def test_run_writes_outputs_and_a_valid_selection(finished_run, engine_data):
    out = finished_run
    for name in ("selected_indices.json", "metrics.json", "exp_log.txt", "state.json", "teacher_pass.npz",
                 "phase1_candidates.npz", "phase2_candidates.npz", "phase3_candidates.npz"):
        assert (out / name).is_file(), name
    sel = json.loads((out / "selected_indices.json").read_text())
    assert {"ipc", "alpha", "idx_selected"} <= set(sel) and sel["ipc"] == 20 and sel["alpha"] == 0.2
    picked = np.array(sel["idx_selected"])
    labels = read_labels(BetonFile.open(engine_data["pool"]))
    assert len(np.unique(picked)) == len(picked) == 16 * 10                     # unique, spc per class
    assert picked.min() >= 0 and picked.max() < len(labels)                     # pool index range
    assert (np.bincount(labels[picked], minlength=10) == 16).all()              # exact budget under fill
    with np.load(out / "teacher_pass.npz") as tp:
        assert (tp["pred"][picked] == labels[picked]).all()                     # all teacher-correct
    metrics = json.loads((out / "metrics.json").read_text())
    phases = metrics["phases"]
    assert [p["curpc"] for p in phases] == curriculum_arrangement(16, 3) == [6, 5, 5]
    assert [p["train_size"] for p in phases] == [40, 100, 150]                  # D ∪ selected so far
    for key in ("train_s", "pool_evaluated", "eval_s", "eval_img_per_s", "select_s", "filter_acc", "filter_acc_rule",
                "filter_last_acc",
                "candidates_per_class", "shortfall"):
        assert key in phases[0], key
    assert len(metrics["final"]["accs"]) == 2 and metrics["final"]["acc_mean"] is not None
    # how each training ran, and why not otherwise: a CPU run steps eagerly (no fallback); the two
    # evaluation models trained as one fused bank
    state = json.loads((out / "state.json").read_text())
    for record in (phases[0], state["phases"][0]):
        train_data = record["execution"].pop("train_data")
        assert record["execution"] == {"cuda_graphs": False, "fallback": False, "capture_s": 0.0,
                                       "cuda_graphs_off": "cuda graphs: CUDA only (device cpu); running eagerly"}
        assert train_data.startswith("resident (40 images at 32x32 need 0.00 GiB, budget ")  # the phase's train set
    for final in (metrics["final"], state["final"]):
        assert final["execution"]["bank"] and final["execution"]["bank_off"] is None
        assert not final["execution"]["bank_fallback"] and not final["execution"]["cuda_graphs"]
    assert metrics["tf32"] == {"cudnn_allow_tf32": True, "matmul_allow_tf32": False,
                               "float32_matmul_precision": "highest"}
    assert "environment" in metrics and "Acc@1(mean)" in (out / "exp_log.txt").read_text()


def test_the_same_selection_as_before_the_layers(finished_run):
    """A CIFAR-format run selects, and its models score, exactly what they did before the engine was
    restructured (bit for bit: indices, filter and final accuracies)."""
    if not check_snapshot("cifar_run", finished_run):
        pytest.skip(f"the snapshot was recorded on another machine kind (this: {snapshot_machine()})")


def test_each_phase_recomputes_from_its_audit_files(finished_run, engine_data):
    """Every phase's selection follows from phase{k}_candidates.npz, teacher_pass.npz and the score
    file alone. The teacher pass is lazy: an image it never predicted (-2) is one no phase reached."""
    out = finished_run
    labels = read_labels(BetonFile.open(engine_data["pool"]))
    with np.load(out / "teacher_pass.npz") as tp:
        teacher_ok, teacher_unknown = tp["pred"] == labels, tp["pred"] == -2
    assert teacher_unknown.any()
    key = easy_first_key(load_scores(engine_data["scores"], labels), "forgetting")
    picked = np.array(json.loads((out / "selected_indices.json").read_text())["idx_selected"])
    selected = np.zeros(len(labels), bool)
    start = 0
    for phase, curpc in enumerate(curriculum_arrangement(16, 3), 1):
        with np.load(out / f"phase{phase}_candidates.npz") as c:
            index, pred, exhausted, stop_key, stop_index = (c["index"], c["pred"], c["exhausted"], c["stop_key"],
                                                             c["stop_index"])
        eligible = teacher_ok & ~selected
        assert set(index.tolist()) <= set(np.flatnonzero(eligible).tolist())  # the lazy pass: a part of them
        okey = order_key("simple", key, 5 * 1009 + phase)
        unpredicted = (teacher_ok | teacher_unknown) & ~selected
        unpredicted[index] = False
        for c in range(10):  # what was not predicted ranks after where the class's prediction stopped
            rest = np.flatnonzero(unpredicted & (labels == c))
            assert not exhausted[c] or len(rest) == 0  # exhausted: every unselected image reached
            # (not exhausted with nothing left: the unreached tail is known to be teacher-incorrect)
            assert all((okey[i], i) > (stop_key[c], stop_index[c]) for i in rest)
        full = np.full(len(labels), -1)
        full[index] = pred
        cand = candidate_mask(teacher_ok, selected, full, labels, True)
        phase_sel = select_per_class(cand, labels, 10, order_key("simple", key, 5 * 1009 + phase), curpc, True,
                                     "fill", teacher_ok & ~selected).indices
        assert phase_sel.tolist() == picked[start:start + len(phase_sel)].tolist()
        assert not selected[phase_sel].any()                                   # disjoint from earlier phases
        selected[phase_sel] = True
        start += len(phase_sel)


def test_lazy_and_full_coarse_pass_select_the_same(finished_run, engine_data, tmp_path):
    """Two runs that differ only in --coarse-pass: identical selected_indices.json; the lazy one (the
    default) predicted fewer images, and its audit files say how far each class was predicted."""
    full = tmp_path / "full"
    assert main(run_args(engine_data, full, "--coarse-pass", "full", "--num-eval", "0")) == 0
    lazy_sel = json.loads((finished_run / "selected_indices.json").read_text())["idx_selected"]
    assert json.loads((full / "selected_indices.json").read_text())["idx_selected"] == lazy_sel
    lazy_phases = json.loads((finished_run / "metrics.json").read_text())["phases"]
    full_phases = json.loads((full / "metrics.json").read_text())["phases"]
    assert [p["coarse_pass"] for p in lazy_phases] == ["lazy"] * 3 and full_phases[0]["coarse_pass"] == "full"
    for lazy, whole in zip(lazy_phases, full_phases):  # lazy: eligible among what the teacher predicted
        assert lazy["teacher_pass"] == "lazy" and whole["teacher_pass"] == "full"
        assert lazy["pool_eligible"] <= whole["pool_eligible"] == whole["pool_evaluated"]
    assert sum(p["pool_evaluated"] for p in lazy_phases) < sum(p["pool_evaluated"] for p in full_phases)
    with np.load(finished_run / "phase1_candidates.npz") as audit:
        assert str(audit["pass_mode"]) == "lazy" and audit["stop_key"].shape == (10,)
        assert len(audit["index"]) == lazy_phases[0]["pool_evaluated"]


def test_eval_reproduces_the_runs_numbers(finished_run, engine_data, tmp_path):
    final = json.loads((finished_run / "metrics.json").read_text())["final"]
    result = tmp_path / "eval.json"
    args = ["eval", "--pool", str(engine_data["pool"]), "--test", str(engine_data["test"]),
            "--distilled", str(engine_data["distilled"]), "--teacher", str(engine_data["teacher"]),
            "--teacher-model", "convnet_small", "--eval-model", "convnet_small", "--selection",
            str(finished_run / "selected_indices.json"), "--epochs", "3", "--lr", "0.05", "--lr-warmup-epochs", "1",
            "--num-eval", "2", "--seed", "5", "--output", str(result)]
    assert main(args) == 0
    assert json.loads(result.read_text())["accs"] == final["accs"]


def test_non_empty_output_dir_refused(finished_run, engine_data, capsys):
    before = (finished_run / "state.json").read_bytes()
    assert main(run_args(engine_data, finished_run)) == 2
    err = capsys.readouterr().err
    assert "holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (finished_run / "state.json").read_bytes() == before


def test_resume_refuses_changed_settings(finished_run, engine_data, capsys):
    args = run_args(engine_data, finished_run)
    args[args.index("--epochs") + 1] = "4"
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "changed settings" in err and "epochs: 3 -> 4" in err


def test_resume_of_a_run_that_predates_a_setting(finished_run, engine_data, tmp_path, capsys):
    """A run written before a setting existed (state.json lacks it, inside a config part) resumes:
    the missing setting had its default then."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    state = json.loads((old / "state.json").read_text())
    for name in ("labels", "train_data", "train_side"):
        assert name in state["settings"], name
        del state["settings"][name]
    (old / "state.json").write_text(json.dumps(state))
    selected = (old / "selected_indices.json").read_bytes()
    assert main([*run_args(engine_data, old), "--resume"]) == 0, capsys.readouterr().err
    assert (old / "selected_indices.json").read_bytes() == selected


def test_kill_during_phase_2_then_resume_matches(engine_data, tmp_path):
    """A real SIGKILL while phase 2 runs; --resume finishes with the uninterrupted run's selection."""
    longer = ["--epochs", "8", "--num-eval", "0"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cmd = [sys.executable, "-m", "ccfs_fast.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, *run_args(engine_data, broken), *longer],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:
        state = broken / "state.json"
        if state.is_file() and len(json.loads(state.read_text())["phases"]) == 1:
            break
        assert proc.poll() is None, "run ended before phase 1 was recorded"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((broken / "state.json").read_text())
    assert len(state["phases"]) == 1, "the kill did not land in phase 2"
    assert subprocess.run([*cmd, *run_args(engine_data, broken), *longer, "--resume"], env=env,
                          capture_output=True, timeout=300).returncode == 0
    assert main([*run_args(engine_data, whole), *longer]) == 0
    a = json.loads((broken / "selected_indices.json").read_text())
    b = json.loads((whole / "selected_indices.json").read_text())
    assert a["idx_selected"] == b["idx_selected"] and a["complete"]


def test_candidates_count_predicted_survivors_only(finished_run):
    """A lazy run leaves most eligible images unpredicted: the coarse survivors it reports are the
    misclassified images among those it predicted (its audit files), so every survivor rate is a
    share of the predicted images, at most 1."""
    phases = json.loads((finished_run / "metrics.json").read_text())["phases"]
    unselected = [800 - sum(q["selected"] for q in phases[:k]) for k in range(len(phases))]
    assert sum(p["pool_evaluated"] for p in phases) < sum(unselected) / 2  # the filter saw under half the pool
    for p in phases:
        with np.load(finished_run / f"phase{p['phase']}_candidates.npz") as audit:
            pred, label = audit["pred"], audit["label"]
        survivors = np.bincount(label[pred != label], minlength=10)
        assert p["candidates_per_class"] == survivors.tolist()
        assert p["candidates"] == survivors.sum() <= p["pool_evaluated"] == len(pred)
        # eligible: among the images the (lazy) teacher predicted, by this run or, through the cache, earlier ones
        assert p["unpredicted_eligible"] == p["pool_eligible"] - p["pool_evaluated"] >= 0
    from ccfs_fast.runs.records import PhaseRecord
    from ccfs_fast.runs.report import metrics_frame, survivor_percent

    assert all(0 <= PhaseRecord.from_json(p).survivor_rate <= 1 for p in phases)
    assert (survivor_percent(metrics_frame({"phases": phases})) <= 100).all()
