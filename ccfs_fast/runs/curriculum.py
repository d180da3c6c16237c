"""The CCFS curriculum (docs/design.md §1): teacher pass, K curricula of train -> coarse -> fine, final
evaluation; resumable after the last finished curriculum."""
from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from beton_builder.base.digests import file_sha256
from beton_builder.base.files import missing_top, output_error, write_json
from beton_builder.base.locks import LOCK_NAME, RunLock
from beton_builder.manifest import recorded_names
from ccfs_fast.runs.config import RunConfig
from ccfs_fast.runs.curves import CurveLog
from ccfs_fast.runs.phase import run_phase, write_audit
from ccfs_fast.runs.records import phase_records
from ccfs_fast.runs.report import write_report
from ccfs_fast.runs.run_dir import prepare_output_dir
from ccfs_fast.runs.run_inputs import input_record
from ccfs_fast.runs.run_log import _write_outputs, run_reach, shortfall_line, summary_table
from ccfs_fast.runs.state import STATE_VERSION, _load_state, check_inputs_unchanged, input_digests, resume_line
from ccfs_fast.runs.teacher_pass import TeacherMemo, open_teacher_pass, write_run_pass
from ccfs_fast.runs.workspace import Workspace, open_workspace
from ccfs_fast.selection.kernels import (
    curriculum_arrangement,
    warm_up_kernels,
)
from ccfs_fast.selection.reach import reach_text
from ccfs_fast.selection.scores import easy_first_key, load_scores, score_kind
from ccfs_fast.train.distributed import DistContext, barrier, broadcast, init_distributed
from ccfs_fast.train.models import check_model_name, stem_warning
from ccfs_fast.train.students import FINAL_CURVE, evaluate_selection, filter_curve


def say(notes, main: bool) -> None:
    """Prints a run's notes (on rank 0 only)."""
    if main:
        for note in notes:
            print(note, flush=True)


