"""Selection: the numba kernels vs the paper's approach (Python sets + per-class `sorted`).

Both compute one phase's selection from the same arrays (teacher-correct, already selected, filter
predictions, labels, a forgetting-like score with ties): coarse intersection, per-class fine
top-curpc. Results are checked equal before timing. Compile time is measured apart, in a fresh
process with an empty numba cache. Run: `ccfs-fast bench select [--quick] [--json FILE]`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.tables import format_table
from ccfs_fast.selection.kernels import candidate_mask, order_key, select_per_class, warm_up_kernels
from ccfs_fast.selection.scores import easy_first_key

from .common import HelpFormatter, interleaved_medians, median_time, write_chart, write_rows
from .paper_selection import reference_select


@dataclass(frozen=True)
class Scale:
    name: str
    n: int
    classes: int
    curpc: int


SCALES = (Scale("CIFAR-10", 50_000, 10, 134), Scale("Tiny-ImageNet", 100_000, 200, 27),
          Scale("ImageNet-1K", 1_281_167, 1000, 100))


def make_problem(scale: Scale, seed: int = 0) -> dict:
    """A phase-2 state: 95% teacher-correct, one phase already selected, ~70% of the pool candidates."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, scale.classes, scale.n)
    teacher_correct = rng.random(scale.n) < 0.95
    selected = np.zeros(scale.n, bool)
    selected[rng.choice(np.flatnonzero(teacher_correct), scale.curpc * scale.classes, replace=False)] = True
    wrong = rng.random(scale.n) < 0.74
    pred = np.where(wrong, (labels + 1 + rng.integers(0, scale.classes - 1, scale.n)) % scale.classes, labels)
    scores = rng.integers(0, 20, scale.n) * 0.2  # forgetting-like: multiples of 0.2, many ties
    return {"labels": labels, "teacher_correct": teacher_correct, "selected": selected, "pred": pred,
            "scores": scores, "classes": scale.classes, "curpc": scale.curpc}


def kernel_path(p: dict) -> np.ndarray:
    cand = candidate_mask(p["teacher_correct"], p["selected"], p["pred"], p["labels"], True)
    key = order_key("simple", easy_first_key(p["scores"], "forgetting"), 0)
    return select_per_class(cand, p["labels"], p["classes"], key, p["curpc"], True, "fill",
                            p["teacher_correct"] & ~p["selected"]).indices


def reference_path(p: dict, tc_idx: list, sel_idx: list) -> list:
    return reference_select(tc_idx, sel_idx, p["pred"], p["labels"], p["classes"], p["scores"], "forgetting",
                            "simple", p["curpc"], True, "fill")


def compile_seconds() -> float:
    """First-call time of the kernels in a fresh interpreter with an empty numba cache."""
    with tempfile.TemporaryDirectory() as cache:
        code = "from ccfs_fast.selection.kernels import warm_up_kernels; print(warm_up_kernels())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "NUMBA_CACHE_DIR": cache})
    return float(out.stdout.strip().splitlines()[-1])


def measure(scale: Scale, repeats: int, compile_s: float) -> dict:
    p = make_problem(scale)
    # The paper's code keeps these as Python lists; converting is not part of its selection time.
    tc_idx, sel_idx = np.flatnonzero(p["teacher_correct"]).tolist(), np.flatnonzero(p["selected"]).tolist()
    if kernel_path(p).tolist() != reference_path(p, tc_idx, sel_idx):
        raise RuntimeError(f"kernel and reference disagree at {scale.name} scale")
    kernel_path(p)
    # Rounds alternate the sides so drift weighs on both; the kernel (about 1 ms) is timed as the
    # median of 10 calls per round, or timer noise and one descheduling would move the ratio by 20%.
    medians = interleaved_medians({"kernel": lambda: median_time(lambda: kernel_path(p), 10, warmup=0),
                                   "reference": lambda: median_time(lambda: reference_path(p, tc_idx, sel_idx),
                                                                    1, warmup=0)}, repeats)
    kernel_s, reference_s = medians["kernel"], medians["reference"]
    cand = candidate_mask(p["teacher_correct"], p["selected"], p["pred"], p["labels"], True)
    return {"scale": scale.name, "n": scale.n, "classes": scale.classes, "curpc": scale.curpc,
            "candidate_fraction": float(cand.mean()), "kernel_s": kernel_s, "reference_s": reference_s,
            "speedup": reference_s / kernel_s, "compile_s": compile_s}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ccfs-fast bench select", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds (each: the kernel, median of 10 calls; the reference once)")
    parser.add_argument("--quick", action="store_true", help="CIFAR and Tiny-ImageNet scales only")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    scales = SCALES[:2] if args.quick else SCALES
    compile_s = compile_seconds()
    warm_up_kernels()
    rows = [measure(scale, args.repeats, compile_s) for scale in scales]
    write_rows(args.json, rows, {"repeats": args.repeats, "quick": args.quick, "method": "simple",
                                 "balance": True, "shortfall": "fill"})
    write_chart(args.json, [f"{r['scale']} ({r['n']:,} / {r['classes']})" for r in rows], [r["speedup"] for r in rows],
                "selection: numba kernel vs sets + sorted", 50.0)
    print(format_table(["scale", "n", "classes", "candidates", "kernel s", "reference s", "speedup", "compile s"],
                       [(r["scale"], r["n"], r["classes"], f"{r['candidate_fraction']:.0%}", r["kernel_s"],
                         r["reference_s"], f"{r['speedup']:.0f}x", r["compile_s"]) for r in rows]))
    return rows


if __name__ == "__main__":
    main()
