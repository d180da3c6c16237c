"""The staged GPU device check, in two calls that fit a lent machine's window with room for a third:

  bash benchmarks/gpu_check.sh smoke   # <= 120 s: the device's environment, exactness, KD graphs vs eager
  bash benchmarks/gpu_check.sh main    # <= 360 s: the bank, the fp32 preset at a few epochs projected, bf16

Each stage runs in its own child process under its own limit (benchmarks/stages.py; the stages
themselves are in benchmarks/gpu_stages.py); the parent only orchestrates and writes the JSON after
every stage; each call stays under its budget by its own clock, and a stage that cannot fit in what is
left is skipped, not started. The KD stages need no data and come first. `--quick` is the CPU form the
tests run (small data, tiny models, 1 epoch, every call's stages in order)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .gpu_stages import PRESET_EPOCHS, child_main, preset_dir, preset_projection
from .stages import Stage, Stages

EXACTNESS_ENV = (("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),)  # cuBLAS reproducible across streams
STAGES = {s.name: s for s in (
    Stage("exactness", cap_s=45, min_s=15, cuda_only=True, env=EXACTNESS_ENV),
    Stage("kd_fp32", cap_s=55, min_s=20),
    Stage("kd_bank_fp32", cap_s=80, min_s=25),
    Stage("data", cap_s=45, min_s=15),
    Stage("teacher", cap_s=45, min_s=15, needs=("data",)),
    Stage("preset_fp32", cap_s=120, min_s=45, needs=("teacher",)),
    Stage("kd_bf16", cap_s=55, min_s=20, cuda_only=True),
    Stage("preset_bf16", cap_s=90, min_s=45, needs=("teacher",), cuda_only=True),
)}
# Which stages each call runs, and its budget in seconds from the shell's start (the device tool allows 600 s
# a call; a lent machine about 15 minutes in all, its start included).
CALLS: dict[str, tuple[tuple[str, ...], float]] = {
    "smoke": (("exactness", "kd_fp32"), 115.0),
    "main": (("kd_bank_fp32", "data", "teacher", "preset_fp32", "kd_bf16", "preset_bf16"), 350.0),
    "all": (tuple(STAGES), 480.0),
}


def salvage_preset(bf16: bool) -> Callable[[Path], dict]:
    """What a preset stage stopped part-way leaves: the curricula its run finished (state.json)."""
    def salvage(root: Path) -> dict:
        import json

        path = preset_dir(root, bf16) / "state.json"
        state = json.loads(path.read_text()) if path.is_file() else {"phases": []}
        return {"phases_finished": len(state.get("phases", [])),
                "trainings": preset_projection(state, 0.0, 1)["trainings"]}
    return salvage


def parent_main(args: argparse.Namespace) -> dict:
    """Runs the call's stages in order, each in a child; JSON after each; the table and the headline lines last."""
    started = time.perf_counter() - since_shell_start()  # the budget counts from the command's start
    names, budget = CALLS[args.call]
    budget = args.budget or budget
    cuda = _cuda_visible()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        stages = Stages(args.json, budget, root, {"config": {k: str(v) for k, v in vars(args).items()},
                                                  "call": args.call, "device": "cuda" if cuda else "cpu"},
                        start=started)
        limits = dict(item.split("=", 1) for item in args.stage_limit)
        for name in names:
            stage = STAGES[name]
            if stage.cuda_only and not cuda:
                stages.skip(name, "CUDA only")
                continue
            argv = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, "--root", str(root),
                    "--preset-epochs", str(args.preset_epochs), *(["--quick"] if args.quick else []),
                    *(["--fail-stage", args.fail_stage] if args.fail_stage else []),
                    *(["--hang-stage", args.hang_stage] if args.hang_stage else [])]
            salvage = salvage_preset(name.endswith("bf16")) if name.startswith("preset_") else None
            stages.run(stage, argv, float(limits[name]) if name in limits else None, salvage)
            print(f"{name}: {stages.records[-1]['status']} ({stages.records[-1]['seconds']:.0f} s)", flush=True)
    print(summary(stages))
    return {"stages": stages.records}


def since_shell_start() -> float:
    """Seconds since benchmarks/gpu_check.sh started (its CCFS_CHECK_STARTED), 0 when run directly."""
    try:
        return max(0.0, time.time() - float(os.environ.get("CCFS_CHECK_STARTED", "")))
    except ValueError:
        return 0.0


def _cuda_visible() -> bool:
    """Whether a CUDA device is there: what gpu_check.sh's environment line found (CCFS_CHECK_CUDA), else
    asked in a child, so that this process never starts CUDA."""
    import subprocess

    if os.environ.get("CCFS_CHECK_CUDA") in ("0", "1"):
        return os.environ["CCFS_CHECK_CUDA"] == "1"
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False  # recorded as device "cpu": the CUDA stages are then skipped, saying so
    return probe.stdout.strip().endswith("True")


def summary(stages: Stages) -> str:
    """The stage table, then the figures the targets are stated in."""
    lines = [stages.table()]
    for record in stages.records:
        figures = record.get("figures") or {}
        if record["stage"].startswith("kd_") and figures:
            t = figures["targets"]
            lines.append(f"{record['stage']}: graphs / eager at batch 32 {_ratio(t['graphs_over_eager_b32'])} "
                         f"(target 4x); 5 together / sequential at batch 64 {_ratio(t['bank_over_sequential_b64'])} "
                         f"(target 1.5x, {t['bank_best_layout']}; sequential = {t['bank_denominator']})")
        if record["stage"].startswith("preset_") and figures:
            projected = figures["projected_min"]
            lines.append(f"{record['stage']}: {figures['epochs']} epochs in {figures['wall_s']:.0f} s, complete "
                         f"{figures['complete']}; {figures['target_epochs']} epochs projected "
                         f"{'n/a' if projected is None else f'{projected:.1f} min'} (fixed {figures['fixed_s']:.0f} s)")
        if record["stage"] == "exactness" and figures:
            fallback = figures["capture_fallback"]
            lines.append(f"exactness: graphs vs eager {figures['graphs_vs_eager']:.3g}, eager vs eager "
                         f"{figures['eager_vs_eager']:.3g}: {'pass' if figures['passed'] else 'FAIL'}; a failed "
                         f"capture then {fallback['steps']} eager steps: allocated memory grew "
                         f"{fallback['allocated_growth_bytes']:,} bytes ({'pass' if fallback['held'] else 'FAIL'})")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> dict | int:
    parser = argparse.ArgumentParser(prog="benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--call", choices=list(CALLS), default="all",
                        help="smoke | main: the two calls of a lent machine; all: every stage (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the stages here (after every stage)")
    parser.add_argument("--graphs", action="store_true", help="(accepted for older commands)")
    parser.add_argument("--quick", action="store_true", help="the CPU form the tests run: small data, 1 epoch")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the call by its own clock, from the shell's start (default: smoke "
                             f"{CALLS['smoke'][1]:.0f}, main {CALLS['main'][1]:.0f}, all {CALLS['all'][1]:.0f})")
    parser.add_argument("--preset-epochs", type=int, default=None,
                        help=f"epochs of the preset runs (default: {PRESET_EPOCHS}; 1 with --quick)")
    parser.add_argument("--stage-limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override a stage's own limit (repeatable)")
    parser.add_argument("--fail-stage", default=None, help="make this stage fail on purpose (tests the check)")
    parser.add_argument("--hang-stage", default=None,
                        help="make this stage hang after its first row (tests the check's limits)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a child: run this one stage
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset_epochs = args.preset_epochs or (1 if args.quick else PRESET_EPOCHS)
    if args.stage:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
