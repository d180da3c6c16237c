"""The command line's arguments and help texts: every flag shows its default and every choice its
valid values, read from the configs and registries (no heavy imports: `--help` and argument errors
answer at once)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path

from ccfs_fast.data.normalization import NORMALIZE_HELP
from ccfs_fast.runs.config import FILTER_ACC_LOGGING, EvalConfig, RunConfig, TeacherConfig, teacher_recipe
from ccfs_fast.runs.presets import PRESETS, SMOKE
from ccfs_fast.selection.scores import SCORE_KINDS
from ccfs_fast.train.models import MODEL_NAMES_HELP
from ccfs_fast.train.recipe import OPTIMIZERS, SCHEDULERS, WARMUP_METHODS, TrainRecipe

S = argparse.SUPPRESS  # defaults are filled later: preset (or run directory), then the config's own
SCORE_HELP = " | ".join(f"{k.name} ({'high true-class logit' if k.name == 'logits' else k.easy_end} = easy)"
                       for k in SCORE_KINDS.values())
METHOD_HELP = "simple (easiest first) | hard (hardest first) | random (seeded)"
SHORTFALL_HELP = ("fill (top a short class up from its other teacher-correct images) | strict (stop with an error) "
                  "| short (leave it short, as the paper's code)")
PRESET_HELP = f"the paper's settings for a dataset and IPC ({', '.join(PRESETS)}); flags override"


def default_of(config: type, name: str) -> object:
    for f in fields(config):
        if f.name == name:
            return f.default if f.default is not MISSING else f.default_factory()
    raise KeyError(name)


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


def add_recipe_args(p: argparse.ArgumentParser, config: type, base: TrainRecipe, kd: bool = True,
                    title: str = "training recipe (the paper script's flags; a preset may set them)") -> None:
    """The paper script's training flags with `base`'s values as the shown defaults; `kd` adds the KD
    temperature and the pool-evaluation batch."""
    def d(name: str) -> object:
        return getattr(base, name)

    g = p.add_argument_group(title)
    g.add_argument("--epochs", type=int, default=S, help=with_default("epochs of every model", d("epochs")))
    g.add_argument("--opt", default=S, help=with_default(" | ".join(OPTIMIZERS), d("opt")))
    g.add_argument("--lr", type=float, default=S, help=with_default("learning rate", d("lr")))
    g.add_argument("--momentum", type=float, default=S, help=with_default("momentum", d("momentum")))
    g.add_argument("--weight-decay", "--wd", type=float, default=S,
                   help=with_default("weight decay on all parameters", d("weight_decay")))
    g.add_argument("--lr-scheduler", default=S, help=with_default(" | ".join(SCHEDULERS), d("lr_scheduler")))
    g.add_argument("--lr-step-size", type=int, default=S, help=with_default("steplr: epochs a step", d("lr_step_size")))
    g.add_argument("--lr-gamma", type=float, default=S, help=with_default("steplr / exponentiallr factor",
                                                                          d("lr_gamma")))
    g.add_argument("--lr-warmup-epochs", type=int, default=S,
                   help=with_default("warm-up epochs (clamped to epochs - 1 when longer)", d("lr_warmup_epochs")))
    g.add_argument("--lr-warmup-method", default=S, help=with_default(" | ".join(WARMUP_METHODS),
                                                                      d("lr_warmup_method")))
    g.add_argument("--lr-warmup-decay", type=float, default=S, help=with_default("warm-up start factor",
                                                                                 d("lr_warmup_decay")))
    g.add_argument("--batch-size", type=batch_size_arg, default=S,
                   help=with_default("an integer, or auto: the dataset's rule (CIFAR-10 |T| < 500 C -> 32, < 1000 C "
                                     "-> 64, else 128; CIFAR-100 50 C / 100 C; Tiny-ImageNet 64)",
                                     d("batch_size") or "auto"))
    if kd:
        g.add_argument("-T", "--temperature", type=float, default=S,
                       help=with_default("KD temperature", default_of(config, "temperature")))
    r = p.add_argument_group("machine")
    r.add_argument("--device", default=S, help=with_default("cpu | cuda | cuda:N", default_of(config, "device")))
    r.add_argument("--seed", type=int, default=S, help=with_default("seed of every model and draw",
                                                                    default_of(config, "seed")))
    r.add_argument("--workers", type=int, default=S, help=with_default("FFCV reader threads",
                                                                       default_of(config, "workers")))
    if kd:
        r.add_argument("--eval-batch-size", type=int, default=S,
                       help=with_default("batch of pool / test prediction (raise it on a GPU)",
                                         default_of(config, "eval_batch_size")))
    f = p.add_argument_group("GPU fast path (on where it helps: CUDA; the CPU computes plain fp32)")
    f.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=S,
                   help="channels-last memory layout (default: on for CUDA)")
    f.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=S,
                   help="bf16 autocast for teacher and student (default: off; fp32 as the paper's code)")
    f.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=S,
                   help="cuDNN autotuning (default: on for CUDA)")
    f.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=S,
                   help="fused SGD / AdamW kernels (default: on for CUDA)")
    f.add_argument("--compile", action=argparse.BooleanOptionalAction, default=S,
                   help="torch.compile the students (default: off)")
    if kd:
        f.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=S,
                       help="capture the whole KD train step in CUDA graphs (default: on for CUDA)")


def add_data_args(p: argparse.ArgumentParser, config: type, required: bool = True, distilled: bool = True) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--pool", type=Path, required=required, default=S,
                   help="the training pool .beton (ccfs-fast build)")
    g.add_argument("--test", type=Path, required=required, default=S, help="the test .beton")
    if distilled:
        g.add_argument("--distilled", type=Path, required=required, default=S,
                       help="the distilled images .beton (ccfs-fast build folder)")
        g.add_argument("--teacher", type=Path, required=required, default=S, help="teacher checkpoint (.pt / .pth)")
        g.add_argument("--teacher-model", default=S,
                       help=f"the teacher's architecture (default: the arch its checkpoint records, else resnet18): "
                            f"{MODEL_NAMES_HELP}")
    g.add_argument("--train-side", type=int, default=S,
                   help="pools of varying image size (`build imagenet`): the side images are trained at "
                        "(RandomResizedCrop) and evaluated at (centre crop of 7/8 the short side) (default: 224)")
    if distilled:
        g.add_argument("--train-data", default=S, choices=("auto", "resident", "streamed"),
                       help="how a train set is read: resident (once, uint8 on the device) or streamed through "
                            "FFCV's decoders every step; auto: resident when it fits in half the free device memory "
                            "(default: auto)")
    g.add_argument("--normalize", default=S,
                   help=f"{NORMALIZE_HELP} (default: what the teacher checkpoint records, else the paper's constants "
                        "for cifar10 / cifar100 / tiny-imagenet, else the pool's statistics)")


def add_run(sub: argparse._SubParsersAction, handler: Callable) -> None:
    p = sub.add_parser("run", help="run CCFS: select real images to add to a distilled set",
                       description="The CCFS curriculum (docs/design.md §1 in the repository): teacher pass, then "
                                   "per curriculum a filter trained by KD on distilled ∪ selected, its misclassified "
                                   "pool images (coarse), the easiest of them per class (fine); then the final "
                                   "evaluation.")
    add_data_args(p, RunConfig)
    p.add_argument("--output-dir", type=Path, required=True,
                   help="where the run writes everything (required: no default; created with its parents)")
    p.add_argument("--preset", default=None, help=PRESET_HELP)
    p.add_argument("--smoke", action="store_true",
                   help="a first run at CPU size: the preset's (or the defaults') algorithm, ipc, alpha and curricula "
                        f"with {', '.join(f'{k} {v}' for k, v in SMOKE.items())}; flags still override (default: off)")
    c = p.add_argument_group("selection")
    c.add_argument("--image-per-class", type=int, default=S,
                   help=with_default("target images per class (ipc)", default_of(RunConfig, "image_per_class")))
    c.add_argument("--alpha", type=float, default=S, help=with_default(
        "distilled share: floor(ipc x alpha) distilled images per class", default_of(RunConfig, "alpha")))
    c.add_argument("--curriculum-num", type=int, default=S,
                   help=with_default("curricula (phases)", default_of(RunConfig, "curriculum_num")))
    c.add_argument("--select-misclassified", action=argparse.BooleanOptionalAction, default=S,
                   help=with_default("keep the filter's misclassified candidates (else its correct ones)", True))
    c.add_argument("--select-method", default=S, help=with_default(METHOD_HELP, default_of(RunConfig, "select_method")))
    c.add_argument("--balance", action=argparse.BooleanOptionalAction, default=S,
                   help=with_default("curpc per class (else one global budget)", True))
    c.add_argument("--score", default=S, help=with_default(SCORE_HELP, default_of(RunConfig, "score")))
    c.add_argument("--score-path", type=Path, default=S,
                   help="the score file (.npy, or .npz with 'scores') (default: with a preset, its dataset's "
                        "published forgetting file in the repository's scores/; else none: required for forgetting "
                        "and cscore)")
    c.add_argument("--shortfall", default=S,
                   help=with_default(SHORTFALL_HELP, "fill; presets: short"))
    c.add_argument("--coarse-pass", default=S,
                   help=with_default("lazy (predict candidates in selection order, stop a class once full; exact) | "
                                     "full (predict every candidate; --score logits always does)", "lazy"))
    m = p.add_argument_group("models")
    m.add_argument("--filter-model", default=S, help=with_default(MODEL_NAMES_HELP, default_of(RunConfig,
                                                                                                "filter_model")))
    m.add_argument("--eval-model", default=S, help=with_default("model of the final evaluation",
                                                                default_of(RunConfig, "eval_model")))
    m.add_argument("--num-eval", type=int, default=S,
                   help=with_default("final evaluation models", default_of(RunConfig, "num_eval")))
    m.add_argument("--fuse-evals", action=argparse.BooleanOptionalAction, default=S,
                   help=with_default("train the evaluation models as one fused network", True))
    m.add_argument("--filter-acc", default=S, help=with_default(
        f"{' | '.join(FILTER_ACC_LOGGING)}: filter test accuracy after the last epoch, or the best of the last 20%% "
        "(the paper's logging)", default_of(RunConfig, "filter_acc")))
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir after its last curriculum")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    p.add_argument("--tensorboard", action="store_true", default=S,
                   help="per-epoch curves as TensorBoard event files too, under OUTPUT_DIR/tb/ (curves.csv is always "
                        "written); needs pip install 'ccfs-fast[tb]' (default: off)")
    add_recipe_args(p, RunConfig, TrainRecipe())
    p.set_defaults(handler=handler)


def add_eval(sub: argparse._SubParsersAction, handler: Callable) -> None:
    p = sub.add_parser("eval", help="train and evaluate models on distilled ∪ a saved selection",
                       description="Trains --num-eval models by KD on the distilled images and a selection, as "
                                   "`run`'s final evaluation does. --run-dir RUN takes the selection and every "
                                   "setting from a run's outputs (reproducing its numbers); flags override.")
    p.add_argument("--run-dir", type=Path, default=S,
                   help="a `ccfs-fast run` output directory to reproduce (default: none; then --pool, --test, "
                        "--distilled, --teacher and --selection are needed)")
    add_data_args(p, EvalConfig, required=False)
    p.add_argument("--selection", type=Path, default=S,
                   help="selected_indices.json, this tool's or the paper's (default with --run-dir: the run's)")
    p.add_argument("--train-set", type=Path, default=S,
                   help="train on every image of this .beton in its order instead of distilled ∪ a selection: an "
                        "exported set (`ccfs-fast export`); with --run-dir, the run's final evaluation repeated on it "
                        "(default: none)")
    p.add_argument("--preset", default=None, help=PRESET_HELP)
    p.add_argument("--image-per-class", type=int, default=S, help="default: the selection file's ipc")
    p.add_argument("--alpha", type=float, default=S, help="default: the selection file's alpha")
    p.add_argument("--num-eval", type=int, default=S, help=with_default("models", default_of(EvalConfig, "num_eval")))
    p.add_argument("--fuse-evals", action=argparse.BooleanOptionalAction, default=S,
                   help=with_default("train the models as one fused network", True))
    p.add_argument("--eval-model", default=S, help=with_default(MODEL_NAMES_HELP, default_of(EvalConfig,
                                                                                              "eval_model")))
    p.add_argument("--allow-incomplete", action="store_true", default=S,
                   help="evaluate a selection whose run did not finish (refused otherwise)")
    p.add_argument("--output", type=Path, default=S,
                   help="write the results as JSON here (default: eval.json beside the selection file, i.e. in "
                        "--run-dir)")
    add_recipe_args(p, EvalConfig, TrainRecipe())
    p.set_defaults(handler=handler)


def add_teacher(sub: argparse._SubParsersAction, handler: Callable) -> None:
    p = sub.add_parser("teacher", help="train a teacher on a pool .beton (optionally record forgetting scores)")
    add_data_args(p, TeacherConfig, distilled=False)
    p.add_argument("--model", default=S, help=with_default(MODEL_NAMES_HELP, default_of(TeacherConfig, "model")))
    p.add_argument("--output", type=Path, required=True, help="checkpoint FILE.pt (records arch and normalisation)")
    p.add_argument("--forgetting-out", type=Path, default=S, help="write forgetting scores (.npy) here")
    p.add_argument("--label-smoothing", type=float, default=S,
                   help=with_default("cross-entropy label smoothing", default_of(TeacherConfig, "label_smoothing")))
    p.add_argument("--overwrite", action="store_true", default=S, help="replace existing output files")
    p.add_argument("--tensorboard", action="store_true", default=S,
                   help="per-epoch curves as TensorBoard event files too, in OUTPUT.tb/ (teacher.pt: teacher.tb/; the "
                        "curves CSV, teacher.curves.csv, is always written); needs pip install 'ccfs-fast[tb]' "
                        "(default: off)")
    add_recipe_args(p, TeacherConfig, teacher_recipe(), kd=False,
                    title="training recipe (a standard supervised recipe; every flag overrides it)")
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
