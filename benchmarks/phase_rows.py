"""`bench phase`'s teacher and whole-run rows, from each side's worker results (pure functions)."""
from __future__ import annotations

import numpy as np


def whole_run_s(run: dict) -> float:
    """A run's wall clock: set-up, the teacher pass (before and inside the curricula), every curriculum."""
    return run["setup_s"] + run["teacher_pass_s"] + sum(p["curriculum_s"] for p in run["phases"])


def teacher_and_run_rows(curriculum: dict, ccfs_runs: list[dict], base_runs: list[dict],
                         full_runs: list[dict]) -> list[dict]:
    """The teacher rows (the baseline's full pass against ccfs-fast's lazy and full ones: seconds and
    pool images predicted, each side's median over its runs) and the whole-run row."""
    shared = {k: curriculum[k] for k in ("dataset", "model", "epochs", "pool", "side", "classes", "curricula")}
    base_teacher = float(np.median([r["teacher_pass_s"] for r in base_runs]))
    rows = []
    for stage, runs in (("teacher", ccfs_runs), ("teacher, full pass", full_runs)):
        seconds = float(np.median([r["teacher_pass_s"] for r in runs]))
        rows.append({**shared, "stage": stage, "baseline_s": base_teacher, "ccfs_s": seconds,
                     "speedup": base_teacher / seconds, "repeats": len(runs),
                     "ccfs_teacher_predicted": runs[0]["teacher_predicted"],
                     "baseline_teacher_predicted": base_runs[0]["teacher_predicted"],
                     "ccfs_runs_s": [r["teacher_pass_s"] for r in runs],
                     "baseline_runs_s": [r["teacher_pass_s"] for r in base_runs]})
    ccfs_s = float(np.median([whole_run_s(r) for r in ccfs_runs]))
    base_s = float(np.median([whole_run_s(r) for r in base_runs]))
    rows.append({**shared, "stage": "run", "baseline_s": base_s, "ccfs_s": ccfs_s, "speedup": base_s / ccfs_s,
                 "repeats": len(ccfs_runs), "ccfs_runs_s": [whole_run_s(r) for r in ccfs_runs],
                 "baseline_runs_s": [whole_run_s(r) for r in base_runs],
                 "ccfs_full_teacher_run_s": float(np.median([whole_run_s(r) for r in full_runs])),
                 "same_selection_as_full_teacher": [p["selection"] for p in ccfs_runs[0]["phases"]]
                 == [p["selection"] for p in full_runs[0]["phases"]]})
    return rows


def check_same_selection(rows: list[dict]) -> None:
    """ccfs-fast's lazy and full teacher passes must select the same images: RuntimeError otherwise
    (a benchmark that measured a wrong engine must not pass for a fast one)."""
    wrong = [f"{r['dataset']} {r['model']}" for r in rows
             if r["stage"] == "run" and not r["same_selection_as_full_teacher"]]
    if wrong:
        raise RuntimeError(f"--teacher-pass lazy and full selected different images on {', '.join(wrong)}")


def predicted_text(row: dict) -> str:
    """The table's 'predicted / full pass' cell: the filter's pool predictions (pool_eval) or the
    teacher's (teacher rows), ccfs-fast's against the baseline's."""
    if row["stage"] == "pool_eval":
        return f"{sum(row['ccfs_predicted']):,} / {sum(row['baseline_predicted']):,}"
    if row["stage"].startswith("teacher"):
        return f"{row['ccfs_teacher_predicted']:,} / {row['baseline_teacher_predicted']:,}"
    if row["stage"] == "run" and not row["same_selection_as_full_teacher"]:
        return "selection differs from --teacher-pass full!"
    return ""
