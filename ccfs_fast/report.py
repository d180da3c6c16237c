"""Run reports: metrics.csv (one row per curriculum), report.png (time per curriculum, the coarse pass,
accuracies and survivors, the score distribution of selected vs candidate images, every training's
per-epoch curve, images selected per class by name) and selection.png (selection_figure), rebuilt from
a run directory by `ccfs-fast report RUN_DIR`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CCFSError, ConfigError, DataError
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
    """Per curriculum, from phase{k}_candidates.npz, the selection and metrics.json: the images it
    selected per class, and the scores (in the score kind's own units) of its coarse candidates and of
    its selection. Empty when an audit file is missing."""
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
        # images `fill` added may not have been predicted: no audit row, so no logit of theirs
        rows = np.array([position[i] for i in picked.tolist() if i in position], np.int64)
        coarse = (pred != label) if settings["select_misclassified"] else (pred == label)
        out.append({"selected_per_class": np.asarray(phase["selected_per_class"], np.int64),
                    "candidate_scores": values[index[coarse]] if values is not None else logit[coarse],
                    "selected_scores": values[picked] if values is not None else logit[rows]})
    return out


def class_names(metrics: dict) -> list[str]:
    """The run's class names (metrics.json; a run written before it recorded them: the pool's manifest,
    else the labels)."""
    if metrics.get("class_names"):
        return list(metrics["class_names"])
    from beton_builder.manifest import read_manifest

    try:
        return list(read_manifest(metrics["settings"]["pool"]).class_names)
    except CCFSError:
        return [str(c) for c in range(len(metrics["phases"][0]["candidates_per_class"]))]


def short_names(names: list[str], most: int = 40) -> tuple[list[int], list[str]]:
    """(tick positions, labels) for a class axis: every class's name (abbreviated to 12 characters), or
    every k-th when there are more than `most` classes."""
    step = max(1, -(-len(names) // most))
    ticks = list(range(0, len(names), step))
    return ticks, [names[t] if len(names[t]) <= 12 else names[t][:11] + "…" for t in ticks]


def score_title(name: str) -> tuple[str, str]:
    """(panel title, x label) for a score kind, e.g. ('difficulty: forgetting events (Toneva et al.
    2019)', 'forgetting events (low = easy)')."""
    kind = score_kind(name)
    return f"difficulty: {kind.description}", f"{kind.description.split(' (')[0]} ({kind.easy_end} = easy)"


SMOKE_NOTE = "--smoke: a CPU-sized run; its accuracies are not meaningful"


def _legend_below(ax, columns: int = 2) -> None:
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=columns, frameon=False)


def _time_panel(ax, frame: pd.DataFrame) -> None:
    bottom = np.zeros(len(frame))
    for column, label in (("train_s", "training the filter"), ("eval_s", "predicting the pool")):
        ax.bar(frame["phase"], frame[column], bottom=bottom, label=label)
        bottom += frame[column].to_numpy()
    for x, top, select in zip(frame["phase"], bottom, frame["select_s"]):  # milliseconds: a number, not a bar
        ax.annotate(f"select {select * 1000:.1f} ms", (x, top), ha="center", va="bottom", fontsize=8)
    ax.set(title="time per curriculum", xlabel="curriculum", ylabel="seconds", xticks=frame["phase"],
           ylim=(0, bottom.max(initial=0) * 1.18 + 1e-9))
    _legend_below(ax)


def _coarse_panel(ax, frame: pd.DataFrame) -> None:
    eligible = frame["pool_eligible"].fillna(frame["pool_evaluated"]) if "pool_eligible" in frame else \
        frame["pool_evaluated"]
    ax.bar(frame["phase"] - 0.2, eligible, width=0.4, label="eligible (teacher-correct, not selected)")
    ax.bar(frame["phase"] + 0.2, frame["pool_evaluated"], width=0.4, label="predicted by the filter")
    ax.set(title="coarse pass: pool images predicted", xlabel="curriculum", ylabel="images", xticks=frame["phase"])
    _legend_below(ax, 1)


def _accuracy_panel(ax, frame: pd.DataFrame, metrics: dict) -> None:
    ax.plot(frame["phase"], frame["filter_acc"].astype(float), marker="o", label="filter (test top-1)")
    ax.plot(frame["phase"], survivor_percent(frame), marker="s", label="coarse survivors among predicted")
    final = metrics.get("final") or {}
    if final.get("acc_mean") is not None:
        ax.axhline(final["acc_mean"], color="black", linestyle="--",
                   label=f"final evaluation {final['acc_mean']:.1f}% (± {final['acc_std']:.1f})")
    ax.set(title="per curriculum", xlabel="curriculum", ylabel="%", xticks=frame["phase"], ylim=(0, 100))
    _legend_below(ax, 1)


