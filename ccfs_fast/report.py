"""Run reports: metrics.csv (one row per curriculum) and report.png (time breakdown, images
selected per class, score distribution of selected vs candidate images, filter accuracy), rebuilt
from a run directory's metrics.json and audit files by `ccfs-fast report RUN_DIR`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError
from .outputs import atomic_file, write_text
from .scores import pool_order_scores, score_kind

CSV_COLUMNS = ("phase", "curpc", "train_size", "batch_size", "train_s", "train_img_per_s", "coarse_pass",
               "pool_eligible", "pool_evaluated", "coarse_rounds",
               "eval_s", "eval_img_per_s", "select_s", "filter_acc", "filter_acc_rule", "filter_last_acc", "candidates",
               "unpredicted_eligible", "selected")


def metrics_frame(metrics: dict) -> pd.DataFrame:
    rows = []
    for phase in metrics["phases"]:
        row = {k: phase.get(k) for k in CSV_COLUMNS}
        row.update(filled=phase["shortfall"]["filled"], unmet=phase["shortfall"]["unmet"],
                   classes_short=phase["shortfall"]["classes_short"])
        rows.append(row)
    return pd.DataFrame(rows)


def survivor_percent(frame: pd.DataFrame) -> pd.Series:
    """Per curriculum, coarse survivors as a share of the images the filter predicted (0-100 %)."""
    return 100 * frame["candidates"] / frame["pool_evaluated"].clip(lower=1)


def _phase_audits(run_dir: Path, metrics: dict) -> list[dict]:
    """Per curriculum, from phase{k}_candidates.npz and the selection: the labels of the images it
    selected, and the scores (in the score kind's own units) of its coarse candidates and of its
    selection. Empty when an audit file is missing."""
    settings = metrics["settings"]
    kind = score_kind(settings["score"])
    selected = np.asarray(json.loads((run_dir / "selected_indices.json").read_text())["idx_selected"], np.int64)
    values = pool_order_scores(Path(settings["score_path"]), Path(settings["pool"])) if kind.from_file else None
    out, start = [], 0
    for phase in metrics["phases"]:
        path = run_dir / f"phase{phase['phase']}_candidates.npz"
        if not path.is_file():
            return []
        with np.load(path) as audit:
            index, pred, logit, label = audit["index"], audit["pred"], audit["logit"], audit["label"]
        picked = selected[start:start + phase["selected"]]
        start += phase["selected"]
        position = {i: k for k, i in enumerate(index.tolist())}
        rows = np.array([position[i] for i in picked.tolist()], np.int64)
        coarse = (pred != label) if settings["select_misclassified"] else (pred == label)
        out.append({"selected_labels": label[rows],
                    "candidate_scores": values[index[coarse]] if values is not None else logit[coarse],
                    "selected_scores": values[picked] if values is not None else logit[rows]})
    return out


def _plot(run_dir: Path, metrics: dict, frame: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    ax = axes[0, 0]
    bottom = np.zeros(len(frame))
    for column, label in (("train_s", "train"), ("eval_s", "pool evaluation"), ("select_s", "selection")):
        ax.bar(frame["phase"], frame[column], bottom=bottom, label=label)
        bottom += frame[column].to_numpy()
    ax.set(title="time per curriculum", xlabel="curriculum", ylabel="seconds", xticks=frame["phase"])
    ax.legend()

    ax = axes[0, 1]
    audits = _phase_audits(run_dir, metrics)
    num_classes = len(metrics["phases"][0]["candidates_per_class"])
    bottom = np.zeros(num_classes)
    for k, audit in enumerate(audits, 1):
        counts = np.bincount(audit["selected_labels"], minlength=num_classes)
        ax.bar(np.arange(num_classes), counts, bottom=bottom, label=f"curriculum {k}")
        bottom += counts
    due = np.cumsum(frame["curpc"].to_numpy())
    for k, level in enumerate(due, 1):  # the per-class target after each curriculum (sum of curpc)
        ax.axhline(level, color="black", linestyle="--", linewidth=0.8,
                   label="target per class (curpc, summed)" if k == 1 else None)
    ax.set(title="images selected per class", xlabel="class", ylabel="images", ylim=(0, max(due.max(initial=0),
                                                                                            bottom.max()) * 1.05 + 1))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them

    ax = axes[1, 0]
    if audits:
        candidates = np.concatenate([a["candidate_scores"] for a in audits])
        chosen = np.concatenate([a["selected_scores"] for a in audits])
        bins = np.histogram_bin_edges(np.concatenate([candidates, chosen]), bins=30)
        ax.hist(candidates, bins=bins, alpha=0.6, density=True, label=f"candidates ({len(candidates)})")
        ax.hist(chosen, bins=bins, alpha=0.6, density=True, label=f"selected ({len(chosen)})")
        ax.legend()
    easy = score_kind(metrics["settings"]["score"]).easy_end
    ax.set(title=f"{metrics['settings']['score']} score (easy = {easy})", xlabel="score", ylabel="density")

    ax = axes[0, 2]
    eligible = frame["pool_eligible"].fillna(frame["pool_evaluated"]) if "pool_eligible" in frame else \
        frame["pool_evaluated"]
    ax.bar(frame["phase"] - 0.2, eligible, width=0.4, label="eligible (teacher-correct, not selected)")
    ax.bar(frame["phase"] + 0.2, frame["pool_evaluated"], width=0.4, label="predicted by the filter")
    ax.set(title="coarse pass: pool images predicted", xlabel="curriculum", ylabel="images", xticks=frame["phase"])
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    ax.plot(frame["phase"], survivor_percent(frame), marker="o")
    ax.set(title="coarse survivors among predicted images", xlabel="curriculum", ylabel="%", xticks=frame["phase"],
           ylim=(0, 100))

    ax = axes[1, 1]
    accs = frame["filter_acc"].astype(float)
    ax.plot(frame["phase"], accs, marker="o", label="filter")
    final = metrics.get("final") or {}
    if final.get("acc_mean") is not None:
        ax.axhline(final["acc_mean"], color="black", linestyle="--", label=f"final eval {final['acc_mean']:.1f}%")
    ax.set(title="test top-1 per curriculum", xlabel="curriculum", ylabel="%", xticks=frame["phase"])
    ax.legend()
    fig.suptitle(f"CCFS run {run_dir.name}: ipc {metrics['settings']['image_per_class']}, "
                 f"alpha {metrics['settings']['alpha']}")
    fig.tight_layout()
    with atomic_file(out, ".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """(Re)writes metrics.csv and report.png of a run directory from its metrics.json."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.json; pass the --output-dir of a `ccfs-fast run`")
    metrics = json.loads(path.read_text())
    frame = metrics_frame(metrics)
    write_text(run_dir / "metrics.csv", frame.to_csv(index=False))
    if len(frame):
        _plot(run_dir, metrics, frame, run_dir / "report.png")
    return run_dir / "metrics.csv", run_dir / "report.png"
