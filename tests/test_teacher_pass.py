"""The lazy, memoised teacher pass (`--teacher-pass lazy`, the default): the teacher predicts a pool
image the first time a coarse pass reaches it, and the selection is bit for bit that of `--teacher-pass
full` (every pool image predicted first). Real CIFAR-format runs through the CLI, each with its own
cross-run cache folder; the torchrun and ImageNet-format comparisons are in test_distributed.py and
test_imagenet.py, the generated and published-score problems in test_coarse.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_args, set_flag

from beton_builder.beton import BetonFile
from ccfs_fast.cli import main
from ccfs_fast.data.readers import read_labels


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cross-run cache folder of this test's own (no teacher prediction made before it)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder / "ccfs-fast"


def _run(data, out, *extra, epochs="2"):
    assert main(set_flag(run_args(data, out, "--num-eval", "0", *extra), "--epochs", epochs)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return json.loads((out / "selected_indices.json").read_text())["idx_selected"], metrics


def _same_as_full(data, tmp_path, monkeypatch, *extra, epochs="2"):
    """Runs lazy (default) then full, each into a cache of its own; returns (lazy metrics, full metrics)
    after checking the selections are identical, in order."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-lazy"))
    lazy_sel, lazy = _run(data, tmp_path / "lazy", *extra, epochs=epochs)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-full"))
    full_sel, full = _run(data, tmp_path / "full", *extra, "--teacher-pass", "full", epochs=epochs)
    assert lazy_sel == full_sel and len(lazy_sel) > 0
    assert lazy["totals"]["teacher_pass"] == "lazy" and full["totals"]["teacher_pass"] == "full"
    return lazy, full


def test_lazy_predicts_less_than_half_the_pool_and_selects_what_full_selects(engine_data, tmp_path, monkeypatch,
                                                                              capsys):
    """The default run: identical selection; the teacher predicted under half of the 800-image pool
    (the full pass all of it); the counts are in metrics.json, exp_log.txt and the console table, and
    teacher_pass.npz marks the images the teacher never predicted."""
    lazy, full = _same_as_full(engine_data, tmp_path, monkeypatch, epochs="3")  # the run fixture's filters
    pool = 800
    assert full["totals"]["teacher_predicted"] == pool
    assert lazy["totals"]["teacher_predicted"] < pool / 2
    # a fresh cache: every prediction made by this run, 64 of them before the first curriculum (the probe)
    assert lazy["totals"]["teacher_predicted"] == lazy["totals"]["teacher_predicted_this_run"]
    assert lazy["totals"]["teacher_predicted"] - 64 <= sum(p["teacher_predicted"] for p in lazy["phases"])
    assert lazy["phases"][0]["teacher_predicted"] > 0
    assert full["phases"][0]["teacher_predicted"] == 0  # all of it before the first curriculum
    log = (tmp_path / "lazy" / "exp_log.txt").read_text()
    assert f"teacher pass: lazy, {lazy['totals']['teacher_predicted']} of {pool} pool images predicted" in log
    assert "eligible among the images the pass reached" in log
    out = capsys.readouterr().out
    assert "teacher predicted" in out and "teacher-correct" in out and "among predicted" in out
    with np.load(tmp_path / "lazy" / "teacher_pass.npz") as tp:
        assert int((tp["pred"] != -2).sum()) == lazy["totals"]["teacher_predicted"]


@pytest.mark.parametrize("extra,short", [
    (("--no-balance", "--score", "cscore", "--shortfall", "short"), False),
    (("--score", "memorization", "--select-method", "hard", "--shortfall", "fill", "--no-select-misclassified",
      "--image-per-class", "40", "--alpha", "0.1"), True),
    (("--select-method", "random", "--shortfall", "short", "--no-select-misclassified", "--image-per-class", "40",
      "--alpha", "0.1"),
     True),
], ids=["global-budget-cscore-short", "memorization-hard-correct-fill", "random-correct-short"])
def test_the_same_selection_under_other_settings(engine_data, tmp_path, monkeypatch, extra, short):
    """Balance off, every score kind from a file, each shortfall policy, hard and random order, and
    correctly classified candidates (a weak filter: too few of them, so `fill` tops classes up and
    `short` leaves them short): the lazy teacher pass selects what the full one does."""
    lazy, full = _same_as_full(engine_data, tmp_path, monkeypatch, *extra)
    assert lazy["totals"]["teacher_predicted"] <= full["totals"]["teacher_predicted"] == 800
    # a short class was walked to its end: the fill / shortfall saw every teacher-correct image of it
    for lazy_phase, full_phase in zip(lazy["phases"], full["phases"]):
        assert lazy_phase["shortfall"] == full_phase["shortfall"]
    assert short == any(p["shortfall"]["filled"] or p["shortfall"]["unmet"] for p in lazy["phases"])


