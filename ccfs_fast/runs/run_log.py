"""What a run writes about itself: selected_indices.json, metrics.json, exp_log.txt and the console's tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from beton_builder.base.files import write_json, write_text
from beton_builder.base.tables import format_table
from ccfs_fast.runs.config import GPU_ONLY, RunConfig
from ccfs_fast.runs.environment import environment, tf32_switches
from ccfs_fast.runs.records import PhaseRecord, phase_records
from ccfs_fast.runs.report import SMOKE_NOTE
from ccfs_fast.selection.kernels import (
    curriculum_arrangement,
)
from ccfs_fast.selection.reach import reach_text, real_reach


def _write_outputs(out: Path, cfg: RunConfig, state: dict) -> None:
    phases = state["phases"]
    totals = {k: float(sum(p[k] for p in phases)) for k in ("train_s", "eval_s", "select_s")}
    totals.update({"teacher_pass_s": state["teacher_pass_s"] + sum(p.get("teacher_s", 0.0) for p in phases),
                   "teacher_pass": state.get("teacher_pass", "full"),
                   "teacher_predicted": state.get("teacher_predicted"),
                   "teacher_predicted_this_run": state.get("teacher_predicted_here"),
                   "teacher_acc": state.get("teacher_acc"), "pool_size": state.get("pool_size"),
                   "teacher_acc_among_predicted": state.get("teacher_acc_among_predicted"),
                   "phases_done": len(phases), "selected": len(state["selected"])})
    reach = run_reach(cfg, phases)
    write_json(out / "selected_indices.json", {"ipc": cfg.selection.image_per_class, "alpha": cfg.selection.alpha,
                                               "idx_selected": state["selected"], "phases_done": len(phases),
                                               "complete": len(phases) == cfg.selection.curriculum_num,
                                               "distilled_per_class": cfg.selection.cpc, **reach})
    write_json(out / "metrics.json", {"phases": phases, "totals": totals, "final": state.get("final"),
                                      "fast_path": state.get("fast_path"), "tf32": tf32_switches(),
                                      "world_size": state.get("world_size", 1),
                                      "normalize": state.get("normalize"), "teacher_model": state.get("teacher_model"),
                                      "notes": state.get("notes", []),
                                      "distilled_overlap": state.get("distilled_overlap"),
                                      "dataset": state.get("dataset"), "class_names": state.get("class_names"),
                                      "environment": environment(cfg.machine.device),
                                      "settings": state["settings"]})
    lines = log_settings(state, cfg.machine.device)
    sel = cfg.selection
    lines += [f"cpc (distilled per class): {sel.cpc}", f"spc (selected per class): {sel.spc}",
              f"arrangement: {curriculum_arrangement(sel.spc, sel.curriculum_num)}", *state.get("notes", [])]
    lines.append(teacher_line(state))
    for p in phase_records(state):
        among = " among the images the pass reached" if p.teacher_pass == "lazy" else ""
        lines.append(f"phase {p.phase}/{sel.curriculum_num}: curpc {p.curpc}, train set {p.train_size}, "
                     f"filter acc ({p.filter_acc_rule}) {_fmt(p.filter_acc)}%, predicted {p.pool_evaluated} of "
                     f"{p.pool_eligible} eligible{among} ({p.coarse_pass} pass), teacher predicted "
                     f"{p.teacher_predicted}, candidates {p.candidates}, selected "
                     f"{p.selected} (filled {p.shortfall.filled}, unmet {p.shortfall.unmet}), train {p.train_s:.1f}s "
                     f"eval {p.eval_s:.1f}s select {p.select_s * 1000:.1f}ms")
    final = state.get("final")
    if final and final.get("accs"):
        lines.append(f"Acc@1(mean): {final['acc_mean']:.2f}%, std: {final['acc_std']:.2f} over {len(final['accs'])} "
                     f"evaluations {[round(a, 2) for a in final['accs']]}, labels: {final.get('labels', 'teacher')}")
    if phases:
        done = "" if len(phases) == sel.curriculum_num else f" (after {len(phases)} of {sel.curriculum_num} curricula)"
        lines.append(f"trained on: {reach_text(reach, sel.cpc)}{done}")
    if cfg.smoke:
        lines.append(f"note: {SMOKE_NOTE}")
    write_text(out / "exp_log.txt", "\n".join(lines) + "\n")


def teacher_line(state: dict) -> str:
    """One line: the teacher pass, the pool images the teacher predicted and its accuracy among them."""
    known = state.get("teacher_predicted")
    acc = state.get("teacher_acc_among_predicted", state.get("teacher_acc"))
    mode = state.get("teacher_pass", "full")
    cached = state.get("teacher_from_cache") or 0
    text = f"teacher pass: {mode}"
    if known is not None:
        pool = state.get("pool_size")
        of_pool = f" of {pool:,}" if pool else ""
        text += f", {known:,}{of_pool} pool images predicted ({cached:,} from the cache)"
    if acc is not None:
        text += f", teacher-correct {acc:.2f}%" + (" among predicted" if mode == "lazy" else "")
    return text


def log_settings(state: dict, device: str) -> list[str]:
    """exp_log.txt's settings: the fast-path switches as resolved for the device (those that act
    only on CUDA left out elsewhere), and the batch sizes the trainings actually used."""
    fast = state.get("fast_path") or {}
    cuda = device.startswith("cuda")
    lines = []
    for key, value in state["settings"].items():
        if key in GPU_ONLY and not cuda:
            continue
        if key in fast:
            value = fast[key]
        if key == "batch_size" and value is None:
            used = [p["batch_size"] for p in state["phases"]]
            final = (state.get("final") or {}).get("batch_size")
            value = f"auto (curricula {used}" + (f", evaluation {final})" if final else ")")
        value = resolved(key, value, state)
        lines.append(f"{key}: {value}")
    return lines


def resolved(key: str, value: object, state: dict) -> object:
    """A setting as the run resolved it, where the command line left it open: the teacher's
    architecture (from its checkpoint) and the normalisation (the constants used)."""
    if key == "teacher_model" and state.get("teacher_model"):
        return state["teacher_model"] if value is None else value
    norm = state.get("normalize")
    if key == "normalize" and norm:
        constants = f"mean {norm.get('mean')}, std {norm.get('std')}"
        return f"{value or norm.get('source', 'resolved')} ({constants})"
    return value


def run_reach(cfg: RunConfig, phases: list[dict]) -> dict:
    """The real images per class the finished curricula reached against the target (reach.real_reach)."""
    records = [PhaseRecord.from_json(p) for p in phases]
    per_class = np.sum([p.selected_per_class for p in records], axis=0) if records else np.zeros(0, np.int64)
    return real_reach(per_class, cfg.selection.spc, sum(p.curpc for p in records),
                      sum(p.shortfall.unmet for p in records))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def shortfall_line(record: PhaseRecord, class_names: tuple[str, ...], shown: int = 8) -> str | None:
    """One console line naming the classes of a phase that had fewer candidates than curpc, with
    their counts (candidates / curpc, and what `fill` added); None when no class was short."""
    curpc, cands, short = record.curpc, record.candidates_per_class, record.shortfall.short_classes
    if not short:
        return None
    filled = record.shortfall.filled_per_class
    parts = [f"{class_names[c]!r} {cands[c]}/{curpc}" + (f" +{filled[c]} filled" if filled[c] else "")
             for c in short[:shown]]
    more = f", ... ({len(short) - shown} more)" if len(short) > shown else ""
    noun = "class" if len(short) == 1 else "classes"
    return (f"phase {record.phase}: {len(short)} {noun} short of {curpc} candidates (shortfall "
            f"{record.shortfall.policy}, {record.shortfall.unmet} images unmet): {', '.join(parts)}{more}")


def summary_table(state: dict, reached: str | None = None) -> str:
    """The per-curriculum table; its last line the final accuracy and, when given, `reached` (what
    the selection holds per class against the target, reach.reach_text)."""
    rows = [(p.phase, p.curpc, p.train_size, p.train_s, f"{p.teacher_predicted:,}",
             f"{p.pool_evaluated:,} / {p.pool_eligible:,}", p.eval_s, p.select_s * 1000, _fmt(p.filter_acc), p.selected,
             p.shortfall.filled, p.shortfall.unmet)
            for p in phase_records(state)]
    table = format_table(["phase", "curpc", "train set", "train s", "teacher predicted", "predicted / eligible",
                          "predict s", "select ms", "filter acc", "selected", "filled", "unmet"], rows)
    table += "\n" + teacher_line(state)
    final = state.get("final") or {}
    last = []
    if final.get("accs"):
        how = ", ".join(v for v in (final.get("eval_model"), final.get("labels") and f"{final['labels']} labels") if v)
        last.append(f"{_fmt(final['acc_mean'])} ± {_fmt(final['acc_std'])} % top-1 over {len(final['accs'])} runs"
                    + (f" ({how})" if how else ""))
    if reached:
        last.append(f"trained on {reached}" if last else reached)
    text = table + (f"\nfinal: {', '.join(last)}" if last else "")
    if state["settings"].get("smoke"):  # the last line: a smoke run's numbers must not be read as results
        text += f"\nnote: {SMOKE_NOTE}"
    return text
