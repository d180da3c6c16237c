"""ccfs-fast: Curriculum Coarse-to-Fine Selection (CCFS, CVPR 2025) for high-IPC dataset distillation.

It adds real images to a distilled set in curricula: each trains a filter on the current set by
knowledge distillation from a teacher, keeps the pool images the filter misclassifies and takes the
easiest per class by a difficulty score. Datasets are converted once to FFCV .beton files.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from beton_builder.base.errors import CCFSError, OutputError
from ccfs_fast.cli.args import add_eval, add_run, add_teacher
from ccfs_fast.cli.build_args import _add_build
from ccfs_fast.cli.commands import _add_bench, _add_demo, _add_export, _add_report, _run_eval, _run_run, _run_teacher
from ccfs_fast.data.threads import openmp_defaults, process_settings

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


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def unknown_flag(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """One line naming the first flag that no (sub)command of `argv` knows, with the closest known one
    (argparse's own answer is the whole usage, without the typo), or None when every flag is known or
    an unambiguous prefix of one, as argparse accepts."""
    import difflib

    words, command = list(argv), []
    while words and not words[0].startswith("-") and (inner := _subparser(parser, words[0])) is not None:
        parser, command = inner, command + [words.pop(0)]
    if any(action.nargs == argparse.REMAINDER for action in parser._actions):
        return None  # the rest is another program's arguments (a benchmark's own flags)
    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for word in words:
        flag = word.split("=", 1)[0]
        if word == "--" or not flag.startswith("--") or any(k.startswith(flag) for k in known):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        where = " ".join(["ccfs-fast", *command])
        guess = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown flag {flag} for `{where}`{guess}; `{where} --help` lists every flag"
    return None


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
    typo = unknown_flag(parser, argv)
    if typo is not None:
        print(f"ccfs-fast: error: {typo}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from beton_builder.base.processes import Terminated

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
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        stopped = ("interrupted", 130)
    except Terminated:
        stopped = ("terminated", 143)
    if stopped is None:
        return 0
    # Out of the except block the interrupted frames are freed: loaders and worker pools torn down now,
    # their complaints silenced, so that the line that says how to continue is the last one.
    from beton_builder.base.processes import quiet_teardown

    quiet_teardown()
    print(f"ccfs-fast: {stopped[0]}{after}", file=sys.stderr)
    return stopped[1]


def entry() -> None:
    """The console script (and `python -m ccfs_fast.cli`): main(), then the process ends at once. On a
    machine or cgroup of one CPU, numba's TBB threading layer hangs the interpreter's shutdown once its
    threads have started (a build printed its table and never exited); every output is written and
    closed when main() returns, so nothing of that shutdown is needed. OpenMP's wait policy is set
    first, before anything loads torch (data.threads.openmp_defaults)."""
    openmp_defaults()
    code = main()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
