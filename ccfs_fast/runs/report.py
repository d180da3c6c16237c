"""Run reports: metrics.csv (one row per curriculum), report.png (time per curriculum, the coarse pass,
accuracies and survivors, the evaluations (CCFS and the random baseline, evaluation_report), the score
distribution of selected vs candidate images, every training's per-epoch loss and test accuracy,
images selected per class by name), evaluation.csv / evaluation.png and selection.png
(selection_figure), rebuilt from a run directory by `ccfs-fast report RUN_DIR`."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from beton_builder.base.digests import cache_dir
from beton_builder.base.files import atomic_file, write_text
from ccfs_fast.runs.evaluation_report import (
    evaluation_panel,
    evaluation_rows,
    write_evaluation_csv,
    write_evaluation_figure,
)
from ccfs_fast.runs.records import phase_records
from ccfs_fast.runs.run_inputs import InputMissing, RunInputs, read_run_json, resolve_run_inputs
from ccfs_fast.selection.scores import pool_order_scores, score_kind

CSV_COLUMNS = ("phase", "curpc", "train_size", "batch_size", "train_s", "train_img_per_s", "coarse_pass",
               "pool_eligible", "pool_evaluated", "coarse_rounds",
               "eval_s", "eval_img_per_s", "select_s", "filter_acc", "filter_acc_rule", "filter_last_acc", "candidates",
               "unpredicted_eligible", "teacher_pass", "teacher_predicted", "teacher_s", "teacher_known", "selected")


def metrics_frame(metrics: dict) -> pd.DataFrame:
    """metrics.csv: one row per curriculum, read back through its typed record (records.PhaseRecord)."""
    rows = []
    for phase in phase_records(metrics):
        row = {k: getattr(phase, k) for k in CSV_COLUMNS}
        row.update(filled=phase.shortfall.filled, unmet=phase.shortfall.unmet,
                   classes_short=phase.shortfall.classes_short)
        rows.append(row)
    return pd.DataFrame(rows)


def survivor_percent(frame: pd.DataFrame) -> pd.Series:
    """Per curriculum, coarse survivors as a share of the images the filter predicted (0-100 %)."""
    return 100 * frame["candidates"] / frame["pool_evaluated"].clip(lower=1)


def _phase_audits(run_dir: Path, metrics: dict, values: np.ndarray | None) -> list[dict]:
    """Per curriculum, from phase{k}_candidates.npz, the selection and metrics.json: the images it
    selected per class, and the scores (in the score kind's own units: `values`, the score file in pool
    order, or the audit's logits for --score logits; none when a file kind's score file is not at hand)
    of its coarse candidates and of its selection. Empty when an audit file is missing."""
    settings = metrics["settings"]
    from_file = score_kind(settings["score"]).from_file
    selected = np.asarray(json.loads((run_dir / "selected_indices.json").read_text())["idx_selected"], np.int64)
    out, start = [], 0
    for phase in phase_records(metrics):
        path = run_dir / f"phase{phase.phase}_candidates.npz"
        if not path.is_file():
            return []
        with np.load(path) as audit:
            index, pred, logit, label = audit["index"], audit["pred"], audit["logit"], audit["label"]
        picked = selected[start:start + phase.selected]
        start += phase.selected
        position = {i: k for k, i in enumerate(index.tolist())}
        # images `fill` added may not have been predicted: no audit row, so no logit of theirs
        rows = np.array([position[i] for i in picked.tolist() if i in position], np.int64)
        coarse = (pred != label) if settings["select_misclassified"] else (pred == label)
        scored = values is not None or not from_file
        out.append({"selected_per_class": np.asarray(phase.selected_per_class, np.int64),
                    "candidate_scores": (values[index[coarse]] if values is not None else logit[coarse]) if scored
                    else None,
                    "selected_scores": (values[picked] if values is not None else logit[rows]) if scored else None})
    return out


def class_names(metrics: dict) -> list[str]:
    """The run's class names (metrics.json; a run written before it recorded them: the labels)."""
    if metrics.get("class_names"):
        return list(metrics["class_names"])
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
    lazy = "teacher_pass" in frame and (frame["teacher_pass"] == "lazy").any()
    among = " among the images reached" if lazy else ""
    ax.bar(frame["phase"] - 0.3, eligible, width=0.3, label=f"eligible (teacher-correct, not selected){among}")
    ax.bar(frame["phase"], frame["pool_evaluated"], width=0.3, label="predicted by the filter")
    if lazy:  # the lazy teacher pass: what the teacher predicted in each curriculum
        ax.bar(frame["phase"] + 0.3, frame["teacher_predicted"], width=0.3, label="predicted by the teacher")
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


