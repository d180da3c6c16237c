"""`ccfs-fast eval`: train num_eval models on distilled ∪ a saved selection (this tool's or the
paper's selected_indices.json) with the same recipe and seeds as `run`'s final evaluation."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from beton_builder.base.errors import ConfigError
from beton_builder.base.files import ensure_writable, write_json
from beton_builder.base.tables import format_table
from ccfs_fast.runs.config import EvalConfig
from ccfs_fast.runs.protocol import ddranking_scores, protocol_row, protocol_table, random_draw
from ccfs_fast.runs.workspace import open_workspace
from ccfs_fast.selection.reach import reach_text, real_reach
from ccfs_fast.train.distributed import init_distributed
from ccfs_fast.train.models import canonical_model_name
from ccfs_fast.train.students import evaluate_selection, evaluate_train_set


def read_selection(cfg: EvalConfig) -> tuple[np.ndarray, int, float]:
    """(selected pool indices, ipc, alpha) from the selection file, flags overriding its ipc/alpha."""
    try:
        data = json.loads(cfg.selection_file.read_text())
        selected = np.asarray(data["idx_selected"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{cfg.selection_file}: not a selected_indices.json with 'idx_selected' ({exc})") from exc
    ipc = cfg.image_per_class if cfg.image_per_class is not None else data.get("ipc")
    alpha = cfg.alpha if cfg.alpha is not None else data.get("alpha")
    if ipc is None or alpha is None:
        raise ConfigError(f"{cfg.selection_file} has no 'ipc'/'alpha'; pass --image-per-class and --alpha")
    if len(np.unique(selected)) != len(selected):
        raise ConfigError(f"{cfg.selection_file}: idx_selected holds duplicate indices")
    if data.get("complete") is False and not cfg.allow_incomplete:
        raise ConfigError(f"{cfg.selection_file} is an unfinished run's selection ({data.get('phases_done', '?')} "
                          f"curricula done, {len(selected)} images for ipc {ipc}); finish it with `ccfs-fast run "
                          "--resume` or pass --allow-incomplete to evaluate it as it is")
    return selected, int(ipc), float(alpha)


def run_accuracies(run_dir, result: dict) -> list[float] | None:
    """The final evaluation accuracies a run recorded (metrics.json) when they are comparable with
    `result` (the same architecture and label regime), else None (None too without a run)."""
    if run_dir is None:
        return None
    try:
        final = json.loads((run_dir / "metrics.json").read_text()).get("final") or {}
    except (OSError, ValueError):
        return None
    if final.get("labels", "teacher") != result.get("labels") or \
            final.get("eval_model", result.get("eval_model")) != result.get("eval_model"):
        return None
    return list(final.get("accs") or [])


def evaluate_train_set_file(cfg: EvalConfig) -> dict:
    """`eval --train-set`: num_eval models trained on every image of cfg.train_set in its order (an
    exported set), with the run's recipe and seeds: a complete run's export gives its final accuracies."""
    if cfg.output is not None:
        ensure_writable(cfg.output, "--output")
    dist_ctx, device = init_distributed(cfg.machine.device)
    fast = cfg.fast.resolve(device)
    torch.backends.cudnn.benchmark = bool(fast.cudnn_benchmark)
    ws = open_workspace(replace(cfg.inputs, distilled=cfg.train_set), 0, replace(cfg.machine, device=device),
                        dist_ctx, fast, check_overlap=False)
    train_set = ws.space.distilled_indices()
    ev = cfg.evaluation
    results = [evaluate_train_set(ws, train_set, arch, cfg.recipe, ev.temperature, ev.num_eval, cfg.machine.seed,
                                  ev.fuse_evals, f"evaluation of {cfg.train_set.name} ({arch})", ev.labels)
               for arch in cfg.eval_models]
    result = results[0]
    result["protocol"] = {"labels": ev.labels, "baseline": "none",
                          "rows": [protocol_row(arch, ev.labels, one, None, None)
                                   for arch, one in zip(cfg.eval_models, results)]}
    per_class = np.bincount(ws.space.distilled_labels(ws.workers), minlength=ws.num_classes)
    result.update({"train_set": str(cfg.train_set), "images_per_class_min": int(per_class.min()),
                   "images_per_class_max": int(per_class.max()), "normalize": ws.norm.to_json(),
                   "teacher_model": ws.teacher_arch, "notes": list(cfg.notes)})
    if dist_ctx.is_main:
        _print_result(cfg, result)
    return result


def _print_result(cfg: EvalConfig, result: dict) -> None:
    if cfg.output is not None:
        write_json(cfg.output, result)
    before = run_accuracies(cfg.run_dir, result)
    rows = [(i + 1, b, last, s) + ((before[i] if i < len(before) else "-",) if before is not None else ())
            for i, (b, last, s) in enumerate(zip(result["accs"], result["last_accs"], result["seconds"]))]
    print(format_table(["run", "best acc", "last acc", "seconds"] + (["the run's best acc"] if before is not None
                                                                      else []), rows))
    if result["accs"]:
        line = f"Acc@1(mean): {result['acc_mean']:.2f}%, std: {result['acc_std']:.2f}"
        if before:
            line += f" (the run's: {np.mean(before):.2f}%, std {np.std(before):.2f})"
        print(line)
    if cfg.output is not None:
        print(f"written: {cfg.output}")


def evaluate_selection_file(cfg: EvalConfig) -> dict:
    if cfg.train_set is not None:
        return evaluate_train_set_file(cfg)
    selected, ipc, alpha = read_selection(cfg)
    if cfg.output is not None:
        ensure_writable(cfg.output, "--output")
    cpc = int(ipc * alpha + 1e-9)
    if cpc < 1:
        raise ConfigError(f"ipc x alpha = {ipc} x {alpha} gives no distilled image per class")
    dist_ctx, device = init_distributed(cfg.machine.device)
    if dist_ctx.is_main:
        for note in cfg.notes:
            print(note, flush=True)
    fast = cfg.fast.resolve(device)
    torch.backends.cudnn.benchmark = bool(fast.cudnn_benchmark)
    ws = open_workspace(cfg.inputs, cpc, replace(cfg.machine, device=device), dist_ctx, fast)
    if len(selected) and (selected.min() < 0 or selected.max() >= ws.space.n_pool):
        raise ConfigError(f"{cfg.selection_file}: indices must lie in [0, {ws.space.n_pool}) for this pool, got "
                          f"[{selected.min()}, {selected.max()}]")
    real_per_class = np.bincount(ws.pool_labels[selected], minlength=ws.num_classes)
    result = run_protocol(cfg, ws, selected, real_per_class)
    per_class = real_per_class + cpc
    reach = real_reach(real_per_class, ipc - cpc)
    result.update({"selection": str(cfg.selection_file), "ipc": ipc, "alpha": alpha, "selected": len(selected),
                   "images_per_class": per_class.tolist(), "images_per_class_min": int(per_class.min()),
                   "images_per_class_max": int(per_class.max()), "distilled_per_class": cpc, **reach,
                   "distilled_overlap": ws.distilled_overlap,
                   "normalize": ws.norm.to_json(), "teacher_model": ws.teacher_arch, "notes": list(cfg.notes)})
    if not dist_ctx.is_main:
        return result
    _print_result(cfg, result)
    print(f"trained on: {reach_text(reach, cpc)}")
    print_protocol(result["protocol"])
    return result


def run_protocol(cfg: EvalConfig, ws, selected: np.ndarray, real_per_class: np.ndarray) -> dict:
    """The evaluation protocol: for each --eval-model architecture, the set (distilled ∪ selected) under
    --labels; with --baseline random, the same distilled part plus a uniform draw of as many real images
    per class (the draw written as random_indices.json in the selection file's format); where the full
    data's hard-label accuracy is known (--full-data-acc, or the teacher's for its own architecture),
    the set under hard labels too and DD-Ranking's scores. Returns the first architecture's set result
    (eval.json's top level, as before) with `protocol`: every row, the draw and the regime."""
    ev, seed = cfg.evaluation, cfg.machine.seed
    draw = None
    if cfg.baseline == "random":
        draw_seed = seed if cfg.baseline_seed is None else cfg.baseline_seed
        draw = random_draw(ws.pool_labels, real_per_class, draw_seed)
        path = (cfg.output or cfg.selection_file).parent / "random_indices.json"
        if ws.dist.is_main:
            write_json(path, {"ipc": int(real_per_class.max(initial=0)) + ws.distilled_rows.size // ws.num_classes,
                              "alpha": None, "idx_selected": draw.tolist(), "method": "random", "seed": draw_seed,
                              "per_class": real_per_class.tolist(), "selection": str(cfg.selection_file)})
        draw = (draw, draw_seed, str(path))
    fulls = cfg.full_data_accs
    rows, first = [], None

    def train(arch: str, picked: np.ndarray, labels: str, what: str) -> dict:
        return evaluate_selection(ws, picked, arch, cfg.recipe, ev.temperature, ev.num_eval, seed, ev.fuse_evals,
                                  f"{what} ({arch}, {labels} labels)", labels)

    for k, arch in enumerate(cfg.eval_models):
        ccfs = train(arch, selected, ev.labels, "CCFS selection")
        first = first or ccfs
        random = train(arch, draw[0], ev.labels, "random baseline") if draw is not None else None
        full = fulls[k] if fulls else (ws.teacher_test_acc if canonical_model_name(arch) ==
                                       canonical_model_name(ws.teacher_arch) else None)
        scores = None
        if random is not None and full is not None:
            hard = ccfs if ev.labels == "hard" else train(arch, selected, "hard", "CCFS selection")
            scores = ddranking_scores(ccfs["accs"], random["accs"], hard["accs"], full)
            scores["full_data_acc_source"] = "--full-data-acc" if fulls else f"the teacher checkpoint ({arch})"
        rows.append(protocol_row(arch, ev.labels, ccfs, random, scores))
    first["protocol"] = {"labels": ev.labels, "rows": rows, "baseline": cfg.baseline,
                         **({"random_seed": draw[1], "random_indices": draw[2]} if draw is not None else {})}
    return first


def print_protocol(protocol: dict) -> None:
    """The result table, last: CCFS and random per architecture, their difference, DD-Ranking's scores."""
    header, rows = protocol_table(protocol["rows"])
    print(format_table(header, rows))
