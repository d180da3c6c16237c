"""The CCFS curriculum (docs/design.md §1): teacher pass, K phases of train-filter / predict candidates /
select, final evaluation; resumable after the last finished phase, every output written atomically."""
from __future__ import annotations

import json
import shutil
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from beton_builder.manifest import recorded_names

from .coarse import PassResult, coarse_pass
from .config import RESUME_FREE, RunConfig
from .curves import CurveLog
from .digests import file_sha256
from .distributed import DistContext, barrier, broadcast, init_distributed
from .errors import ConfigError, ModelError
from .models import check_model_name, stem_warning
from .outputs import (
    LOCK_NAME,
    RunLock,
    environment,
    missing_top,
    output_error,
    prepare_output_dir,
    write_json,
    write_npz,
    write_text,
)
from .reach import reach_text, real_reach
from .report import SMOKE_NOTE, write_report
from .run_inputs import input_record
from .scores import easy_first_key, load_scores, score_kind
from .select import (
    Selection,
    candidate_mask,
    curriculum_arrangement,
    order_key,
    select_per_class,
    warm_up_kernels,
)
from .students import FINAL_CURVE, evaluate_selection, filter_curve, phase_seed, train_model
from .tables import format_table
from .train import last_fifth_epochs
from .workspace import Workspace, open_workspace, teacher_correct

STATE_VERSION = 1


@dataclass
class PhaseOutcome:
    record: dict
    picked: np.ndarray
    passed: PassResult


def run_phase(ws: Workspace, cfg: RunConfig, phase: int, curpc: int, selected: np.ndarray,
              teacher_ok: np.ndarray, file_key: np.ndarray | None, rate: float | None = None) -> PhaseOutcome:
    """One curriculum: train a fresh filter on distilled ∪ selected, predict the not-yet-selected
    teacher-correct pool images (lazily, in selection order, when the order key is known; `rate`: the
    previous phase's survivor rate, to size the first chunk), keep the coarse candidates, select the
    fine curpc per class."""
    seed = phase_seed(cfg.seed, phase)
    train_set = np.concatenate([ws.distilled_rows, selected])
    acc_epochs = (last_fifth_epochs(cfg.recipe.epochs) if cfg.filter_acc == "best_last_20"
                  else (lambda e: e == cfg.recipe.epochs - 1))
    filt, trained, batch_size, step_run = train_model(ws, train_set, cfg.filter_model, cfg.recipe, cfg.temperature,
                                                      seed, acc_epochs, f"phase {phase} filter",
                                                      curve=filter_curve(phase))
    n = ws.space.n_pool
    is_selected = np.zeros(n, bool)
    is_selected[selected] = True
    eligible = teacher_ok & ~is_selected
    known_key = None if file_key is None else order_key(cfg.select_method, file_key, seed)
    start = time.perf_counter()
    passed = coarse_pass(cfg.coarse_pass if known_key is not None else "full", eligible, ws.pool_labels, known_key,
                         ws.num_classes, curpc, cfg.balance, cfg.select_misclassified,
                         lambda indices: ws.predict_pool(filt, indices),
                         first_round_rate(rate, trained.last_acc, cfg.select_misclassified),
                         min_chunk=ws.coarse_min_chunk)
    eval_s = time.perf_counter() - start
    broken = np.flatnonzero(passed.pred < 0)
    if len(broken):
        raise ModelError(f"the phase {phase} filter gives non-finite logits on {len(broken)} pool images (first: "
                         f"index {passed.index[broken[0]]}): its training diverged; lower --lr or check --normalize")
    start = time.perf_counter()
    full_pred = np.full(n, -1, np.int64)
    full_pred[passed.index] = passed.pred
    candidates = candidate_mask(teacher_ok, is_selected, full_pred, ws.pool_labels, cfg.select_misclassified)
    if known_key is None:  # logits: easy = high true-class logit of this phase's filter
        easy = np.full(n, np.inf)
        easy[passed.index] = easy_first_key(passed.logit, "logits")
        known_key = order_key(cfg.select_method, easy, seed)
    chosen = None
    if ws.dist.is_main:  # selection on rank 0, broadcast to the others
        chosen = select_per_class(candidates, ws.pool_labels, ws.num_classes, known_key, curpc, cfg.balance,
                                  cfg.shortfall, fill_pool=eligible)
    chosen = broadcast(chosen, ws.dist)
    select_s = time.perf_counter() - start
    short = short_classes(chosen, curpc, cfg.balance)
    record = {
        "phase": phase, "curpc": curpc, "train_size": len(train_set), "batch_size": batch_size,
        "train_s": trained.seconds, "train_loop_s": trained.loop_s, "train_eval_s": trained.eval_s,
        "train_setup_s": trained.setup_s, "train_img_per_s": trained.img_per_s, "execution": step_run.record(),
        "coarse_pass": passed.mode,
        "pool_eligible": passed.eligible, "pool_evaluated": passed.predicted, "coarse_rounds": passed.rounds,
        "eval_s": eval_s, "eval_img_per_s": passed.predicted / eval_s if eval_s else 0.0, "select_s": select_s,
        "filter_acc": trained.best_acc, "filter_acc_rule": cfg.filter_acc, "filter_last_acc": trained.last_acc,
        "unpredicted_eligible": passed.eligible - passed.predicted,
        "candidates": int(candidates.sum()), "candidates_per_class": chosen.candidates_per_class.tolist(),
        "selected": len(chosen.indices), "selected_per_class": chosen.selected_per_class.tolist(),
        "shortfall": {"policy": cfg.shortfall, "classes_short": len(short), "short_classes": short,
                      "filled_per_class": chosen.filled_per_class.tolist(),
                      "filled": int(chosen.filled_per_class.sum()), "unmet": chosen.unmet},
    }
    return PhaseOutcome(record, chosen.indices, passed)


