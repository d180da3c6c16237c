"""Run reports: metrics.csv and report.png written by every run and rebuilt by `ccfs-fast report`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image

from ccfs_fast.cli import main
from ccfs_fast.report import _phase_audits


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
    audits = _phase_audits(finished_run, metrics)
    assert [len(a["selected_labels"]) for a in audits] == [p["selected"] for p in metrics["phases"]]
    for audit, phase in zip(audits, metrics["phases"]):
        assert (np.bincount(audit["selected_labels"], minlength=10) == phase["curpc"]).all()
        # forgetting: easy = low; what was picked is no harder on average than the candidates
        assert audit["selected_scores"].mean() <= audit["candidate_scores"].mean() + 1e-9


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
