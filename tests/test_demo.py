"""`ccfs-fast demo` on scikit-learn's real digits, shortened: every stage runs and the table prints."""
from __future__ import annotations

import json

from ccfs_fast.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--epochs", "4", "--teacher-epochs", "4", "--num-eval", "1"]) == 0
    table = capsys.readouterr().out
    for method in ("teacher (full pool, labels)", "CCFS (distilled + selected)", "random real", "distilled only",
                   "full pool"):
        assert method in table
    sel = json.loads((out / "ccfs_run" / "selected_indices.json").read_text())
    assert sel["ipc"] == 20 and len(sel["idx_selected"]) == 16 * 10
    assert (out / "demo_table.txt").read_text().strip() in table
    assert main(["demo", "--output-dir", str(out)]) == 2  # an existing demo is not overwritten silently