def say(notes, main: bool) -> None:
    """Prints a run's notes (on rank 0 only)."""
    if main:
        for note in notes:
            print(note, flush=True)


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


def survivor_rate(record: dict) -> float | None:
    """A finished phase's share of predicted images that survived the coarse stage."""
    if not record.get("pool_evaluated"):
        return None
    return min(1.0, record["candidates"] / record["pool_evaluated"])  # state.json of older runs overcounted


def write_audit(path: Path, passed: PassResult, labels: np.ndarray, picked: np.ndarray) -> None:
    """phase{k}_candidates.npz: every predicted image (index, pred, logit, label), how the pass ran
    (pass_mode; per class stop_key / stop_index, the last predicted image in key order, and
    exhausted, every eligible image predicted) and the curriculum's selection (`selected`, in order:
    what --resume checks state.json against)."""
    write_npz(path, index=passed.index, pred=passed.pred, logit=passed.logit, label=labels[passed.index],
              pass_mode=np.array(passed.mode), stop_key=passed.stop_key, stop_index=passed.stop_index,
              exhausted=passed.exhausted, selected=np.asarray(picked, np.int64))


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
    defaults = RunConfig.__dataclass_fields__
    before = {**{k: defaults[k].default for k in set(now) - set(before) if k in defaults}, **before}
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
    if len(phases) > cfg.curriculum_num:
        return f"lists {len(phases)} curricula but the run has {cfg.curriculum_num}"
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
    if state.get("final") is not None and len(phases) != cfg.curriculum_num:
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
            "score": file_sha256(cfg.score_path) if score_kind(cfg.score).from_file else None}


def check_inputs_unchanged(before: dict | None, now: dict, cfg: RunConfig) -> None:
    paths = {"teacher": cfg.teacher, "pool": cfg.pool, "test": cfg.test, "distilled": cfg.distilled,
             "score": cfg.score_path}
    for name, digest in (before or {}).items():
        if now.get(name) != digest:
            raise ConfigError(f"--resume: the {name} file {paths[name]} changed since the run started (sha256 "
                              f"{str(digest)[:12]}... -> {str(now.get(name))[:12]}...); restore it, or start over "
                              "with --overwrite")


