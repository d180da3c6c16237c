"""The command handlers: each checks its arguments before the heavy imports and returns what runs the command."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from beton_builder.base.errors import ConfigError
from ccfs_fast.cli.args import (
    add_relocation_args,
    default_workers,
    relocated,
)

Runner = Callable[[], None]


def _run_build(args: argparse.Namespace) -> Runner:
    sources = args.src if isinstance(args.src, list) else [args.src]
    args.src = sources[0]
    missing = next((src for src in sources if not src.exists()), None)
    if missing is not None:  # before the heavy imports
        from beton_builder.base.errors import BuildError
        from beton_builder.cifar import CIFAR_LAYOUTS, expected_layout

        hint = (expected_layout(CIFAR_LAYOUTS[args.kind]) if args.kind in CIFAR_LAYOUTS
                else "pass the dataset's folder or its downloaded archive")
        flag = "--images" if args.kind == "tensors" else "--src"
        raise BuildError(f"{flag} {missing}: no such file or folder; {hint}")
    from beton_builder.base.locks import BUILD_HOLDER, build_lock, probe_lock

    for single in (True, False):  # a build writing this output already: refused before the heavy imports
        probe_lock(args.out, build_lock(args.out, single), BUILD_HOLDER)
    from beton_builder.base.tables import format_table
    from beton_builder.build import BuildConfig, build

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
    from beton_builder.base.locks import probe_lock
    from ccfs_fast.runs.presets import make_run_config
    from ccfs_fast.runs.run_dir import output_dir_problem

    # refusals that need no data come first, before any input is read or anything heavy imported
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite starts it over; pass one of them")
    problem = output_dir_problem(args.output_dir, args.resume, args.overwrite)
    if problem:
        raise ConfigError(problem)
    probe_lock(args.output_dir)
    cfg = make_run_config(args.preset, args.smoke, **_split_args(args, ("resume", "overwrite", "preset", "smoke")))

    def run() -> None:
        from ccfs_fast.runs.curriculum import run_curriculum

        run_curriculum(cfg, resume=args.resume, overwrite=args.overwrite)
    return run

def run_dir_keys() -> frozenset[str]:
    """A run's settings that `eval --run-dir` reuses: those of the parts eval shares with run (inputs,
    evaluation, recipe, fast path, machine) and the selection's ipc and alpha (its selection comes from
    the run's selected_indices.json)."""
    from ccfs_fast.runs.config import EvalConfig
    from ccfs_fast.train.settings import leaves

    return frozenset(leaf.name for leaf in leaves(EvalConfig) if leaf.part) | {"image_per_class", "alpha"}


def run_dir_settings(run_dir: Path, given: dict[str, Path] | None = None, train_set: bool = False) -> dict:
    """EvalConfig values from a run directory: its settings (state.json), its selection file, and its
    inputs as run_inputs finds and checks them (`given`: --pool, --test, --distilled, --teacher, where
    the user says one is now; `train_set`: an exported set takes the distilled set's place)."""
    from ccfs_fast.runs.run_inputs import read_run_json, resolve_run_inputs

    state = read_run_json(run_dir, "state.json")
    settings = state.get("settings")
    if not isinstance(settings, dict):
        raise ConfigError(f"--run-dir {run_dir}: its state.json holds no settings; pass the --output-dir of a "
                          "`ccfs-fast run`")
    keep = run_dir_keys()
    values = {k: v for k, v in settings.items() if k in keep and v is not None}
    needed = ("pool", "test", "teacher") + (() if train_set else ("distilled",))
    given = {k: v for k, v in (given or {}).items() if k in needed}
    values.update(resolve_run_inputs(state, run_dir, needed, given).paths)
    values["selection_file"] = run_dir / "selected_indices.json"
    return values


def _run_eval(args: argparse.Namespace) -> Runner:
    from ccfs_fast.runs.config import EvalConfig, fit_warmup
    from ccfs_fast.runs.presets import preset_settings
    from ccfs_fast.train.recipe import TrainRecipe
    from ccfs_fast.train.settings import compose

    explicit = _split_args(args, ("run_dir",))
    base = run_dir_settings(args.run_dir, explicit, "train_set" in explicit) if "run_dir" in args else {}
    if "train_set" in explicit:  # an exported set is the whole train set: no distilled set, no selection
        base = {k: v for k, v in base.items() if k not in ("distilled", "selection_file")}
        explicit.update(distilled=explicit["train_set"], selection_file=None)
    values, notes = fit_warmup({**base, **preset_settings(args.preset, EvalConfig), **explicit}, TrainRecipe())
    missing = [flag for k, flag in (("pool", "--pool"), ("test", "--test"), ("distilled", "--distilled"),
                                    ("teacher", "--teacher"), ("selection_file", "--selection")) if k not in values]
    if missing:
        raise ConfigError(f"eval needs {', '.join(missing)} (or --run-dir RUN to take them from a run)")
    if "output" not in values:  # beside the selection (the run's); beside an exported set, never over the run's
        values["output"] = (Path(values["train_set"]).with_suffix(".eval.json") if values.get("train_set") is not None
                            else Path(values["selection_file"]).parent / "eval.json")
    if "run_dir" in args:
        values["run_dir"] = args.run_dir
    cfg = compose(EvalConfig, {**values, "notes": tuple(notes)}).check_files()

    def run() -> None:
        from ccfs_fast.runs.evaluation import evaluate_selection_file

        evaluate_selection_file(cfg)
    return run


