"""The command line's arguments: every setting's flag derived from its config field (its help, default,
type and choices declared once there), grouped by the config's parts; every flag shows its default (no
heavy imports: `--help` and argument errors answer at once)."""
from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path

from ccfs_fast.runs.config import EvalConfig, RunConfig, TeacherConfig
from ccfs_fast.runs.presets import PRESETS, SMOKE
from ccfs_fast.train.settings import Leaf, default_of, leaves

S = argparse.SUPPRESS  # defaults are filled later: preset (or run directory), then the config's own
PRESET_HELP = f"the paper's settings for a dataset and IPC ({', '.join(PRESETS)}); flags override"
RUN_RECIPE = "training recipe (the paper script's flags; a preset may set them)"
TEACHER_RECIPE = "training recipe (a standard supervised recipe; every flag overrides it)"
# The help group of each part of a config (a config's own fields go to the command's options), the
# settings shown elsewhere than their part's group, and the groups' titles.
PART_GROUPS = {"inputs": "inputs", "selection": "selection", "evaluation": "models", "recipe": "recipe",
               "machine": "machine", "fast": "fast"}
FIELD_GROUPS = {"temperature": "recipe", "filter_model": "models", "filter_acc": "models"}
GROUP_TITLES = {"fast": "GPU fast path (on where it helps: CUDA; the CPU computes plain fp32)"}
SWITCHES = frozenset({"tensorboard", "overwrite", "allow_incomplete"})  # flags that only turn something on


def with_default(text: str, value: object) -> str:
    shown = {True: "on", False: "off", None: "none"}.get(value, value) if isinstance(value, (bool, type(None))) \
        else value
    return f"{text} (default: {shown})"


def default_workers() -> int:
    from beton_builder.base.processes import available_cpus

    return max(1, min(8, available_cpus()))


def batch_size_arg(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size takes 'auto' or an integer, got {value!r}") from None


ARG_TYPES = {"batch_size": batch_size_arg}


def _scalar(annotation: object) -> object:
    """The type a flag parses into: the annotation without None (`Path | None` -> Path)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def flag_arguments(leaf: Leaf, required: bool = False) -> dict:
    """argparse's keywords for one setting: its type or switch, choices, help with its default."""
    kind = _scalar(leaf.type)
    shown, text = leaf.meta("shown"), leaf.meta("help") or leaf.name
    # the field's own words for its default, unless the config's part sets another (a teacher's batch 128)
    default = shown if shown is not MISSING and leaf.default == default_of(leaf.field) else leaf.default
    help_text = text if default is MISSING else with_default(text, default)
    out: dict = {"dest": leaf.name, "default": S, "help": help_text}
    if required:
        out["required"] = True
    if kind is bool:
        out["action"] = "store_true" if leaf.name in SWITCHES else argparse.BooleanOptionalAction
        return out
    out["type"] = ARG_TYPES[leaf.meta("arg_type")] if leaf.meta("arg_type") else kind
    if leaf.meta("choices"):
        out["choices"] = leaf.meta("choices")
    return out


def add_settings(p: argparse.ArgumentParser, config: type, exclude: frozenset[str] = frozenset(),
                 required: frozenset[str] = frozenset(), recipe_title: str = RUN_RECIPE) -> None:
    """The flags of a config's settings, derived from its fields (ccfs_fast.train.settings): one flag per
    setting, in its part's help group, its help and default from the field (the config's own default
    part, e.g. a teacher's recipe, shows its values)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in leaves(config):
        if leaf.name in exclude or not leaf.meta("cli", True):
            continue
        key = FIELD_GROUPS.get(leaf.name, PART_GROUPS.get(leaf.part))
        if key is None:
            target = p
        else:
            if key not in groups:
                groups[key] = p.add_argument_group(recipe_title if key == "recipe" else GROUP_TITLES.get(key, key))
            target = groups[key]
        target.add_argument(*leaf.flags, **flag_arguments(leaf, leaf.name in required))


def add_run(sub: argparse._SubParsersAction, handler: Callable) -> None:
    p = sub.add_parser("run", help="run CCFS: select real images to add to a distilled set",
                       description="The CCFS curriculum (docs/design.md §1 in the repository): teacher pass, then "
                                   "per curriculum a filter trained by KD on distilled ∪ selected, its misclassified "
                                   "pool images (coarse), the easiest of them per class (fine); then the final "
                                   "evaluation.")
    p.add_argument("--preset", default=None, help=PRESET_HELP)
    p.add_argument("--smoke", action="store_true",
                   help="a first run at CPU size: the preset's (or the defaults') algorithm, ipc, alpha and curricula "
                        f"with {', '.join(f'{k} {v}' for k, v in SMOKE.items())}; flags still override (default: off)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir after its last curriculum")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    add_settings(p, RunConfig, required=frozenset({"pool", "test", "distilled", "teacher", "output_dir"}))
    p.set_defaults(handler=handler)


def add_eval(sub: argparse._SubParsersAction, handler: Callable) -> None:
    p = sub.add_parser("eval", help="train and evaluate models on distilled ∪ a saved selection",
                       description="Trains --num-eval models by KD on the distilled images and a selection, as "
                                   "`run`'s final evaluation does. --run-dir RUN takes the selection and every "
                                   "setting from a run's outputs (reproducing its numbers); other flags override its "
                                   "settings, while --pool, --test, --distilled and --teacher then only say where the "
                                   "run's own inputs are now (checked against what it recorded): to evaluate with "
                                   "other inputs, pass them and --selection without --run-dir.")
    p.add_argument("--run-dir", type=Path, default=S,
                   help="a `ccfs-fast run` output directory to reproduce (default: none; then --pool, --test, "
                        "--distilled, --teacher and --selection are needed)")
    p.add_argument("--preset", default=None, help=PRESET_HELP)
    add_settings(p, EvalConfig)
    p.set_defaults(handler=handler)


TEACHER_SKIPS = frozenset({"distilled", "teacher", "teacher_model", "train_data", "eval_batch_size", "cuda_graphs"})


def add_teacher(sub: argparse._SubParsersAction, handler: Callable) -> None:
    p = sub.add_parser("teacher", help="train a teacher on a pool .beton (optionally record forgetting scores)")
    add_settings(p, TeacherConfig, exclude=TEACHER_SKIPS, required=frozenset({"pool", "test", "output"}),
                 recipe_title=TEACHER_RECIPE)
    p.set_defaults(handler=handler)


RELOCATION_HELP = {
    "pool": ("--pool", "the run's pool .beton"), "distilled": ("--distilled", "the run's distilled .beton"),
    "score_path": ("--score-path", "the run's score file"),
}


def add_relocation_args(p: argparse.ArgumentParser, keys: tuple[str, ...] = tuple(RELOCATION_HELP)) -> None:
    """Flags that say where a run's inputs are now, for a run (or its inputs) moved or copied to another
    place; each is checked against the content digest the run recorded."""
    g = p.add_argument_group("the run's inputs, if they moved (default: where the run found them; checked against "
                             "the run's record)")
    for key in keys:
        flag, what = RELOCATION_HELP[key]
        g.add_argument(flag, dest=key, type=Path, default=None, metavar="PATH", help=f"where {what} is now")


def relocated(args: argparse.Namespace) -> dict[str, Path]:
    """The relocation flags given (settings key -> path)."""
    return {k: getattr(args, k) for k in RELOCATION_HELP if getattr(args, k, None) is not None}