def _write_outputs(out: Path, cfg: RunConfig, state: dict) -> None:
    phases = state["phases"]
    totals = {k: float(sum(p[k] for p in phases)) for k in ("train_s", "eval_s", "select_s")}
    totals.update({"teacher_pass_s": state["teacher_pass_s"], "phases_done": len(phases),
                   "selected": len(state["selected"])})
    reach = run_reach(cfg, phases)
    write_json(out / "selected_indices.json", {"ipc": cfg.image_per_class, "alpha": cfg.alpha,
                                               "idx_selected": state["selected"], "phases_done": len(phases),
                                               "complete": len(phases) == cfg.curriculum_num,
                                               "distilled_per_class": cfg.cpc, **reach})
    write_json(out / "metrics.json", {"phases": phases, "totals": totals, "final": state.get("final"),
                                      "fast_path": state.get("fast_path"), "tf32": tf32_switches(),
                                      "world_size": state.get("world_size", 1),
                                      "normalize": state.get("normalize"), "teacher_model": state.get("teacher_model"),
                                      "notes": state.get("notes", []),
                                      "distilled_overlap": state.get("distilled_overlap"),
                                      "dataset": state.get("dataset"), "class_names": state.get("class_names"),
                                      "environment": environment(cfg.device),
                                      "settings": state["settings"]})
    lines = log_settings(state, cfg.device)
    lines += [f"cpc (distilled per class): {cfg.cpc}", f"spc (selected per class): {cfg.spc}",
              f"arrangement: {curriculum_arrangement(cfg.spc, cfg.curriculum_num)}", *state.get("notes", [])]
    for p in phases:
        lines.append(f"phase {p['phase']}/{cfg.curriculum_num}: curpc {p['curpc']}, train set {p['train_size']}, "
                     f"filter acc ({p['filter_acc_rule']}) {_fmt(p['filter_acc'])}%, "
                     f"predicted {p['pool_evaluated']} of "
                     f"{p.get('pool_eligible', p['pool_evaluated'])} eligible ({p.get('coarse_pass', 'full')} pass), "
                     "candidates "
                     f"{p['candidates']}, selected {p['selected']} (filled {p['shortfall']['filled']}, unmet "
                     f"{p['shortfall']['unmet']}), train {p['train_s']:.1f}s eval {p['eval_s']:.1f}s "
                     f"select {p['select_s'] * 1000:.1f}ms")
    final = state.get("final")
    if final and final.get("accs"):
        lines.append(f"Acc@1(mean): {final['acc_mean']:.2f}%, std: {final['acc_std']:.2f} over {len(final['accs'])} "
                     f"evaluations {[round(a, 2) for a in final['accs']]}")
    if phases:
        done = "" if len(phases) == cfg.curriculum_num else f" (after {len(phases)} of {cfg.curriculum_num} curricula)"
        lines.append(f"trained on: {reach_text(reach, cfg.cpc)}{done}")
    if cfg.smoke:
        lines.append(f"note: {SMOKE_NOTE}")
    write_text(out / "exp_log.txt", "\n".join(lines) + "\n")


GPU_ONLY = ("cudnn_benchmark", "fused_optimizer", "cuda_graphs")  # switches that do nothing on a CPU


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