def _run_teacher(args: argparse.Namespace) -> Runner:
    from ccfs_fast.runs.config import TeacherConfig, fit_warmup, teacher_recipe
    from ccfs_fast.train.settings import compose

    values, notes = fit_warmup(_split_args(args), teacher_recipe())
    cfg = compose(TeacherConfig, {**values, "notes": tuple(notes)}).check_files()

    def run() -> None:
        from ccfs_fast.runs.teacher import train_teacher

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
    from ccfs_fast.runs.demo import DemoConfig, run_demo

    cfg = DemoConfig(output_dir=args.output_dir, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                     num_eval=args.num_eval, seed=args.seed, overwrite=args.overwrite,
                     workers=min(2, default_workers()))
    return lambda: run_demo(cfg)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild metrics.csv, report.png, evaluation.csv / .png and selection.png of a "
                                      "run directory")
    p.add_argument("run_dir", type=Path, help="a `ccfs-fast run` output directory")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="selection.png: the classes to show, by name or label (default: the first 10)")
    add_relocation_args(p)
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> Runner:
    if not (args.run_dir / "metrics.json").is_file():
        raise ConfigError(f"{args.run_dir} has no metrics.json; pass the --output-dir of a `ccfs-fast run`")

    def run() -> None:
        import pandas as pd

        from beton_builder.base.tables import format_table
        from ccfs_fast.runs.evaluation_report import evaluation_table
        from ccfs_fast.runs.report import write_report

        for path in write_report(args.run_dir, args.classes, relocated(args)):
            print(path)
        rows = pd.read_csv(args.run_dir / "evaluation.csv").astype(object)
        rows = rows.where(rows.notna(), None).to_dict("records")
        if rows:  # the result table last, as `eval` prints its own
            print(format_table(*evaluation_table(rows)))
    return run


def _add_export(sub: argparse._SubParsersAction) -> None:
    from ccfs_fast.runs.config import EXPORT_FORMATS

    p = sub.add_parser("export", help="a run's final set (distilled + selected) as an image folder and a .beton",
                       description="Writes the run's final synthetic set, the distilled images it used and then the "
                                   "real images it selected, as an image folder (one sub-folder per class, named "
                                   "by label index; PNG, or "
                                   "the stored JPEG bytes of a JPEG pool), a .beton in the run's order "
                                   "(ccfs_set.beton, for `run`, `eval --train-set` and FFCV) and manifest.csv (file, "
                                   "label, class, source, pool index, curriculum, score).")
    p.add_argument("run_dir", type=Path, help="a `ccfs-fast run` output directory")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (created; refused if it exists)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="both",
                   help="folder (class folders 000, 001, ... in label order, classes.csv naming them), beton, both "
                        "(folder + beton), tensors (images.pt float [N, 3, H, W] normalised as the run evaluates, "
                        "labels.pt int64 [N], class-major: DD-Ranking's form) or all (default: both)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="export an unfinished run's set as it is (refused otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"writing processes (default: {default_workers()})")
    add_relocation_args(p)
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> Runner:
    from ccfs_fast.runs.config import ExportConfig

    cfg = ExportConfig(args.run_dir, args.out, args.format, args.allow_incomplete, args.overwrite, args.workers,
                       tuple(relocated(args).items())).check_files()

    def run() -> None:
        from ccfs_fast.runs.set_export import export_run

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
                                       "`ccfs-fast bench NAME --help` lists a benchmark's own flags. "
                                       "`ccfs-fast bench NAME ... --against FILE.json [--tolerance 0.15]` compares "
                                       "each row's ratio with the committed figures and exits 1 when one fell by "
                                       "more than the tolerance (loader, select, phase).",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--against", type=Path, default=None, metavar="FILE.json",
                       help="compare each row's ratio with this committed JSON; exit 1 when one fell by more than "
                            "--tolerance (may also follow NAME)")
    bench.add_argument("--tolerance", type=float, default=None,
                       help="the share of a committed ratio it may fall by (default: 0.15)")
    bench.add_argument("--record", action="store_true",
                       help="with --against: write this machine's rows into the file (replacing its earlier "
                            "ones) instead of judging them: the deliberate refresh")
    bench.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help=" | ".join(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> Runner:
    import importlib

    module = BENCHMARKS[args.name][0]
    checking = argparse.ArgumentParser(add_help=False)
    checking.add_argument("--against", type=Path, default=None)
    checking.add_argument("--tolerance", type=float, default=None)
    checking.add_argument("--record", action="store_true")
    against, rest = checking.parse_known_args(list(args.rest))
    against.against = against.against or args.against
    against.tolerance = against.tolerance if against.tolerance is not None else args.tolerance
    against.record = against.record or args.record
    if against.record and against.against is None:
        raise ConfigError("--record needs --against FILE.json (the file to store this machine's figures in)")
    if against.tolerance is not None and against.against is None:
        raise ConfigError("--tolerance needs --against FILE.json (the committed figures to compare with)")
    if against.against is not None and not against.against.is_file():
        raise ConfigError(f"--against {against.against}: no such file; pass a benchmark's committed JSON, e.g. one in "
                          "benchmarks/results/")
    if against.against is not None:  # before measuring: a benchmark without ratios is refused at once
        importlib.import_module("benchmarks.regression").spec_of(args.name)

    def run() -> None:
        rows = importlib.import_module(module).main(rest)
        if against.against is not None:
            regression = importlib.import_module("benchmarks.regression")
            tolerance = regression.DEFAULT_TOLERANCE if against.tolerance is None else against.tolerance
            regression.check(args.name, rows, against.against, tolerance, record_rows=against.record)
    return run
