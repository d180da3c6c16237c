"""One curriculum: the filter trained on the current set, the coarse pass, the fine selection, its audit file."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.errors import ModelError
from beton_builder.base.files import write_npz
from ccfs_fast.runs.config import RunConfig
from ccfs_fast.runs.records import PhaseRecord, Shortfall
from ccfs_fast.runs.teacher_pass import TeacherMemo
from ccfs_fast.runs.workspace import Workspace
from ccfs_fast.selection.coarse import PassResult, coarse_pass
from ccfs_fast.selection.kernels import (
    Selection,
    candidate_mask,
    order_key,
    select_per_class,
)
from ccfs_fast.selection.scores import easy_first_key
from ccfs_fast.train.distributed import broadcast
from ccfs_fast.train.loop import last_fifth_epochs
from ccfs_fast.train.students import filter_curve, phase_seed, train_model


@dataclass
class PhaseOutcome:
    record: PhaseRecord
    picked: np.ndarray
    passed: PassResult


def run_phase(ws: Workspace, cfg: RunConfig, phase: int, curpc: int, selected: np.ndarray,
              teacher: TeacherMemo, file_key: np.ndarray | None, rate: float | None = None) -> PhaseOutcome:
    """One curriculum: train a fresh filter on distilled ∪ selected, predict the not-yet-selected
    teacher-correct pool images (lazily, in selection order, when the order key is known; `rate`: the
    previous phase's survivor rate, to size the first chunk; with a lazy teacher pass the teacher
    predicts each image the pass reaches first, the filter only those it classifies correctly), keep
    the coarse candidates, select the fine curpc per class."""
    seed = phase_seed(cfg.machine.seed, phase)
    train_set = np.concatenate([ws.distilled_rows, selected])
    acc_epochs = (last_fifth_epochs(cfg.recipe.epochs) if cfg.filter_acc == "best_last_20"
                  else (lambda e: e == cfg.recipe.epochs - 1))
    filt, trained, batch_size, step_run = train_model(ws, train_set, cfg.filter_model, cfg.recipe,
                                                      cfg.evaluation.temperature, seed, acc_epochs,
                                                      f"phase {phase} filter", curve=filter_curve(phase))
    n = ws.space.n_pool
    is_selected = np.zeros(n, bool)
    is_selected[selected] = True
    lazy_teacher = teacher.mode == "lazy"
    known_key = None if file_key is None else order_key(cfg.selection.select_method, file_key, seed)
    start, teacher_before = time.perf_counter(), (teacher.made, teacher.seconds)
    sel = cfg.selection
    passed = coarse_pass(sel.coarse_pass if known_key is not None else "full",
                         ~is_selected if lazy_teacher else teacher.correct_mask() & ~is_selected, ws.pool_labels,
                         known_key, ws.num_classes, curpc, sel.balance, sel.select_misclassified,
                         lambda indices: ws.predict_pool(filt, indices),
                         first_round_rate(rate, trained.last_acc, sel.select_misclassified),
                         min_chunk=ws.coarse_min_chunk, gate=teacher.correct if lazy_teacher else None)
    eval_s = time.perf_counter() - start
    teacher_ok = teacher.correct_mask()  # lazy: known only where the teacher predicted
    eligible = teacher_ok & ~is_selected
    broken = np.flatnonzero(passed.pred < 0)
    if len(broken):
        raise ModelError(f"the phase {phase} filter gives non-finite logits on {len(broken)} pool images (first: "
                         f"index {passed.index[broken[0]]}): its training diverged; lower --lr or check --normalize")
    start = time.perf_counter()
    full_pred = np.full(n, -1, np.int64)
    full_pred[passed.index] = passed.pred
    candidates = candidate_mask(teacher_ok, is_selected, full_pred, ws.pool_labels, cfg.selection.select_misclassified)
    if known_key is None:  # logits: easy = high true-class logit of this phase's filter
        easy = np.full(n, np.inf)
        easy[passed.index] = easy_first_key(passed.logit, "logits")
        known_key = order_key(cfg.selection.select_method, easy, seed)
    chosen = None
    if ws.dist.is_main:  # selection on rank 0, broadcast to the others
        chosen = select_per_class(candidates, ws.pool_labels, ws.num_classes, known_key, curpc, cfg.selection.balance,
                                  cfg.selection.shortfall, fill_pool=eligible)
    chosen = broadcast(chosen, ws.dist)
    select_s = time.perf_counter() - start
    short = short_classes(chosen, curpc, cfg.selection.balance)
    record = PhaseRecord(
        phase=phase, curpc=curpc, train_size=len(train_set), selected=len(chosen.indices), batch_size=batch_size,
        train_s=trained.seconds, train_loop_s=trained.loop_s, train_eval_s=trained.eval_s,
        train_setup_s=trained.setup_s, train_img_per_s=trained.img_per_s, execution=step_run.record(),
        coarse_pass=passed.mode, pool_eligible=passed.eligible, pool_evaluated=passed.predicted,
        coarse_rounds=passed.rounds, eval_s=eval_s, eval_img_per_s=passed.predicted / eval_s if eval_s else 0.0,
        select_s=select_s, filter_acc=trained.best_acc, filter_acc_rule=cfg.filter_acc,
        filter_last_acc=trained.last_acc, unpredicted_eligible=passed.eligible - passed.predicted,
        teacher_pass=teacher.mode, teacher_predicted=teacher.made - teacher_before[0],
        teacher_s=teacher.seconds - teacher_before[1], teacher_known=teacher.known,
        candidates=int(candidates.sum()), candidates_per_class=chosen.candidates_per_class.tolist(),
        selected_per_class=chosen.selected_per_class.tolist(),
        shortfall=Shortfall(cfg.selection.shortfall, len(short), short, chosen.filled_per_class.tolist(),
                            int(chosen.filled_per_class.sum()), chosen.unmet))
    return PhaseOutcome(record, chosen.indices, passed)


def short_classes(chosen: Selection, curpc: int, balance: bool) -> list[int]:
    """The classes a phase left short of curpc coarse survivors. With balance, each class whose
    candidates (survivors among predicted images) number fewer than curpc; with one global budget a
    class's count matters only when the candidates together could not meet the budget."""
    if not balance and chosen.picked_per_class.sum() >= chosen.budget:
        return []
    return np.flatnonzero(chosen.candidates_per_class < curpc).tolist()


def first_round_rate(previous: float | None, filter_test_acc: float | None, misclassified: bool) -> float | None:
    """The survivor rate a lazy pass plans its first round with: the previous phase's, else (phase 1)
    the filter's own test error (accuracy when correctly classified images are kept), else None."""
    if previous is not None or filter_test_acc is None:
        return previous
    correct = filter_test_acc / 100.0
    return 1.0 - correct if misclassified else correct



def write_audit(path: Path, passed: PassResult, labels: np.ndarray, picked: np.ndarray) -> None:
    """phase{k}_candidates.npz: every predicted image (index, pred, logit, label), how the pass ran
    (pass_mode; per class stop_key / stop_index, the last image the pass reached in key order, and
    exhausted, every image it could reach reached: each eligible one, or under the lazy teacher pass
    each unselected one) and the curriculum's selection (`selected`, in order:
    what --resume checks state.json against)."""
    write_npz(path, index=passed.index, pred=passed.pred, logit=passed.logit, label=labels[passed.index],
              pass_mode=np.array(passed.mode), stop_key=passed.stop_key, stop_index=passed.stop_index,
              exhausted=passed.exhausted, selected=np.asarray(picked, np.int64))