def _score_panel(ax, audits: list[dict], score: str) -> None:
    title, xlabel = score_title(score)
    if audits:
        candidates = np.concatenate([a["candidate_scores"] for a in audits])
        chosen = np.concatenate([a["selected_scores"] for a in audits])
        bins = np.histogram_bin_edges(np.concatenate([candidates, chosen]), bins=30)
        ax.hist(candidates, bins=bins, alpha=0.6, density=True, label=f"coarse candidates ({len(candidates):,})")
        ax.hist(chosen, bins=bins, alpha=0.6, density=True, label=f"selected ({len(chosen):,})")
        _legend_below(ax)
    ax.set(title=title, xlabel=xlabel, ylabel="density")


def _curves_panel(ax, run_dir: Path) -> None:
    """Per-epoch KD loss of every training (curves.csv; the final evaluation's models averaged)."""
    path = run_dir / "curves.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if frame.empty:
        ax.text(0.5, 0.5, "no curves.csv", ha="center", va="center", transform=ax.transAxes)
    else:
        frame["training"] = frame["training"].str.replace(r" model \d+$", "", regex=True)
        for name, part in frame.groupby("training", sort=False):
            mean = part.groupby("epoch")["loss"].mean()
            ax.plot(mean.index, mean.to_numpy(), label=name)
        _legend_below(ax)
    ax.set(title="training curves: KD loss per epoch", xlabel="epoch", ylabel="loss")
    ax.xaxis.get_major_locator().set_params(integer=True)


def _per_class_panel(ax, audits: list[dict], frame: pd.DataFrame, names: list[str]) -> None:
    bottom = np.zeros(len(names))
    for k, audit in enumerate(audits, 1):
        counts = audit["selected_per_class"]
        ax.bar(np.arange(len(names)), counts, bottom=bottom, width=0.85, label=f"curriculum {k}")
        bottom += counts
    due = np.cumsum(frame["curpc"].to_numpy())
    for k, level in enumerate(due, 1):  # the per-class target after each curriculum (sum of curpc)
        ax.axhline(level, color="black", linestyle="--", linewidth=0.8,
                   label="target after each curriculum" if k == 1 else None)
    ticks, labels = short_names(names)
    ax.set_xticks(ticks, labels, rotation=90 if len(ticks) > 12 else 0, fontsize=8)
    ax.set(title="real images selected per class", ylabel="images", xlim=(-0.6, len(names) - 0.4),
           ylim=(0, max(due.max(initial=0), bottom.max(initial=0)) * 1.08 + 1))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)


def _plot(run_dir: Path, metrics: dict, frame: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(n) for n in class_names(metrics)]
    fig = plt.figure(figsize=(17, 11), layout="constrained")
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 0.9])
    audits = _phase_audits(run_dir, metrics)
    _time_panel(fig.add_subplot(grid[0, 0]), frame)
    _coarse_panel(fig.add_subplot(grid[0, 1]), frame)
    _accuracy_panel(fig.add_subplot(grid[0, 2]), frame, metrics)
    _score_panel(fig.add_subplot(grid[1, 0]), audits, metrics["settings"]["score"])
    _curves_panel(fig.add_subplot(grid[1, 1:]), run_dir)
    _per_class_panel(fig.add_subplot(grid[2, :]), audits, frame, names)
    settings = metrics["settings"]
    title = (f"CCFS run {run_dir.name}: ipc {settings['image_per_class']}, alpha {settings['alpha']}, "
             f"{len(frame)} curricula, {settings['score']} score")
    fig.suptitle(title + (f"\n{SMOKE_NOTE}" if settings.get("smoke") else ""), fontsize=13,
                 color="firebrick" if settings.get("smoke") else "black")
    with atomic_file(out, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_report(run_dir: str | Path, classes: list[str] | None = None) -> tuple[Path, ...]:
    """(Re)writes metrics.csv, report.png and selection.png of a run directory from its metrics.json,
    audit files and .beton files; `classes` chooses selection.png's classes (names or labels)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.json; pass the --output-dir of a `ccfs-fast run`")
    metrics = json.loads(path.read_text())
    frame = metrics_frame(metrics)
    write_text(run_dir / "metrics.csv", frame.to_csv(index=False))
    if not len(frame):
        return (run_dir / "metrics.csv",)
    _plot(run_dir, metrics, frame, run_dir / "report.png")
    from .selection_figure import write_selection_figure

    try:
        write_selection_figure(run_dir, run_dir / "selection.png", classes)
    except DataError as exc:  # its pictures come from the run's .beton files, which may be gone
        print(f"note: selection.png not drawn: {' '.join(str(exc).split())}", file=sys.stderr)
        return run_dir / "metrics.csv", run_dir / "report.png"
    return run_dir / "metrics.csv", run_dir / "report.png", run_dir / "selection.png"