def test_strict_shortfall_stops_with_the_same_error(engine_data, tmp_path, fresh_cache, capsys):
    """A shortfall under `strict` (correctly classified candidates of a weak filter): both passes stop
    in the same curriculum with the same message."""
    args = ("--no-select-misclassified", "--shortfall", "strict", "--image-per-class", "60")
    messages = []
    for mode in ("lazy", "full"):
        code = main(run_args(engine_data, tmp_path / mode, "--num-eval", "0", *args, "--teacher-pass", mode))
        messages.append((code, capsys.readouterr().err.strip().splitlines()[-1]))
    assert messages[0] == messages[1] and messages[0][0] != 0, messages


def test_the_cache_carries_predictions_to_later_runs(engine_data, tmp_path, fresh_cache):
    """A second lazy run with the same teacher and pool makes no teacher prediction; a full run then
    predicts only the images no earlier run needed; the selection never changes."""
    first_sel, first = _run(engine_data, tmp_path / "first")
    known = first["totals"]["teacher_predicted"]
    assert first["totals"]["teacher_predicted_this_run"] == known > 0
    again_sel, again = _run(engine_data, tmp_path / "again")
    assert again_sel == first_sel and again["totals"]["teacher_predicted_this_run"] == 0
    full_sel, full = _run(engine_data, tmp_path / "full", "--teacher-pass", "full")
    assert full_sel == first_sel
    assert full["totals"]["teacher_predicted_this_run"] == 800 - known
    entry = next(fresh_cache.glob("teacher_pass-*.npz"))
    with np.load(entry) as cached:
        assert (cached["pred"] >= 0).all()  # now whole


def test_a_pass_that_reads_every_image_says_why_it_is_full(engine_data, tmp_path, fresh_cache):
    """--coarse-pass full (and --score logits) need the teacher on every pool image: the run makes a
    full teacher pass although lazy is the default, and exp_log.txt says why."""
    _, metrics = _run(engine_data, tmp_path / "run", "--coarse-pass", "full")
    assert metrics["totals"]["teacher_pass"] == "full" and metrics["totals"]["teacher_predicted"] == 800
    assert "(--teacher-pass full): --coarse-pass full predicts every eligible image" in \
        (tmp_path / "run" / "exp_log.txt").read_text()


def test_resume_keeps_the_runs_own_teacher_predictions(engine_data, tmp_path, fresh_cache):
    """A run cut back to its first curriculum (as a kill in phase 2 leaves it), its cache then lost:
    --resume starts from the run's own teacher_pass.npz and selects what the uninterrupted run did."""
    import shutil

    whole_sel, _ = _run(engine_data, tmp_path / "whole")
    out = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole", out)
    state = json.loads((out / "state.json").read_text())
    first = state["phases"][0]
    state.update(phases=[first], selected=state["selected"][:first["selected"]], final=None)
    (out / "state.json").write_text(json.dumps(state))
    for k in (2, 3):
        (out / f"phase{k}_candidates.npz").unlink()
    # teacher_pass.npz as the kill left it: what the teacher knew after curriculum 1 (the probe, the
    # images the filter predicted, the selection), everything else -2
    with np.load(out / "teacher_pass.npz") as saved:
        arrays = dict(saved)
    with np.load(out / "phase1_candidates.npz") as audit:
        keep = np.zeros(800, bool)
        keep[audit["index"]] = keep[audit["selected"]] = True
    arrays["pred"] = np.where(keep, arrays["pred"], -2)
    np.savez(out / "teacher_pass.npz", **arrays)
    shutil.rmtree(fresh_cache)
    assert main(set_flag(run_args(engine_data, out, "--num-eval", "0", "--resume"), "--epochs", "2")) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["teacher_from_cache"] == 0 and state["teacher_from_run_file"] == int(keep.sum())
    assert state["teacher_predicted_here"] > state["teacher_made_before"] > 0  # curricula 2-3 predicted more
    assert json.loads((out / "selected_indices.json").read_text())["idx_selected"] == whole_sel
    labels = read_labels(BetonFile.open(engine_data["pool"]))
    with np.load(out / "teacher_pass.npz") as tp:
        assert (tp["pred"][whole_sel] == labels[whole_sel]).all()
