"""The evaluations of a run, as `report` shows them: the run's own final evaluation and every `eval`
result written in the run directory (eval.json and any other eval*.json holding the protocol:
architecture, label regime, CCFS and the random baseline at the same IPC, DD-Ranking's scores), as
evaluation.csv, evaluation.png (architecture x {CCFS, random}, mean ± std) and report.png's panel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from beton_builder.base.files import atomic_file, write_text
from ccfs_fast.runs.protocol import plus_minus

EVALUATION_COLUMNS = ("source", "architecture", "labels", "ccfs_mean", "ccfs_std", "random_mean", "random_std",
                      "difference_mean", "difference_std", "hlr_mean", "hlr_std", "ior_mean", "ior_std", "lrs_mean",
                      "lrs_std", "runs")


def _rows_of(source: str, result: dict) -> list[dict]:
    """evaluation.csv's rows of one eval result (its protocol's rows; an older result: its one set)."""
    protocol = result.get("protocol") or {}
    rows = protocol.get("rows") or ([{"architecture": result.get("eval_model", "?"), "ccfs_mean": result["acc_mean"],
                                      "ccfs_std": result["acc_std"], "ccfs_accs": result.get("accs", [])}]
                                    if result.get("acc_mean") is not None else [])
    out = []
    for r in rows:
        d = r.get("ddranking") or {}
        out.append({"source": source, "architecture": r["architecture"],
                    "labels": r.get("labels", protocol.get("labels", result.get("labels", "teacher"))),
                    **{k: r.get(k) for k in ("ccfs_mean", "ccfs_std", "random_mean", "random_std", "difference_mean",
                                             "difference_std")},
                    **{k: d.get(k) for k in ("hlr_mean", "hlr_std", "ior_mean", "ior_std", "lrs_mean", "lrs_std")},
                    "runs": len(r.get("ccfs_accs") or [])})
    return out


def evaluation_rows(run_dir: Path, metrics: dict) -> list[dict]:
    """The run's final evaluation, then each eval*.json of the run directory (name order), one row per
    architecture and label regime. A file that is not an eval result is left out."""
    rows = []
    final = metrics.get("final") or {}
    if final.get("acc_mean") is not None:
        settings = metrics.get("settings", {})
        rows += _rows_of("run", {**final, "eval_model": final.get("eval_model", settings.get("eval_model")),
                                 "labels": final.get("labels", settings.get("labels", "teacher"))})
    for path in sorted(run_dir.glob("eval*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and "accs" in result:
            rows += _rows_of(path.name, result)
    return rows


def evaluation_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    """(header, rows) of the console's table of every evaluation (as `eval` prints its own)."""
    header = ["source", "architecture", "labels", "CCFS %", "random %", "CCFS - random", "HLR", "IOR", "LRS"]
    out = []
    for r in rows:
        cells = [plus_minus(r[f"{k}_mean"], r[f"{k}_std"]) for k in ("ccfs", "random", "difference")]
        cells += [plus_minus(r[f"{k}_mean"], r[f"{k}_std"], 4) for k in ("hlr", "ior", "lrs")]
        out.append((r["source"], r["architecture"], r["labels"], *cells))
    return header, out


def write_evaluation_csv(run_dir: Path, rows: list[dict]) -> Path:
    path = run_dir / "evaluation.csv"
    write_text(path, pd.DataFrame(rows, columns=list(EVALUATION_COLUMNS)).to_csv(index=False))
    return path


def evaluation_panel(ax, rows: list[dict]) -> None:
    """Grouped bars: per evaluation (architecture, label regime, source), CCFS and, where measured, the
    random baseline at the same IPC (top-1 %, mean ± std over the evaluation seeds)."""
    if not rows:
        ax.text(0.5, 0.5, "no evaluation yet\n(ccfs-fast eval --run-dir RUN --baseline random)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set(title="evaluation", xticks=[])
        return
    x = np.arange(len(rows))
    ccfs = [r["ccfs_mean"] for r in rows]
    ax.bar(x - 0.2, ccfs, width=0.4, yerr=[r["ccfs_std"] or 0 for r in rows], capsize=3, label="CCFS")
    random = [r["random_mean"] if r["random_mean"] is not None else np.nan for r in rows]
    if not all(np.isnan(random)):
        ax.bar(x + 0.2, random, width=0.4, yerr=[r["random_std"] or 0 for r in rows], capsize=3,
               label="random real images, same IPC")
    for k, r in enumerate(rows):
        if r.get("lrs_mean") is not None:
            ax.annotate(f"LRS {r['lrs_mean']:.3f}", (k, max(ccfs[k], random[k] if random[k] == random[k] else 0)),
                        ha="center", va="bottom", fontsize=7)
    names = [f"{r['architecture']}\n{r['labels']} labels" + ("" if r["source"] in ("run", "eval.json")
                                                               else f"\n{r['source']}") for r in rows]
    ax.set_xticks(x, names, fontsize=7)
    ax.set(title="evaluation: test top-1 (mean ± std)", ylabel="%", ylim=(0, 100))
    ax.legend(fontsize=8, loc="upper right", frameon=False)


def write_evaluation_figure(run_dir: Path, rows: list[dict]) -> Path | None:
    """evaluation.png: the matrix of every evaluation (evaluation_panel), when there is one."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 5), layout="constrained")
    evaluation_panel(ax, rows)
    fig.suptitle(f"CCFS run {run_dir.name}: evaluations", fontsize=12)
    out = run_dir / "evaluation.png"
    with atomic_file(out, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
