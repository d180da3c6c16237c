"""state.json: what a run records to be resumed, and the checks --resume makes."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from beton_builder.base.digests import file_sha256
from beton_builder.base.errors import ConfigError
from ccfs_fast.runs.config import RESUME_FREE, RunConfig
from ccfs_fast.runs.workspace import Workspace
from ccfs_fast.selection.scores import score_kind
from ccfs_fast.train.settings import leaves

STATE_VERSION = 1


def _load_state(out: Path, cfg: RunConfig) -> dict:
    """The state of the run to resume, checked: readable, consistent, and made with these settings."""
    path = out / "state.json"
    fix = "start over with --overwrite (or into another --output-dir)"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {path} is unreadable ({type(exc).__name__}: {exc}); {fix}") from exc
    problem = state_problem(state, cfg, out)
    if problem:
        raise ConfigError(f"--resume: {path} {problem}; {fix}")
    before, now = state["settings"], cfg.settings()
    # a setting a run's version did not record yet had its default then
    defaults = {leaf.name: leaf.default for leaf in leaves(RunConfig)}
    before = {**{k: defaults[k] for k in set(now) - set(before) if k in defaults}, **before}
    differ = sorted(k for k in set(before) | set(now) if k not in RESUME_FREE and before.get(k) != now.get(k))
    if differ:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:6])
        raise ConfigError(f"--resume with changed settings ({detail}); rerun with the original settings or start "
                          "a new --output-dir")
    return state


def state_problem(state: object, cfg: RunConfig, out: Path) -> str | None:
    """What is wrong with a run's state.json (None when it is sound): its shape, and whether its
    phases, their audit files and its selected images agree with each other."""
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict) \
            or not isinstance(state.get("phases"), list) or not isinstance(state.get("selected"), list):
        return "is not a ccfs-fast run state (settings, phases, selected missing)"
    phases, selected = state["phases"], state["selected"]
    if len(phases) > cfg.selection.curriculum_num:
        return f"lists {len(phases)} curricula but the run has {cfg.selection.curriculum_num}"
    for k, phase in enumerate(phases, 1):
        if not isinstance(phase, dict) or phase.get("phase") != k or not isinstance(phase.get("selected"), int):
            return f"has a malformed record for curriculum {k}"
        if not (out / f"phase{k}_candidates.npz").is_file():
            return f"lists curriculum {k} but phase{k}_candidates.npz is missing"
    if not all(isinstance(i, int) and i >= 0 for i in selected) or len(set(selected)) != len(selected):
        return "holds invalid or repeated selected indices"
    if len(selected) != sum(p["selected"] for p in phases):
        return (f"is inconsistent: it lists {len(selected)} selected images but its {len(phases)} finished curricula "
                f"selected {sum(p['selected'] for p in phases)}")
    if state.get("final") is not None and len(phases) != cfg.selection.curriculum_num:
        return "has a final evaluation before its last curriculum"
    return audit_mismatch(out, phases, selected)


def audit_mismatch(out: Path, phases: list[dict], selected: list[int]) -> str | None:
    """Whether state.json's selection is what each curriculum's audit file records it selected (an
    edited or damaged state.json would otherwise resume into another selection)."""
    start = 0
    for phase in phases:
        k, count = phase["phase"], phase["selected"]
        mine = np.asarray(selected[start:start + count], np.int64)
        start += count
        try:
            with np.load(out / f"phase{k}_candidates.npz") as audit:
                recorded = audit["selected"] if "selected" in audit.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            return f"cannot be checked: phase{k}_candidates.npz is unreadable ({type(exc).__name__})"
        if recorded is None:  # audit files of older runs do not record the selection
            continue
        if not np.array_equal(recorded, mine):
            at = next((i for i, (a, b) in enumerate(zip(mine, recorded)) if a != b), min(len(mine), len(recorded)))
            shown = f"{mine[at]} where the audit has {recorded[at]}" if at < min(len(mine), len(recorded)) else \
                f"{len(mine)} images where the audit has {len(recorded)}"
            return (f"does not match phase{k}_candidates.npz: curriculum {k}'s selection differs at position {at} "
                    f"({shown})")
    return None


def input_digests(ws: Workspace, cfg: RunConfig, teacher_digest: str) -> dict:
    """Content digests of a run's input files, recorded in state.json and compared by --resume."""
    return {"teacher": teacher_digest, "pool": ws.space.pool.digest(), "test": ws.test.digest(),
            "distilled": ws.space.distilled.digest(),
            "score": file_sha256(cfg.selection.score_path) if score_kind(cfg.selection.score).from_file else None}


def check_inputs_unchanged(before: dict | None, now: dict, cfg: RunConfig) -> None:
    i = cfg.inputs
    paths = {"teacher": i.teacher, "pool": i.pool, "test": i.test, "distilled": i.distilled,
             "score": cfg.selection.score_path}
    for name, digest in (before or {}).items():
        if now.get(name) != digest:
            raise ConfigError(f"--resume: the {name} file {paths[name]} changed since the run started (sha256 "
                              f"{str(digest)[:12]}... -> {str(now.get(name))[:12]}...); restore it, or start over "
                              "with --overwrite")


def resume_line(state: dict, cfg: RunConfig) -> str:
    """What a resumed run keeps and what it does next, in one line."""
    done = len(state["phases"])
    kept = "no curriculum" if not done else "curriculum 1" if done == 1 else f"curricula 1-{done}"
    if done < cfg.selection.curriculum_num:
        following = f"continuing with curriculum {done + 1} of {cfg.selection.curriculum_num}"
    elif state.get("final") is None:
        following = "continuing with the final evaluation"
    else:
        following = "the run had finished: rewriting its outputs"
    return f"resuming {cfg.output_dir}: {kept} kept ({len(state['selected'])} images selected); {following}"
