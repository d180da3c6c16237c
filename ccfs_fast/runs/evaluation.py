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
from ccfs_fast.data.readers import read_labels
from ccfs_fast.runs.config import EvalConfig
from ccfs_fast.runs.workspace import open_workspace
from ccfs_fast.selection.reach import reach_text, real_reach
from ccfs_fast.train.distributed import init_distributed
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


def run_accuracies(run_dir) -> list[float] | None:
    """The final evaluation accuracies a run recorded (metrics.json), or None without a run."""
    if run_dir is None:
        return None
    try:
        final = json.loads((run_dir / "metrics.json").read_text()).get("final") or {}
    except (OSError, ValueError):
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
    result = evaluate_train_set(ws, train_set, ev.eval_model, cfg.recipe, ev.temperature, ev.num_eval, cfg.machine.seed,
                                ev.fuse_evals, f"evaluation of {cfg.train_set.name}")
    per_class = np.bincount(read_labels(ws.space.distilled), minlength=ws.num_classes)
    result.update({"train_set": str(cfg.train_set), "images_per_class_min": int(per_class.min()),
                   "images_per_class_max": int(per_class.max()), "normalize": ws.norm.to_json(),
                   "teacher_model": ws.teacher_arch, "notes": list(cfg.notes)})
    if dist_ctx.is_main:
        _print_result(cfg, result)
    return result


def _print_result(cfg: EvalConfig, result: dict) -> None:
    if cfg.output is not None:
        write_json(cfg.output, result)
    before = run_accuracies(cfg.run_dir)
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
    ev = cfg.evaluation
    result = evaluate_selection(ws, selected, ev.eval_model, cfg.recipe, ev.temperature, ev.num_eval, cfg.machine.seed,
                                ev.fuse_evals)
    real_per_class = np.bincount(ws.pool_labels[selected], minlength=ws.num_classes)
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
    return result