def _score_panel(ax, audits: list[dict], score: str, missing: str | None) -> None:
    title, xlabel = score_title(score)
    if audits and audits[0]["candidate_scores"] is not None:
        candidates = np.concatenate([a["candidate_scores"] for a in audits])
        chosen = np.concatenate([a["selected_scores"] for a in audits])
        bins = np.histogram_bin_edges(np.concatenate([candidates, chosen]), bins=30)
        ax.hist(candidates, bins=bins, alpha=0.6, density=True, label=f"coarse candidates ({len(candidates):,})")
        ax.hist(chosen, bins=bins, alpha=0.6, density=True, label=f"selected ({len(chosen):,})")
        _legend_below(ax)
    elif missing:
        ax.text(0.5, 0.5, "the run's score file is not at hand\n(ccfs-fast report --score-path FILE)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set(title=title, xlabel=xlabel, ylabel="density")


def _curves_panel(ax, run_dir: Path, column: str = "loss") -> None:
    """Per-epoch `column` (loss, or test_acc where measured) of every training (curves.csv; the final
    evaluation's models averaged)."""
    path = run_dir / "curves.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if not frame.empty and column in frame:
        frame = frame.dropna(subset=[column])
    if frame.empty:
        ax.text(0.5, 0.5, f"no {column} in curves.csv", ha="center", va="center", transform=ax.transAxes)
    else:
        frame["training"] = frame["training"].str.replace(r" model \d+$", "", regex=True)
        for name, part in frame.groupby("training", sort=False):
            mean = part.groupby("epoch")[column].mean()
            ax.plot(mean.index, mean.to_numpy(), marker="." if len(mean) < 4 else None, label=name)
        _legend_below(ax)
    title = "training curves: loss per epoch" if column == "loss" else "training curves: test top-1 per epoch"
    ax.set(title=title, xlabel="epoch", ylabel="loss" if column == "loss" else "%")
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


def curricula_text(done: int, planned: int | None, metrics: dict) -> str:
    """'3 curricula', or 'unfinished, 1 of 3 curricula' for a run that stopped before its end."""
    if planned is not None and (done < planned or (metrics.get("final") is None and metrics.get("complete") is False)):
        return f"unfinished, {done} of {planned} curricula"
    return f"{done} curricul{'um' if done == 1 else 'a'}"


def _plot(run_dir: Path, metrics: dict, frame: pd.DataFrame, out: Path, values: np.ndarray | None,
          missing: str | None, evaluations: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(n) for n in class_names(metrics)]
    fig = plt.figure(figsize=(22, 11), layout="constrained")
    grid = fig.add_gridspec(3, 4, height_ratios=[1, 1, 0.9])
    audits = _phase_audits(run_dir, metrics, values)
    _time_panel(fig.add_subplot(grid[0, 0]), frame)
    _coarse_panel(fig.add_subplot(grid[0, 1]), frame)
    _accuracy_panel(fig.add_subplot(grid[0, 2]), frame, metrics)
    evaluation_panel(fig.add_subplot(grid[0, 3]), evaluations)
    _score_panel(fig.add_subplot(grid[1, 0]), audits, metrics["settings"]["score"], missing)
    _curves_panel(fig.add_subplot(grid[1, 1]), run_dir)
    _curves_panel(fig.add_subplot(grid[1, 2:]), run_dir, "test_acc")
    _per_class_panel(fig.add_subplot(grid[2, :]), audits, frame, names)
    settings = metrics["settings"]
    title = (f"CCFS run {run_dir.name}: ipc {settings['image_per_class']}, alpha {settings['alpha']}, "
             f"{curricula_text(len(frame), settings.get('curriculum_num'), metrics)}, {settings['score']} score")
    fig.suptitle(title + (f"\n{SMOKE_NOTE}" if settings.get("smoke") else ""), fontsize=13,
                 color="firebrick" if settings.get("smoke") else "black")
    with atomic_file(out, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


@contextmanager
def matplotlib_home() -> Iterator[None]:
    """matplotlib's config and font cache (MPLCONFIGDIR) inside the tool's cache; when that cannot be
    written, a temporary folder removed when the figures are drawn (matplotlib's own fallback is a
    `matplotlib-*` folder it removes at interpreter exit, which this tool's console script skips)."""
    if "MPLCONFIGDIR" in os.environ or "matplotlib" in sys.modules:
        yield
        return
    place = cache_dir() / "matplotlib"
    try:
        place.mkdir(parents=True, exist_ok=True)
        if not os.access(place, os.W_OK):
            raise PermissionError(place)
    except OSError:
        place = Path(tempfile.mkdtemp(prefix="ccfs-fast-matplotlib-"))
        os.environ["MPLCONFIGDIR"] = str(place)
        try:
            yield
        finally:
            shutil.rmtree(place, ignore_errors=True)
        return
    os.environ["MPLCONFIGDIR"] = str(place)
    yield


REPORT_INPUTS = ("pool", "distilled", "score_path")  # the score panel's values and selection.png's pictures


def report_inputs(run_dir: Path, given: dict[str, Path] | None) -> tuple[RunInputs | None, str | None]:
    """(the run's inputs a report reads, checked by run_inputs; None and why when one is nowhere to be
    found: the parts drawn from it are left out, with a note). A file that is there but is not the one the
    run used is refused (InputChanged): a report never draws from another pool or score file."""
    try:
        state = read_run_json(run_dir, "state.json")
        return resolve_run_inputs(state, run_dir, REPORT_INPUTS, given), None
    except InputMissing as exc:
        return None, " ".join(str(exc).split())


def write_report(run_dir: str | Path, classes: list[str] | None = None, given: dict[str, Path] | None = None
                 ) -> tuple[Path, ...]:
    """(Re)writes metrics.csv, report.png and selection.png of a run directory from its metrics.json,
    audit files and .beton files; `classes` chooses selection.png's classes (names or labels); `given`:
    where a flag says an input of the run is now (--pool, --distilled, --score-path)."""
    run_dir = Path(run_dir)
    metrics = read_run_json(run_dir, "metrics.json")
    frame = metrics_frame(metrics)
    write_text(run_dir / "metrics.csv", frame.to_csv(index=False))
    if not len(frame):
        return (run_dir / "metrics.csv",)
    inputs, missing = report_inputs(run_dir, given)
    values = None
    if inputs is not None and score_kind(metrics["settings"]["score"]).from_file:
        values = pool_order_scores(inputs["score_path"], inputs["pool"])
    evaluations = evaluation_rows(run_dir, metrics)
    written = [run_dir / "metrics.csv", write_evaluation_csv(run_dir, evaluations), run_dir / "report.png"]
    with matplotlib_home():
        _plot(run_dir, metrics, frame, run_dir / "report.png", values, missing, evaluations)
        figure = write_evaluation_figure(run_dir, evaluations)
        written += [figure] if figure is not None else []
        if inputs is None:  # its pictures come from the run's .beton files
            print(f"note: selection.png and the score panel not drawn: {missing}", file=sys.stderr)
            return tuple(written)
        from ccfs_fast.runs.selection_figure import write_selection_figure

        write_selection_figure(run_dir, run_dir / "selection.png", classes, inputs.paths)
    return (*written, run_dir / "selection.png")
