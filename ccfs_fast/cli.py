"""ccfs-fast: Curriculum Coarse-to-Fine Selection (CCFS, CVPR 2025) for high-IPC dataset distillation.

It adds real images to a distilled set in curricula: each trains a filter on the current set by
knowledge distillation from a teacher, keeps the pool images the filter misclassifies and takes the
easiest per class by a difficulty score. Datasets are converted once to FFCV .beton files.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli_args import (  # noqa: F401
    add_eval,
    add_recipe_args,
    add_relocation_args,
    add_run,
    add_teacher,
    default_workers,
    relocated,
)
from .errors import CCFSError, ConfigError, OutputError

EPILOG = """a whole run, step by step (README: "Run CCFS on CIFAR-10 / CIFAR-100 / Tiny-ImageNet"):
  ccfs-fast build cifar10 --src cifar-10-python.tar.gz --out data/
  ccfs-fast build folder --src cda_cifar10_ipc500/ --out data/distilled.beton
  ccfs-fast run --preset cifar10-ipc500 --pool data/cifar10_train.beton --test data/cifar10_test.beton \\
      --distilled data/distilled.beton --teacher teacher.pt --device cuda --output-dir runs/cifar10-ipc500
  ccfs-fast eval --run-dir runs/cifar10-ipc500          # reproduce the run's final evaluation
  ccfs-fast report runs/cifar10-ipc500                  # metrics.csv, report.png, selection.png
  ccfs-fast export runs/cifar10-ipc500 --out set/       # the final set as an image folder and a .beton

