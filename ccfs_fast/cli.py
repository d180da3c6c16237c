"""`ccfs-fast` command line: parses arguments, builds one frozen config per command, calls it."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import CCFSError


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _add_build(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser("build", help="convert a dataset to .beton files (+ manifests)")
    kinds = build.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in ("cifar10", "cifar100", "tiny-imagenet"):
        p = kinds.add_parser(kind, help=f"{kind}: writes {kind}_train.beton and {kind}_test.beton")
        p.add_argument("--src", type=Path, required=True, help="the dataset folder or its archive")
        p.add_argument("--out", type=Path, required=True, help="output folder")
    folder = kinds.add_parser("folder", help="an image folder (one sub-folder per class), e.g. distilled")
    folder.add_argument("--src", type=Path, required=True)
    folder.add_argument("--out", type=Path, required=True, help="FILE.beton")
    folder.add_argument("--per-class", type=int, default=None, help="keep the first K sorted files per class")
    folder.add_argument("--side", type=int, default=None, help="resize every image to SIDE x SIDE")
    arrays = kinds.add_parser("arrays", help="an .npz with x uint8 [n,h,w,3] and y int [n]")
    arrays.add_argument("--src", type=Path, required=True)
    arrays.add_argument("--out", type=Path, required=True, help="FILE.beton")
    for p in kinds.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        p.add_argument("--workers", type=int, default=_default_workers())
    build.set_defaults(handler=_run_build)


def _run_build(args: argparse.Namespace) -> None:
    from beton_builder.build import BuildConfig, build

    from .tables import format_table

    config = BuildConfig(kind=args.kind, src=args.src, out=args.out, per_class=getattr(args, "per_class", None),
                         side=getattr(args, "side", None), overwrite=args.overwrite, workers=args.workers)
    results = build(config)
    rows = [(str(path), m.n, m.num_classes, f"{m.side}x{m.side}", seconds) for path, m, seconds in results]
    print(format_table(["file", "images", "classes", "side", "seconds"], rows))


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size takes 'auto' or an integer, got {value!r}") from None


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The paper script's training flags; defaults are filled later (preset, then dataclass)."""
    s = argparse.SUPPRESS
    p.add_argument("--epochs", type=int, default=s)
    p.add_argument("--opt", default=s, help="sgd | sgd_nesterov | adamw | rmsprop")
    p.add_argument("--lr", type=float, default=s)
    p.add_argument("--momentum", type=float, default=s)
    p.add_argument("--weight-decay", "--wd", type=float, default=s)
    p.add_argument("--lr-scheduler", default=s, help="cosineannealinglr | steplr | exponentiallr")
    p.add_argument("--lr-step-size", type=int, default=s)
    p.add_argument("--lr-gamma", type=float, default=s)
    p.add_argument("--lr-warmup-epochs", type=int, default=s)
    p.add_argument("--lr-warmup-method", default=s, help="linear | constant")
    p.add_argument("--lr-warmup-decay", type=float, default=s)
    p.add_argument("--batch-size", type=_batch_size, default=s, help="'auto' (the paper's policy) or an integer")
    p.add_argument("-T", "--temperature", type=float, default=s, help="KD temperature")
    p.add_argument("--device", default=s, help="cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=s)
    p.add_argument("--workers", type=int, default=s, help="FFCV loader threads")
    p.add_argument("--eval-batch-size", type=int, default=s)
    fast = p.add_argument_group("GPU fast path (default: on for CUDA where it helps, off on the CPU)")
    fast.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=s)
    fast.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=s,
                      help="bf16 autocast for teacher and student")
    fast.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=s)
    fast.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=s)
    fast.add_argument("--compile", action=argparse.BooleanOptionalAction, default=s, help="torch.compile the student")
    fast.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=s,
                      help="capture the whole KD train step in CUDA graphs and replay it (default: on for CUDA)")


def _add_data_args(p: argparse.ArgumentParser, distilled: bool = True) -> None:
    p.add_argument("--pool", type=Path, required=True, help="the training pool .beton (ccfs-fast build)")
    p.add_argument("--test", type=Path, required=True, help="the test .beton")
    if distilled:
        p.add_argument("--distilled", type=Path, required=True, help="the distilled images .beton (build folder)")
        p.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (.pt/.pth)")
        p.add_argument("--teacher-model", default=argparse.SUPPRESS)
    p.add_argument("--normalize", default=argparse.SUPPRESS)


def _add_run(sub: argparse._SubParsersAction) -> None:
    s = argparse.SUPPRESS
    p = sub.add_parser("run", help="the CCFS curriculum")
    _add_data_args(p)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--preset", default=None, help="the paper's settings, e.g. cifar10-ipc500 (flags override)")
    p.add_argument("--image-per-class", type=int, default=s)
    p.add_argument("--alpha", type=float, default=s, help="distilled portion of each class")
    p.add_argument("--curriculum-num", type=int, default=s)
    p.add_argument("--select-misclassified", action=argparse.BooleanOptionalAction, default=s)
    p.add_argument("--select-method", default=s, help="simple | hard | random")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=s)
    p.add_argument("--score", default=s, help="forgetting | cscore | logits")
    p.add_argument("--score-path", type=Path, default=s)
    p.add_argument("--shortfall", default=s, help="fill | strict | short")
    p.add_argument("--num-eval", type=int, default=s)
    p.add_argument("--fuse-evals", action=argparse.BooleanOptionalAction, default=s,
                   help="train the --num-eval evaluation models as one fused network (default: on)")
    p.add_argument("--filter-model", default=s)
    p.add_argument("--eval-model", default=s)
    p.add_argument("--filter-acc", default=s, help="end (default) | best_last_20 (the paper's logging)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    _add_recipe_args(p)
    p.set_defaults(handler=_run_run)


def _split_args(args: argparse.Namespace, drop: tuple[str, ...]) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "command", "threads", *drop)}