def tf32_switches() -> dict:
    """The TF32 switches in force (PyTorch's defaults, which the paper's code ran with: TF32 cuDNN
    convolutions, full-fp32 matmuls); they act on Ampere and later GPUs only."""
    return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def run_reach(cfg: RunConfig, phases: list[dict]) -> dict:
    """The real images per class the finished curricula reached against the target (reach.real_reach)."""
    per_class = np.sum([p["selected_per_class"] for p in phases], axis=0) if phases else np.zeros(0, np.int64)
    return real_reach(per_class, cfg.spc, sum(p["curpc"] for p in phases),
                      sum(p["shortfall"]["unmet"] for p in phases))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_curriculum(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Runs (or resumes) CCFS into cfg.output_dir; returns the final state dict. Under torchrun every
    rank trains and predicts its share; rank 0 selects and writes every output. A run that fails
    before its first curriculum is recorded leaves no output directory it created behind."""
    dist_ctx, device = init_distributed(cfg.device)
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
    for name in dict.fromkeys((cfg.filter_model, cfg.eval_model)):
        check_model_name(name)
        warning = stem_warning(name, side)
        if warning:
            tqdm.write(warning)


def resume_line(state: dict, cfg: RunConfig) -> str:
    """What a resumed run keeps and what it does next, in one line."""
    done = len(state["phases"])
    kept = "no curriculum" if not done else "curriculum 1" if done == 1 else f"curricula 1-{done}"
    if done < cfg.curriculum_num:
        following = f"continuing with curriculum {done + 1} of {cfg.curriculum_num}"
    elif state.get("final") is None:
        following = "continuing with the final evaluation"
    else:
        following = "the run had finished: rewriting its outputs"
    return f"resuming {cfg.output_dir}: {kept} kept ({len(state['selected'])} images selected); {following}"


def run_curves(out: Path, cfg: RunConfig, state: dict) -> CurveLog:
    """The run's curves (curves.csv, and tb/ with --tensorboard): a resumed run keeps the rows of the
    trainings it keeps (its finished curricula's filters, a finished final evaluation) and drops the
    rest, which it trains again."""
    keep = {filter_curve(p["phase"]) for p in state["phases"]}
    if state.get("final") is not None:
        keep |= {FINAL_CURVE} | {f"{FINAL_CURVE} model {m + 1}" for m in range(cfg.num_eval)}
    return CurveLog(out / "curves.csv", out / "tb", keep, cfg.tensorboard)


def _run(cfg: RunConfig, dist_ctx: DistContext, device: str, resume: bool, overwrite: bool,
         ran_here: bool = True) -> dict:
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
    ws = open_workspace(cfg.pool, cfg.test, cfg.distilled, cfg.teacher, cfg.teacher_model, cfg.cpc, device,
                        cfg.workers, cfg.eval_batch_size, dist_ctx, fast, cfg.normalize, cfg.train_side,
                        cfg.train_data)
    if dist_ctx.is_main:
        _check_models(cfg, ws.side)
        ws.curves = run_curves(out, cfg, state)
    teacher_digest = file_sha256(cfg.teacher)
    digests = input_digests(ws, cfg, teacher_digest)
    if resume and dist_ctx.is_main:
        check_inputs_unchanged(state.get("inputs"), digests, cfg)
    state["inputs"] = digests
    state.update(input_record(cfg.settings(), out))  # where later commands find the inputs from anywhere
    state["fast_path"] = asdict(fast)
    state["notes"] = list(cfg.notes)
    say(cfg.notes, dist_ctx.is_main)
    state["normalize"] = ws.norm.to_json()
    state["teacher_model"] = ws.teacher_arch
    state["distilled_overlap"] = ws.distilled_overlap
    state["dataset"] = ws.dataset
    state["class_names"] = list(ws.space.manifest.class_names)
    state["world_size"] = dist_ctx.world_size
    file_key = None
    if score_kind(cfg.score).from_file:
        said: list[str] = []
        file_key = easy_first_key(load_scores(cfg.score_path, ws.pool_labels, said,
                                              lambda: recorded_names(ws.space.pool.path)), cfg.score)
        state["notes"] += said
        say(said, dist_ctx.is_main)
    elif cfg.coarse_pass == "lazy":
        note = (f"note: --score {cfg.score} ranks candidates by this phase's own predictions, so every eligible "
                "image is predicted (--coarse-pass full)")
        state["notes"].append(note)
        say([note], dist_ctx.is_main)
    arrangement = curriculum_arrangement(cfg.spc, cfg.curriculum_num)
    start = time.perf_counter()
    pred, teacher_ok, _ = teacher_correct(ws, teacher_digest)
    state["teacher_pass_s"] = time.perf_counter() - start
    state["teacher_acc"] = float(teacher_ok.mean() * 100)
    main = dist_ctx.is_main
    if main:
        write_npz(out / "teacher_pass.npz", index=np.arange(ws.space.n_pool), pred=pred)
    state["select_compile_s"] = warm_up_kernels()
    ws.warm()
    selected = np.asarray(state["selected"], np.int64)
    for phase in tqdm(range(len(state["phases"]) + 1, cfg.curriculum_num + 1), desc="curricula",
                      initial=len(state["phases"]), total=cfg.curriculum_num, dynamic_ncols=True, disable=not main):
        rate = survivor_rate(state["phases"][-1]) if state["phases"] else None
        outcome = run_phase(ws, cfg, phase, arrangement[phase - 1], selected, teacher_ok, file_key, rate)
        selected = np.concatenate([selected, outcome.picked])
        state["phases"].append(outcome.record)
        state["selected"] = selected.tolist()
        line = shortfall_line(outcome.record, ws.space.manifest.class_names)
        if main and line:
            tqdm.write(line)
        if main:
            write_audit(out / f"phase{phase}_candidates.npz", outcome.passed, ws.pool_labels, outcome.picked)
            write_json(out / "state.json", state)
            _write_outputs(out, cfg, state)
    if state.get("final") is None:
        state["final"] = evaluate_selection(ws, selected, cfg.eval_model, cfg.recipe, cfg.temperature, cfg.num_eval,
                                            cfg.seed, cfg.fuse_evals, "final evaluation (CCFS selection)")
        if main:
            write_json(out / "state.json", state)
    if main:
        _write_outputs(out, cfg, state)
        write_report(out)
        ws.curves.close()
        print(summary_table(state, reach_text(run_reach(cfg, state["phases"]), cfg.cpc)))
    barrier(dist_ctx)
    return state


def shortfall_line(record: dict, class_names: tuple[str, ...], shown: int = 8) -> str | None:
    """One console line naming the classes of a phase that had fewer candidates than curpc, with
    their counts (candidates / curpc, and what `fill` added); None when no class was short."""
    curpc = record["curpc"]
    cands = record["candidates_per_class"]
    short = record["shortfall"].get("short_classes", [c for c, n in enumerate(cands) if n < curpc])
    if not short:
        return None
    policy = record["shortfall"]["policy"]
    filled = record["shortfall"]["filled_per_class"]
    parts = [f"{class_names[c]!r} {cands[c]}/{curpc}" + (f" +{filled[c]} filled" if filled[c] else "")
             for c in short[:shown]]
    more = f", ... ({len(short) - shown} more)" if len(short) > shown else ""
    unmet = record["shortfall"]["unmet"]
    noun = "class" if len(short) == 1 else "classes"
    return (f"phase {record['phase']}: {len(short)} {noun} short of {curpc} candidates (shortfall {policy}, "
            f"{unmet} images unmet): {', '.join(parts)}{more}")


def summary_table(state: dict, reached: str | None = None) -> str:
    """The per-curriculum table; its last line the final accuracy and, when given, `reached` (what
    the selection holds per class against the target, reach.reach_text)."""
    rows = [(p["phase"], p["curpc"], p["train_size"], p["train_s"],
             f"{p['pool_evaluated']:,} / {p.get('pool_eligible', p['pool_evaluated']):,}", p["eval_s"],
             p["select_s"] * 1000, _fmt(p["filter_acc"]), p["selected"], p["shortfall"]["filled"],
             p["shortfall"]["unmet"]) for p in state["phases"]]
    table = format_table(["phase", "curpc", "train set", "train s", "predicted / eligible", "predict s", "select ms",
                          "filter acc", "selected", "filled", "unmet"], rows)
    final = state.get("final") or {}
    last = []
    if final.get("accs"):
        last.append(f"{_fmt(final['acc_mean'])} ± {_fmt(final['acc_std'])} % top-1 over {len(final['accs'])} runs")
    if reached:
        last.append(f"trained on {reached}" if last else reached)
    text = table + (f"\nfinal: {', '.join(last)}" if last else "")
    if state["settings"].get("smoke"):  # the last line: a smoke run's numbers must not be read as results
        text += f"\nnote: {SMOKE_NOTE}"
    return text
