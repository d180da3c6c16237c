"""The evaluation protocol (issue: honest evaluation): label regimes, the random baseline at the same
IPC, the cross-architecture matrix and DD-Ranking's scores, on a CIFAR-format set."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import inputs_of

from ccfs_fast.cli import main
from ccfs_fast.data.loaders import norm_tensors
from ccfs_fast.runs.config import Machine
from ccfs_fast.runs.protocol import ddranking_scores, random_draw
from ccfs_fast.train.recipe import FastPath, TrainRecipe


def eval_args(data: dict, run_dir, out, *extra: str) -> list[str]:
    return ["eval", "--run-dir", str(run_dir), "--pool", str(data["pool"]), "--test", str(data["test"]),
            "--distilled", str(data["distilled"]), "--teacher", str(data["teacher"]), "--output", str(out), *extra]


class Counter:
    """Counts a module's forward calls (a forward hook): how often the teacher ran."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


@pytest.fixture(scope="module")
def workspace(engine_data):
    from ccfs_fast.runs.workspace import open_workspace

    return open_workspace(inputs_of(engine_data, teacher_model="convnet_small"), 4, Machine(eval_batch_size=64),
                          fast=FastPath().resolve("cpu"))


def _train(ws, labels: str, targets=None):
    from ccfs_fast.train.students import train_together

    recipe = TrainRecipe(epochs=2, lr=0.05, lr_warmup_epochs=0)
    train_set = np.concatenate([ws.distilled_rows, np.arange(0, 800, 8)])
    return train_together(ws, train_set, "convnet_small", recipe, 4.0, [3], lambda e: False, f"{labels} test",
                          labels=labels, targets=targets), train_set


def test_hard_labels_train_with_cross_entropy_not_kd(workspace):
    """The same seed, data order and augmentation: KD from the teacher and cross-entropy on the labels
    give measurably different models, and the hard one never runs the teacher."""
    counter = Counter(workspace.teacher)
    kd, _ = _train(workspace, "teacher")
    kd_calls, counter.calls = counter.calls, 0
    hard, _ = _train(workspace, "hard")
    counter.handle.remove()
    assert kd_calls > 0 and counter.calls == 0
    a, b = (torch.cat([p.flatten() for p in m.models[0].parameters()]) for m in (kd, hard))
    assert (a - b).abs().max() > 1e-3


def test_soft_labels_never_call_the_teacher_during_training(workspace):
    """--labels soft: the teacher runs once per train image, unaugmented, before training (one
    prediction batch per eval batch), never inside a step; the targets are its logits."""
    from ccfs_fast.train.students import soft_targets

    _, train_set = _train(workspace, "hard")
    counter = Counter(workspace.teacher)
    targets = soft_targets(workspace, train_set)
    assert counter.calls == math.ceil(len(train_set) / 64)
    assert targets.shape == (len(train_set), workspace.num_classes) and torch.isfinite(targets).all()
    counter.calls = 0
    soft, _ = _train(workspace, "soft", targets)
    assert counter.calls == 0
    counter.handle.remove()
    # the fixed targets are the teacher's own logits of those images
    images, _, _ = workspace.resident(train_set[:5])
    inv, shift = norm_tensors(workspace.norm, workspace.device)
    with torch.no_grad():
        workspace.teacher.eval()
        direct = workspace.teacher(images.float() * inv + shift)
    torch.testing.assert_close(targets[:5], direct, rtol=1e-4, atol=1e-4)


def test_random_draw_is_exact_per_class_and_seeded():
    labels = np.repeat(np.arange(4), [10, 7, 3, 12])
    per_class = np.array([2, 0, 3, 5])
    draw = random_draw(labels, per_class, 7)
    assert np.array_equal(np.bincount(labels[draw], minlength=4), per_class)
    assert len(np.unique(draw)) == len(draw)
    assert np.array_equal(draw, random_draw(labels, per_class, 7))
    assert not np.array_equal(draw, random_draw(labels, per_class, 8))
    with pytest.raises(ValueError, match="class 2 has 3 pool images"):
        random_draw(labels, np.array([0, 0, 4, 0]), 1)