def _run_run(args: argparse.Namespace) -> None:
    from .config import RunConfig, preset_settings, split_recipe
    from .curriculum import run_curriculum

    values = {**preset_settings(args.preset), **_split_args(args, ("resume", "overwrite"))}
    recipe, rest = split_recipe(values)
    run_curriculum(RunConfig(recipe=recipe, **rest), resume=args.resume, overwrite=args.overwrite)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    s = argparse.SUPPRESS
    p = sub.add_parser("eval", help="train and evaluate on distilled ∪ a saved selection")
    _add_data_args(p)
    p.add_argument("--selection", type=Path, required=True, help="selected_indices.json (this tool's or the paper's)")
    p.add_argument("--image-per-class", type=int, default=s, help="default: the selection file's ipc")
    p.add_argument("--alpha", type=float, default=s, help="default: the selection file's alpha")
    p.add_argument("--num-eval", type=int, default=s)
    p.add_argument("--fuse-evals", action=argparse.BooleanOptionalAction, default=s,
                   help="train the --num-eval evaluation models as one fused network (default: on)")
    p.add_argument("--eval-model", default=s)
    p.add_argument("--output", type=Path, default=s, help="write the results as JSON here")
    p.add_argument("--preset", default=None, help="the paper's settings, e.g. cifar10-ipc500 (flags override)")
    _add_recipe_args(p)
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from .config import EvalConfig, preset_settings, split_recipe
    from .evaluation import evaluate_selection_file

    recipe, rest = split_recipe({**preset_settings(args.preset, EvalConfig), **_split_args(args, ())})
    evaluate_selection_file(EvalConfig(recipe=recipe, **rest))


def _add_teacher(sub: argparse._SubParsersAction) -> None:
    s = argparse.SUPPRESS
    p = sub.add_parser("teacher", help="train a teacher on a pool .beton (optionally record forgetting scores)")
    _add_data_args(p, distilled=False)
    p.add_argument("--model", default=s)
    p.add_argument("--output", type=Path, required=True, help="checkpoint FILE.pt")
    p.add_argument("--forgetting-out", type=Path, default=s, help="write forgetting scores (.npy) here")
    p.add_argument("--label-smoothing", type=float, default=s)
    p.add_argument("--overwrite", action="store_true")
    _add_recipe_args(p)
    p.set_defaults(handler=_run_teacher)


def _run_teacher(args: argparse.Namespace) -> None:
    from .config import TeacherConfig, split_recipe, teacher_recipe
    from .teacher import train_teacher

    recipe, rest = split_recipe(_split_args(args, ()), teacher_recipe())
    own = set(TeacherConfig.__dataclass_fields__)
    train_teacher(TeacherConfig(recipe=recipe, **{k: v for k, v in rest.items() if k in own}))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on scikit-learn's digits (real data), end to end")
    p.add_argument("--output-dir", type=Path, default=Path("demo_out"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--epochs", type=int, default=15, help="filter / evaluation epochs")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--num-eval", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(output_dir=args.output_dir, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                        num_eval=args.num_eval, seed=args.seed,
                        overwrite=args.overwrite, workers=min(2, _default_workers())))


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild metrics.csv and report.png of a run directory")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> None:
    from .report import write_report

    for path in write_report(args.run_dir):
        print(path)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark: loader | select", add_help=False)
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (--help lists them)")
    bench.set_defaults(handler=_run_bench)


def _bench_loader(argv: list[str]) -> None:
    from benchmarks.loader_throughput import main as loader_main
    loader_main(argv)


def _bench_select(argv: list[str]) -> None:
    from benchmarks.select_kernel import main as select_main
    select_main(argv)


def _bench_phase(argv: list[str]) -> None:
    from benchmarks.curriculum_wallclock import main as phase_main
    phase_main(argv)


def _bench_train(argv: list[str]) -> None:
    from benchmarks.train_throughput import main as train_main
    train_main(argv)


BENCHMARKS: dict[str, Callable[[list[str]], None]] = {
    "loader": _bench_loader,
    "select": _bench_select,
    "phase": _bench_phase,
    "train": _bench_train,
}


def _run_bench(args: argparse.Namespace) -> None:
    BENCHMARKS[args.name](list(args.rest))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccfs-fast", description=__doc__)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / numba CPU threads (default: the number of cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_run(sub)
    _add_eval(sub)
    _add_teacher(sub)
    _add_demo(sub)
    _add_report(sub)
    _add_bench(sub)
    return parser


def _set_threads(threads: int | None) -> None:
    # Thread counts are set once, here, for the whole process. Importing FFCV calls
    # torch.set_num_threads(1) and numba.set_num_threads(1) (ffcv/pipeline/compiler.py), so import
    # it before setting ours.
    import ffcv  # noqa: F401
    import numba
    import torch

    # Under torchrun the cores are shared by the ranks on this node.
    count = threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(count)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        _set_threads(args.threads)
        args.handler(args)
    except CCFSError as exc:
        print(f"ccfs-fast: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("ccfs-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