def run_curriculum(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Runs (or resumes) CCFS into cfg.output_dir; returns the final state dict. Under torchrun every
    rank trains and predicts its share; rank 0 selects and writes every output. A run that fails
    before its first curriculum is recorded leaves no output directory it created behind."""
    dist_ctx, device = init_distributed(cfg.machine.device)
    out = cfg.output_dir
    created = missing_top(out) if dist_ctx.is_main else None  # the folders this run creates, parents included
    ran_here = (out / LOCK_NAME).exists()  # an earlier ccfs-fast run used this folder (its lock file is there)
    try:
        if dist_ctx.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise output_error(out, exc) from exc
        with RunLock(out) if dist_ctx.is_main else nullcontext():  # one run per output directory
            return _run(cfg, dist_ctx, device, resume, overwrite, ran_here)
    except BaseException:
        if created is not None and not any(out.glob("phase*_candidates.npz")):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _check_models(cfg: RunConfig, side: int) -> None:
    """Unknown model names fail before the teacher pass; an ImageNet stem on small images warns."""
    for name in dict.fromkeys((cfg.filter_model, cfg.evaluation.eval_model)):
        check_model_name(name)
        warning = stem_warning(name, side)
        if warning:
            tqdm.write(warning)


def run_curves(out: Path, cfg: RunConfig, state: dict) -> CurveLog:
    """The run's curves (curves.csv, and tb/ with --tensorboard): a resumed run keeps the rows of the
    trainings it keeps (its finished curricula's filters, a finished final evaluation) and drops the
    rest, which it trains again."""
    keep = {filter_curve(p["phase"]) for p in state["phases"]}
    if state.get("final") is not None:
        keep |= {FINAL_CURVE} | {f"{FINAL_CURVE} model {m + 1}" for m in range(cfg.evaluation.num_eval)}
    return CurveLog(out / "curves.csv", out / "tb", keep, cfg.tensorboard)


def _run(cfg: RunConfig, dist_ctx: DistContext, device: str, resume: bool, overwrite: bool,
         ran_here: bool = True) -> dict:
    """The CCFS loop (docs/design.md §1): teacher pass, K curricula of train -> coarse -> fine, each
    written as it finishes, then the final evaluation and the run's outputs."""
    out, main, sel = cfg.output_dir, dist_ctx.is_main, cfg.selection
    state, ws, teacher_digest = _start(cfg, dist_ctx, device, resume, overwrite, ran_here)
    file_key = _file_order_key(cfg, ws, state)
    arrangement = curriculum_arrangement(sel.spc, sel.curriculum_num)
    teacher = _teacher_pass(ws, cfg, state, teacher_digest, file_key is not None, resume)
    selected = np.asarray(state["selected"], np.int64)
    for phase in tqdm(range(len(state["phases"]) + 1, sel.curriculum_num + 1), desc="curricula",
                      initial=len(state["phases"]), total=sel.curriculum_num, dynamic_ncols=True, disable=not main):
        rate = phase_records(state)[-1].survivor_rate if state["phases"] else None
        outcome = run_phase(ws, cfg, phase, arrangement[phase - 1], selected, teacher, file_key, rate)
        selected = np.concatenate([selected, outcome.picked])
        state["phases"].append(outcome.record.to_json())
        state["selected"] = selected.tolist()
        _record_teacher(state, teacher)
        line = shortfall_line(outcome.record, ws.space.manifest.class_names)
        if main:
            if line:
                tqdm.write(line)
            if outcome.record.teacher_predicted:  # else both already hold what the teacher knows
                teacher.save()
                write_run_pass(out / "teacher_pass.npz", teacher)
            write_audit(out / f"phase{phase}_candidates.npz", outcome.passed, ws.pool_labels, outcome.picked)
            write_json(out / "state.json", state)
            _write_outputs(out, cfg, state)
    if state.get("final") is None:
        ev = cfg.evaluation
        state["final"] = evaluate_selection(ws, selected, ev.eval_model, cfg.recipe, ev.temperature, ev.num_eval,
                                            cfg.machine.seed, ev.fuse_evals, "final evaluation (CCFS selection)",
                                            ev.labels)
        if main:
            write_json(out / "state.json", state)
    if main:
        _write_outputs(out, cfg, state)
        write_report(out)
        ws.curves.close()
        print(summary_table(state, reach_text(run_reach(cfg, state["phases"]), sel.cpc)))
    barrier(dist_ctx)
    return state


def _start(cfg: RunConfig, dist_ctx: DistContext, device: str, resume: bool, overwrite: bool,
           ran_here: bool) -> tuple[dict, Workspace, str]:
    """(the run's state: new, or resumed and checked; its workspace; the teacher's digest), the inputs'
    digests and what the run resolved recorded in the state."""
    out = cfg.output_dir
    if dist_ctx.is_main:
        resuming = prepare_output_dir(out, resume, overwrite, ran_here)
        state = _load_state(out, cfg) if resuming else {"version": STATE_VERSION, "settings": cfg.settings(),
                                                         "phases": [], "selected": [], "final": None}
        if resuming:
            print(resume_line(state, cfg), flush=True)
    barrier(dist_ctx)
    state = broadcast(state if dist_ctx.is_main else None, dist_ctx)
    fast = cfg.fast.resolve(device)
    torch.backends.cudnn.benchmark = bool(fast.cudnn_benchmark)
    ws = open_workspace(cfg.inputs, cfg.selection.cpc, replace(cfg.machine, device=device), dist_ctx, fast)
    if dist_ctx.is_main:
        _check_models(cfg, ws.side)
        ws.curves = run_curves(out, cfg, state)
    teacher_digest = file_sha256(cfg.inputs.teacher)
    digests = input_digests(ws, cfg, teacher_digest)
    if resume and dist_ctx.is_main:
        check_inputs_unchanged(state.get("inputs"), digests, cfg)
    state["inputs"] = digests
    state.update(input_record(cfg.settings(), out))  # where later commands find the inputs from anywhere
    state.update(fast_path=asdict(fast), notes=list(cfg.notes), normalize=ws.norm.to_json(),
                 teacher_model=ws.teacher_arch, distilled_overlap=ws.distilled_overlap, dataset=ws.dataset,
                 class_names=list(ws.space.manifest.class_names), world_size=dist_ctx.world_size)
    say(cfg.notes, dist_ctx.is_main)
    return state, ws, teacher_digest


def _file_order_key(cfg: RunConfig, ws: Workspace, state: dict) -> np.ndarray | None:
    """The easy-first key of a score file (None for --score logits, which ranks by each phase's own
    predictions: every eligible image is then predicted, and a note says so)."""
    sel, main = cfg.selection, ws.dist.is_main
    if score_kind(sel.score).from_file:
        said: list[str] = []
        key = easy_first_key(load_scores(sel.score_path, ws.pool_labels, said,
                                         lambda: recorded_names(ws.space.pool.path)), sel.score)
        state["notes"] += said
        say(said, main)
        return key
    if sel.coarse_pass == "lazy":
        note = (f"note: --score {sel.score} ranks candidates by this phase's own predictions, so every eligible "
                "image is predicted (--coarse-pass full)")
        state["notes"].append(note)
        say([note], main)
    return None


def teacher_pass_mode(cfg: RunConfig, key_known: bool) -> tuple[str, str | None]:
    """(the teacher pass this run makes, why it is `full` when lazy was asked for). A lazy teacher
    pass needs a lazy coarse pass (which reaches images in an order known before prediction); a full
    coarse pass, or --score logits (which ranks by each phase's own predictions), reads every
    eligible image, so the teacher predicts every pool image first."""
    sel = cfg.selection
    if sel.teacher_pass == "full":
        return "full", None
    if sel.coarse_pass == "full":
        return "full", "--coarse-pass full predicts every eligible image"
    if not key_known:
        return "full", f"--score {sel.score} ranks by each phase's own predictions of every eligible image"
    return "lazy", None


def _teacher_pass(ws: Workspace, cfg: RunConfig, state: dict, teacher_digest: str, key_known: bool,
                  resume: bool) -> TeacherMemo:
    """The run's teacher memo (open_teacher_pass: full predicts every pool image now, lazy as the
    coarse passes reach them; teacher_pass.npz written, the mode and why, seconds and accuracy
    recorded), then the selection kernels compiled and the workspace warmed, so that no curriculum
    pays for either."""
    out = cfg.output_dir
    mode, why = teacher_pass_mode(cfg, key_known)
    if why is not None:
        note = f"note: the teacher predicts every pool image before the first curriculum (--teacher-pass full): {why}"
        state["notes"].append(note)
        say([note], ws.dist.is_main)
    start = time.perf_counter()
    teacher = open_teacher_pass(ws, teacher_digest, mode, out / "teacher_pass.npz" if resume else None)
    state["teacher_pass"] = mode
    state["teacher_pass_s"] = time.perf_counter() - start  # wall time: cache read and check, predictions
    state["teacher_from_cache"], state["teacher_from_run_file"] = teacher.from_cache, teacher.from_run
    state["teacher_made_before"] = state.get("teacher_predicted_here", 0) if resume else 0  # earlier processes
    _record_teacher(state, teacher)
    if ws.dist.is_main:
        write_run_pass(out / "teacher_pass.npz", teacher)
    state["select_compile_s"] = warm_up_kernels()
    ws.warm()
    return teacher


def _record_teacher(state: dict, teacher: TeacherMemo) -> None:
    """The teacher's figures so far: images predicted (by this run, and all told) and its accuracy
    among them; a lazy pass's accuracy is over the images it reached (easy-first, so not the pool's)."""
    known = teacher.known
    state["teacher_predicted"] = known
    state["pool_size"] = len(teacher.pred)
    state["teacher_predicted_here"] = state.get("teacher_made_before", 0) + teacher.made
    acc = float(teacher.correct_mask().sum() / known * 100) if known else None
    state["teacher_acc"] = acc if teacher.mode == "full" else None
    state["teacher_acc_among_predicted"] = acc