The preset uses the published scores in the repository's scores/ folder; --smoke --device cpu makes a
first run CPU-sized and fits it to the inputs at hand. `ccfs-fast COMMAND --help` lists every flag with
its default; `ccfs-fast demo` runs it all on real digits in a few minutes."""

Runner = Callable[[], None]


def _add_build(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser("build", help="convert a dataset to .beton files (+ manifests), once")
    kinds = build.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in ("cifar10", "cifar100", "tiny-imagenet"):
        p = kinds.add_parser(kind, help=f"{kind}: writes {kind}_train.beton and {kind}_test.beton")
        p.add_argument("--src", type=Path, required=True, help="the dataset folder or its downloaded archive")
        p.add_argument("--out", type=Path, required=True, help="output folder")
    folder = kinds.add_parser("folder", help="an image folder (one sub-folder per class), e.g. distilled images")
    folder.add_argument("--src", type=Path, required=True, help="the folder (ImageFolder layout)")
    folder.add_argument("--out", type=Path, required=True, help="FILE.beton")
    folder.add_argument("--per-class", type=int, default=None,
                        help="keep the first K sorted files per class (default: all)")
    folder.add_argument("--side", type=int, default=None,
                        help="resize every image to SIDE x SIDE (default: keep; all must share one square size)")
    folder.add_argument("--class-order", choices=("sorted", "numeric"), default=None,
                        help="label order of the class folders: sorted (torchvision's and the paper's) or numeric; "
                             "required when integer folder names sort otherwise (0, 1, 10, 2, ...) (default: sorted)")
    imagenet = kinds.add_parser("imagenet", help="ILSVRC-2012 train + val folders: writes imagenet_train.beton and "
                                "imagenet_test.beton (JPEG, images of varying size; resumes after an interruption)")
    imagenet.add_argument("--src", type=Path, required=True,
                          help="ROOT holding train/<wnid>/*.JPEG and val/ (wnid folders, or flat with "
                               "LOC_val_solution.csv or the devkit ILSVRC2012_devkit_t12/)")
    imagenet.add_argument("--out", type=Path, required=True, help="output folder")
    _add_jpeg_flags(imagenet)
    arrays = kinds.add_parser("arrays", help="an .npz with x uint8 [n,h,w,3] and y int [n]")
    arrays.add_argument("--src", type=Path, required=True, help="FILE.npz")
    arrays.add_argument("--out", type=Path, required=True, help="FILE.beton")
    _add_tensors(kinds)
    _add_parquet(kinds)
    for name in ("folder", "parquet"):
        _add_jpeg_flags(kinds.choices[name])
    for p in kinds.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
        p.add_argument("--workers", type=int, default=default_workers(),
                       help=f"decoding / writing processes (default: {default_workers()})")
    build.set_defaults(handler=_run_build)


def _add_jpeg_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-side", type=int, default=None,
                   help="images stored as JPEG (of varying size): shrink those whose longer side exceeds this many "
                        "pixels (default: 500, as FFCV's ImageNet example)")
    p.add_argument("--jpeg-quality", type=int, default=None, help="JPEG quality 1-100 (default: 90)")


def _add_tensors(kinds: argparse._SubParsersAction) -> None:
    from beton_builder.tensors import NORMALIZATIONS

    p = kinds.add_parser("tensors", help="a distilled set saved with torch.save (MTT / FTD / TESLA / DATM / "
                         "DD-Ranking: images_best.pt, labels_best.pt)")
    p.add_argument("--images", dest="src", type=Path, required=True,
                   help="float images [N, 3, H, W] (or a dict / tuple holding images and labels)")
    p.add_argument("--labels", type=Path, default=None,
                   help="labels [N] (integers) or [N, C] (soft labels: their argmax) (default: in --images)")
    p.add_argument("--out", type=Path, required=True, help="FILE.beton")
    p.add_argument("--normalized-with", required=True, choices=list(NORMALIZATIONS),
                   help="the mean / std the images were normalised with, as the distillation code's get_dataset "
                        "has them (cifar100: 0.5071/0.2673..., tiny-imagenet and imagenet: ImageNet's); none: "
                        "pixels in [0, 1]. ZCA-whitened sets cannot be undone")
    p.add_argument("--classes", type=int, default=None,
                   help="the class count (default: the largest label + 1, or the soft labels' width)")


def _add_parquet(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("parquet", help="Hugging Face Hub parquet shards (an image column and a label column)")
    p.add_argument("--src", type=Path, nargs="+", required=True,
                   help="a folder of shards (data/train-*.parquet) or the shard files, in order")
    p.add_argument("--out", type=Path, required=True, help="FILE.beton")
    p.add_argument("--image-column", default="image", help="(default: image)")
    p.add_argument("--label-column", default=None,
                   help="(default: the ClassLabel column, else label, labels, fine_label, class_id, ...)")
    p.add_argument("--split", default=None,
                   help="the split's shards when the folder holds several, e.g. test (default: train)")
    p.add_argument("--class-order", choices=("sorted", "numeric"), default=None,
                   help="labels given as class-name strings: their label order (default: sorted)")


def _run_build(args: argparse.Namespace) -> Runner:
    sources = args.src if isinstance(args.src, list) else [args.src]
    args.src = sources[0]
    missing = next((src for src in sources if not src.exists()), None)
    if missing is not None:  # before the heavy imports
        from beton_builder.cifar import CIFAR_LAYOUTS, expected_layout

        from .errors import BuildError

        hint = (expected_layout(CIFAR_LAYOUTS[args.kind]) if args.kind in CIFAR_LAYOUTS
                else "pass the dataset's folder or its downloaded archive")
        flag = "--images" if args.kind == "tensors" else "--src"
        raise BuildError(f"{flag} {missing}: no such file or folder; {hint}")
    from .outputs import BUILD_HOLDER, build_lock, probe_lock

    for single in (True, False):  # a build writing this output already: refused before the heavy imports
        probe_lock(args.out, build_lock(args.out, single), BUILD_HOLDER)
    from beton_builder.build import BuildConfig, build

    from .tables import format_table

    own = {k: v for k, v in vars(args).items() if k in BuildConfig.__dataclass_fields__ and k not in ("src",)}
    config = BuildConfig(src=args.src, sources=tuple(sources[1:]), **own)

    def run() -> None:
        results = build(config)
        rows = [(str(path), m.n, m.num_classes, f"<= {m.side}" if m.variable_size else f"{m.side}x{m.side}", seconds)
                for path, m, seconds in results]
        print(format_table(["file", "images", "classes", "side", "seconds"], rows))
    return run


def _split_args(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "command", "threads", "version", *drop)}


def _run_run(args: argparse.Namespace) -> Runner:
    from .config import make_run_config
    from .outputs import output_dir_problem, probe_lock

    # refusals that need no data come first, before any input is read or anything heavy imported
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite starts it over; pass one of them")
    problem = output_dir_problem(args.output_dir, args.resume, args.overwrite)
    if problem:
        raise ConfigError(problem)
    probe_lock(args.output_dir)
    cfg = make_run_config(args.preset, args.smoke, **_split_args(args, ("resume", "overwrite", "preset", "smoke")))

    def run() -> None:
        from .curriculum import run_curriculum

        run_curriculum(cfg, resume=args.resume, overwrite=args.overwrite)
    return run


# A run's settings that `eval --run-dir` reuses (its selection comes from the run's selected_indices.json).
RUN_DIR_KEYS = ("pool", "test", "distilled", "teacher", "teacher_model", "normalize", "image_per_class", "alpha",
                "temperature", "num_eval", "fuse_evals", "eval_model", "device", "seed", "workers", "eval_batch_size",
                "train_side", "train_data")


def run_dir_settings(run_dir: Path, given: dict[str, Path] | None = None, train_set: bool = False) -> dict:
    """EvalConfig values from a run directory: its settings (state.json), its selection file, and its
    inputs as run_inputs finds and checks them (`given`: --pool, --test, --distilled, --teacher, where
    the user says one is now; `train_set`: an exported set takes the distilled set's place)."""
    from .config import FAST_KEYS, RECIPE_KEYS
    from .run_inputs import read_run_json, resolve_run_inputs

    state = read_run_json(run_dir, "state.json")
    settings = state.get("settings")
    if not isinstance(settings, dict):
        raise ConfigError(f"--run-dir {run_dir}: its state.json holds no settings; pass the --output-dir of a "
                          "`ccfs-fast run`")
    keep = set(RUN_DIR_KEYS) | RECIPE_KEYS | FAST_KEYS
    values = {k: v for k, v in settings.items() if k in keep and v is not None}
    needed = ("pool", "test", "teacher") + (() if train_set else ("distilled",))
    given = {k: v for k, v in (given or {}).items() if k in needed}
    values.update(resolve_run_inputs(state, run_dir, needed, given).paths)
    values["selection"] = run_dir / "selected_indices.json"
    return values


def _run_eval(args: argparse.Namespace) -> Runner:
    from .config import EvalConfig, preset_settings, split_recipe

    explicit = _split_args(args, ("run_dir",))
    base = run_dir_settings(args.run_dir, explicit, "train_set" in explicit) if "run_dir" in args else {}
    if "train_set" in explicit:  # an exported set is the whole train set: no distilled set, no selection
        base = {k: v for k, v in base.items() if k not in ("distilled", "selection")}
        explicit.update(distilled=explicit["train_set"], selection=None)
    recipe, rest = split_recipe({**base, **preset_settings(args.preset, EvalConfig), **explicit})
    missing = [f"--{k}" for k in ("pool", "test", "distilled", "teacher", "selection") if k not in rest]
    if missing:
        raise ConfigError(f"eval needs {', '.join(missing)} (or --run-dir RUN to take them from a run)")
    if "output" not in rest:  # beside the selection (the run's); beside an exported set, never over the run's
        rest["output"] = (Path(rest["train_set"]).with_suffix(".eval.json") if rest.get("train_set") is not None
                          else Path(rest["selection"]).parent / "eval.json")
    if "run_dir" in args:
        rest["run_dir"] = args.run_dir
    cfg = EvalConfig(recipe=recipe, **rest)

    def run() -> None:
        from .evaluation import evaluate_selection_file

        evaluate_selection_file(cfg)
    return run


def _run_teacher(args: argparse.Namespace) -> Runner:
    from .config import TeacherConfig, split_recipe, teacher_recipe

    recipe, rest = split_recipe(_split_args(args), teacher_recipe())
    cfg = TeacherConfig(recipe=recipe, **rest)

    def run() -> None:
        from .teacher import train_teacher

        train_teacher(cfg)
    return run


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on scikit-learn's real digits, end to end (minutes)")
    p.add_argument("--output-dir", type=Path, default=Path("demo_out"), help="(default: demo_out)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo (default: refuse)")
    p.add_argument("--epochs", type=int, default=15, help="filter / evaluation epochs (default: 15)")
    p.add_argument("--teacher-epochs", type=int, default=15,
                   help="epochs of the demo's teacher, trained on the digits pool with labels (default: 15)")
    p.add_argument("--num-eval", type=int, default=3, help="evaluation models per method (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> Runner:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(output_dir=args.output_dir, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                     num_eval=args.num_eval, seed=args.seed, overwrite=args.overwrite,
                     workers=min(2, default_workers()))
    return lambda: run_demo(cfg)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild metrics.csv, report.png and selection.png of a run directory")
    p.add_argument("run_dir", type=Path, help="a `ccfs-fast run` output directory")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="selection.png: the classes to show, by name or label (default: the first 10)")
    add_relocation_args(p)
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> Runner:
    if not (args.run_dir / "metrics.json").is_file():
        raise ConfigError(f"{args.run_dir} has no metrics.json; pass the --output-dir of a `ccfs-fast run`")

    def run() -> None:
        from .report import write_report

        for path in write_report(args.run_dir, args.classes, relocated(args)):
            print(path)
    return run


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .config import EXPORT_FORMATS

    p = sub.add_parser("export", help="a run's final set (distilled + selected) as an image folder and a .beton",
                       description="Writes the run's final synthetic set, the distilled images it used and then the "
                                   "real images it selected, as an image folder (one sub-folder per class; PNG, or "
                                   "the stored JPEG bytes of a JPEG pool), a .beton in the run's order "
                                   "(ccfs_set.beton, for `run`, `eval --train-set` and FFCV) and manifest.csv (file, "
                                   "label, class, source, pool index, curriculum, score).")
    p.add_argument("run_dir", type=Path, help="a `ccfs-fast run` output directory")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (created; refused if it exists)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="both", help="(default: both)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="export an unfinished run's set as it is (refused otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"writing processes (default: {default_workers()})")
    add_relocation_args(p)
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> Runner:
    from .config import ExportConfig

    cfg = ExportConfig(args.run_dir, args.out, args.format, args.allow_incomplete, args.overwrite, args.workers,
                       tuple(relocated(args).items()))

    def run() -> None:
        from .set_export import export_run

        export_run(cfg)
    return run


