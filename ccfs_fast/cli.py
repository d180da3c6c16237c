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


BENCHMARKS: dict[str, Callable[[list[str]], None]] = {
    "loader": _bench_loader,
    "select": _bench_select,
}


def _run_bench(args: argparse.Namespace) -> None:
    BENCHMARKS[args.name](list(args.rest))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccfs-fast", description=__doc__)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / numba CPU threads (default: the number of cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_bench(sub)
    return parser


def _set_threads(threads: int | None) -> None:
    # Thread counts are set once, here, for the whole process. Importing FFCV calls
    # torch.set_num_threads(1) and numba.set_num_threads(1) (ffcv/pipeline/compiler.py), so import
    # it before setting ours.
    import ffcv  # noqa: F401
    import numba
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        _set_threads(args.threads)
        args.handler(args)
    except CCFSError as exc:
        print(f"ccfs-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ccfs-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