def test_ddranking_formulas():
    """HLR, IOR and LRS per seed as ddranking 0.2.0 computes them (fractions, lambda 0.5), then the
    mean and population std."""
    set_accs, random_accs, hard_accs, full = [60.0, 62.0], [50.0, 55.0], [40.0, 45.0], 90.0
    s = ddranking_scores(set_accs, random_accs, hard_accs, full)
    for i in range(2):
        hlr, ior = full / 100 - hard_accs[i] / 100, set_accs[i] / 100 - random_accs[i] / 100
        a = 0.5 * ior - 0.5 * hlr
        assert s["hlr"][i] == pytest.approx(hlr) and s["ior"][i] == pytest.approx(ior)
        assert s["lrs"][i] == pytest.approx((math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert s["lrs_mean"] == pytest.approx(np.mean(s["lrs"])) and s["lrs_std"] == pytest.approx(np.std(s["lrs"]))
    # ddranking 0.2.0's own code feeds percent accuracies to the same formula
    a = 0.5 * (set_accs[0] - random_accs[0]) - 0.5 * (full - hard_accs[0])
    assert s["lrs_as_ddranking_0_2_0"][0] == pytest.approx((math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1)))
    # a set no better than random that recovers the full data's accuracy scores (1 - e^-1) / (e - e^-1)
    same = ddranking_scores([50.0], [50.0], [90.0], 90.0)
    assert same["lrs"][0] == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))


def test_eval_protocol_matrix_random_baseline_and_scores(finished_run, engine_data, tmp_path, capsys):
    """eval --labels hard --baseline random over two architectures: one row per architecture, the
    random draw has the selection's per-class counts (recorded seed, the same draw on a rerun), and
    the scores equal the formulas on the rows' own numbers."""
    out = tmp_path / "a" / "eval.json"
    out.parent.mkdir()
    args = eval_args(engine_data, finished_run, out, "--labels", "hard", "--baseline", "random",
                     "--eval-model", "convnet_small,convnet_tiny", "--full-data-acc", "70,60", "--num-eval", "2",
                     "--baseline-seed", "11")
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    protocol = result["protocol"]
    assert [r["architecture"] for r in protocol["rows"]] == ["convnet_small", "convnet_tiny"]
    assert protocol["labels"] == "hard" and result["labels"] == "hard" and protocol["random_seed"] == 11
    assert "convnet_tiny" in printed.splitlines()[-1] or "convnet_tiny" in printed
    selection = json.loads((finished_run / "selected_indices.json").read_text())["idx_selected"]
    draw = json.loads((out.parent / "random_indices.json").read_text())
    from beton_builder.beton import BetonFile
    from ccfs_fast.data.readers import read_labels

    pool = read_labels(BetonFile.open(engine_data["pool"]))
    assert np.array_equal(np.bincount(pool[draw["idx_selected"]], minlength=10),
                          np.bincount(pool[selection], minlength=10))
    assert draw["seed"] == 11 and draw["ipc"] == 20
    for row, full in zip(protocol["rows"], (70.0, 60.0)):
        assert len(row["ccfs_accs"]) == len(row["random_accs"]) == 2
        want = ddranking_scores(row["ccfs_accs"], row["random_accs"], row["ccfs_accs"], full)  # hard = own regime
        assert row["ddranking"]["lrs"] == pytest.approx(want["lrs"])
        assert row["difference"] == pytest.approx([a - b for a, b in zip(row["ccfs_accs"], row["random_accs"])])
    again = tmp_path / "b" / "eval.json"
    again.parent.mkdir()
    assert main(eval_args(engine_data, finished_run, again, "--labels", "hard", "--baseline", "random",
                          "--eval-model", "convnet_small", "--num-eval", "1", "--epochs", "1",
                          "--baseline-seed", "11")) == 0
    assert json.loads((again.parent / "random_indices.json").read_text())["idx_selected"] == draw["idx_selected"]


def test_report_draws_and_tables_every_evaluation(finished_run, engine_data, tmp_path, capsys):
    """After `eval --baseline random` in a run directory, `report` writes evaluation.csv (the run's own
    final evaluation and the eval's rows), evaluation.png and report.png, and ends with the table."""
    import shutil

    import pandas as pd
    from PIL import Image

    from ccfs_fast.runs.report import curricula_text

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["eval", "--run-dir", str(run), "--labels", "hard", "--baseline", "random", "--num-eval", "1",
                 "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    frame = pd.read_csv(run / "evaluation.csv")
    assert frame["source"].tolist() == ["run", "eval.json"] and frame["labels"].tolist() == ["teacher", "hard"]
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert frame["ccfs_mean"][0] == pytest.approx(final["acc_mean"]) and np.isnan(frame["random_mean"][0])
    result = json.loads((run / "eval.json").read_text())["protocol"]["rows"][0]
    assert frame["random_mean"][1] == pytest.approx(result["random_mean"])
    assert frame["lrs_mean"][1] == pytest.approx(result["ddranking"]["lrs_mean"])  # the teacher's accuracy as full
    assert printed[-1].startswith("eval.json") and "hard" in printed[-1] and printed[-2].startswith("run ")
    for name in ("evaluation.png", "report.png"):
        with Image.open(run / name) as png:
            assert png.format == "PNG" and png.size[0] > 500
    assert curricula_text(1, 3, {}) == "unfinished, 1 of 3 curricula" and curricula_text(3, 3, {}) == "3 curricula"
