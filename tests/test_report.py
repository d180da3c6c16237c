"""Run reports: metrics.csv and report.png written by every run and rebuilt by `ccfs-fast report`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image

from ccfs_fast.cli import main
from ccfs_fast.runs.report import _phase_audits


def test_run_writes_csv_and_png(finished_run):
    frame = pd.read_csv(finished_run / "metrics.csv")
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert len(frame) == 3 and frame["phase"].tolist() == [1, 2, 3]
    assert frame["train_s"].tolist() == [p["train_s"] for p in metrics["phases"]]
    assert {"eval_img_per_s", "select_s", "filter_acc", "filled", "unmet"} <= set(frame.columns)
    with Image.open(finished_run / "report.png") as png:
        assert png.format == "PNG" and png.size[0] > 600 and png.size[1] > 400


def test_report_audits_match_the_selection(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    scores = np.load(metrics["settings"]["score_path"])
    audits = _phase_audits(finished_run, metrics, scores)
    assert [int(a["selected_per_class"].sum()) for a in audits] == [p["selected"] for p in metrics["phases"]]
    picked_all = json.loads((finished_run / "selected_indices.json").read_text())["idx_selected"]
    start = 0
    for audit, phase in zip(audits, metrics["phases"]):
        assert (audit["selected_per_class"] == phase["curpc"]).all()
        picked = set(picked_all[start:start + phase["selected"]])
        start += phase["selected"]
        with np.load(finished_run / f"phase{phase['phase']}_candidates.npz") as npz:
            index, pred, label = npz["index"], npz["pred"], npz["label"]
        # forgetting: easy = low; within each class the picked candidates are the easiest ones
        # (a mean over all classes can go either way: classes hold different numbers of candidates)
        for c in range(10):
            cand = index[(pred != label) & (label == c)]
            chosen = [i for i in cand if i in picked]
            rest = [i for i in cand if i not in picked]
            if chosen and rest:
                assert scores[chosen].max() <= scores[rest].min()


def test_report_command_rebuilds(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    for path in finished_run.iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    (run / "metrics.csv").unlink()
    (run / "report.png").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "metrics.csv").read_text() == (finished_run / "metrics.csv").read_text()
    assert (run / "report.png").stat().st_size > 10_000
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "has no metrics.json" in capsys.readouterr().err