BENCHMARKS: dict[str, tuple[str, str]] = {
    # name: (module, what it measures)
    "loader": ("benchmarks.loader_throughput", "train-loader images/s against the paper's input paths"),
    "select": ("benchmarks.select_kernel", "one phase's selection: numba kernels against sets + sorted"),
    "phase": ("benchmarks.curriculum_wallclock", "wall-clock per curriculum against the paper's approach"),
    "train": ("benchmarks.train_throughput", "KD training images/s: eager, CUDA graphs, fused bank"),
    "imagenet-scale": ("benchmarks.imagenet_scale", "ImageNet-1K's 1,281,167-image pool: build, teacher pass, "
                       "one curriculum, memory; against the paper's approach"),
}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    listing = "\n".join(f"  {name:16s}{what}" for name, (_, what) in BENCHMARKS.items())
    bench = sub.add_parser("bench", help=f"run a benchmark: {' | '.join(BENCHMARKS)}",
                           description=f"benchmarks (each prints a table; --json FILE writes the rows):\n{listing}\n\n"
                                       "`ccfs-fast bench NAME --help` lists a benchmark's own flags.",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help=" | ".join(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> Runner:
    import importlib

    module = BENCHMARKS[args.name][0]
    return lambda: importlib.import_module(module).main(list(args.rest))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccfs-fast", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true",
                        help="print the versions of ccfs-fast, torch, torchvision, ffcv, numba, numpy and CUDA")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / numba CPU threads (default: the cores, shared by torchrun's ranks)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    add_teacher(sub, _run_teacher)
    add_run(sub, _run_run)
    add_eval(sub, _run_eval)
    _add_report(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def process_settings(threads: int | None) -> None:
    """Process-wide settings, once: SIGTERM handled as Ctrl-C is, forked workers that die with this
    process, freed memory reused by the allocator, and the thread counts."""
    from .processes import children_die_with_parent, handle_sigterm, reuse_freed_memory

    handle_sigterm()
    children_die_with_parent()
    reuse_freed_memory()
    _set_threads(threads)


def _set_threads(threads: int | None) -> None:
    from .processes import configure_threads

    configure_threads(threads)


def versions() -> str:
    """`ccfs-fast --version`: the package and the versions of what it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"ccfs-fast {__import__('ccfs_fast').__version__}"]
    for dist in ("torch", "torchvision", "ffcv", "numba", "numpy"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    import torch

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA build"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device visible"
    return ", ".join(parts) + f"; {cuda}, {device}; Python {sys.version.split()[0]}"


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues an interrupted `run`: the same arguments with --resume (and without
    --overwrite, which would start over)."""
    import shlex

    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["ccfs-fast", *kept, "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    if argv is None:
        argv = sys.argv[1:]
    if not argv:  # no command: say what there is
        parser.print_help()
        return 0
    if "--version" in argv:
        print(versions())
        return 0
    if list(argv[:1]) == ["bench"] and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        parser.parse_args(["bench", "--help"])  # lists the benchmarks and exits 0
    args = parser.parse_args(argv)
    from .processes import Terminated

    # what an interrupted run prints last: the exact command that continues it
    after = f"; continue with: {resume_command(argv)}" if args.command == "run" else ""
    stopped = None
    try:
        runner = args.handler(args)  # checks arguments and paths before the heavy imports
        process_settings(args.threads)
        runner()
    except CCFSError as exc:
        # a run that could not write (a full disk) continues where it stopped once there is room
        resume = after if after and isinstance(exc, OutputError) and (args.output_dir / "state.json").is_file() else ""
        print(f"ccfs-fast: error: {' '.join(str(exc).split())}{resume}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        stopped = ("interrupted", 130)
    except Terminated:
        stopped = ("terminated", 143)
    if stopped is None:
        return 0
    # Out of the except block the interrupted frames are freed: loaders and worker pools torn down now,
    # their complaints silenced, so that the line that says how to continue is the last one.
    from .processes import quiet_teardown

    quiet_teardown()
    print(f"ccfs-fast: {stopped[0]}{after}", file=sys.stderr)
    return stopped[1]


def entry() -> None:
    """The console script (and `python -m ccfs_fast.cli`): main(), then the process ends at once. On a
    machine or cgroup of one CPU, numba's TBB threading layer hangs the interpreter's shutdown once its
    threads have started (a build printed its table and never exited); every output is written and
    closed when main() returns, so nothing of that shutdown is needed."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
