"""Throughput regressions fail a command: `ccfs-fast bench NAME ... --against FILE.json [--tolerance 0.15]`
measures as usual, then compares each row's ratio (ccfs-fast against its baseline measured in the same
call: the only figure that carries across machines) with the same row of the committed JSON, prints
both and the change per row, and exits 1 when any ratio fell by more than the tolerance. A row's
absolute figure (images/s, seconds) is compared too, but only when the stored row was measured on the
same CPU model and device, and shown, not judged; otherwise it is shown as not comparable."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from beton_builder.base.errors import ConfigError, RegressionError
from beton_builder.base.tables import format_table
from ccfs_fast.runs.environment import environment

DEFAULT_TOLERANCE = 0.15


@dataclass(frozen=True)
class RatioSpec:
    """How one benchmark's rows are compared: the fields naming a row, its ratio (higher is better)
    and its absolute figure with its direction."""

    key: tuple[str, ...]
    absolute: str
    absolute_higher_is_better: bool
    ratio: str = "speedup"


# the benchmarks whose rows carry a ccfs-fast / baseline ratio measured in the same call
SPECS: dict[str, RatioSpec] = {
    "select": RatioSpec(("scale", "n", "classes"), "kernel_s", False),
    "loader": RatioSpec(("side", "baseline", "batch_size", "images", "workers", "load"), "ccfs_img_per_s", True),
    "phase": RatioSpec(("dataset", "model", "stage", "pool", "epochs"), "ccfs_s", False),
}


def spec_of(name: str) -> RatioSpec:
    if name not in SPECS:
        raise ConfigError(f"bench {name} --against: {name}'s rows carry no ratio against a baseline measured in the "
                          f"same call; --against works for {', '.join(SPECS)}")
    return SPECS[name]


def read_stored(path: Path) -> list[dict]:
    """The committed rows of `path` (a benchmark's --json output)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--against {path}: not a benchmark's JSON ({type(exc).__name__}: {exc}); pass a file "
                          "written by `ccfs-fast bench NAME --json FILE`, e.g. one in benchmarks/results/") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"--against {path}: expected a list of rows, as `ccfs-fast bench NAME --json` writes")
    return rows


def row_key(row: dict, spec: RatioSpec) -> tuple:
    return tuple(row.get(k) for k in spec.key)


def same_machine(stored: dict, now: dict) -> bool:
    """Whether two rows were measured on the same CPU model and device (absolute figures comparable)."""
    a, b = stored.get("environment") or {}, now.get("environment") or {}
    return bool(a.get("cpu")) and all(a.get(k) == b.get(k) for k in ("cpu", "cuda", "device")) \
        and stored.get("device") == now.get("device")


def compare(stored: list[dict], now: list[dict], spec: RatioSpec, tolerance: float) -> list[dict]:
    """Per row measured now that the stored file holds too: both ratios, the change (now / stored - 1),
    the absolute figures where comparable, and whether the ratio fell by more than `tolerance`."""
    committed = {row_key(r, spec): r for r in stored if spec.ratio in r}
    out = []
    for row in now:
        before = committed.get(row_key(row, spec))
        if before is None or spec.ratio not in row:
            continue
        change = row[spec.ratio] / before[spec.ratio] - 1
        comparable = same_machine(before, row)
        absolute = None
        if comparable and spec.absolute in row and spec.absolute in before:
            ratio = row[spec.absolute] / before[spec.absolute]
            absolute = ratio - 1 if spec.absolute_higher_is_better else 1 / ratio - 1
        out.append({"row": " ".join(str(v) for v in row_key(row, spec) if v is not None),
                    "stored_ratio": before[spec.ratio], "ratio": row[spec.ratio], "change": change,
                    "absolute_change": absolute, "regressed": change < -tolerance})
    return out


def check(name: str, rows: list[dict], against: Path, tolerance: float) -> list[dict]:
    """Compares a benchmark's rows with the committed ones and prints the table; RegressionError (exit
    1) when a ratio fell by more than the tolerance (absolute figures are shown, never judged: they
    move with the machine's other work)."""
    if not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance {tolerance}: a share of the stored ratio in [0, 1), e.g. 0.15")
    spec = spec_of(name)
    here = environment()
    rows = [{"environment": here, **row} for row in rows]
    compared = compare(read_stored(against), rows, spec, tolerance)
    if not compared:
        raise ConfigError(f"--against {against}: none of its rows is one this run measured (rows are matched by "
                          f"{', '.join(spec.key)}); compare a quick run with a quick run's file")
    print(format_table(["row", "stored ratio", "ratio now", "change", "absolute change", "verdict"],
                       [(c["row"], f"{c['stored_ratio']:.2f}x", f"{c['ratio']:.2f}x", f"{c['change']:+.1%}",
                         "not comparable (another machine)" if c["absolute_change"] is None
                         else f"{c['absolute_change']:+.1%}", "REGRESSED" if c["regressed"] else "ok")
                        for c in compared]))
    worse = [c for c in compared if c["regressed"]]
    if worse:
        shown = "; ".join(f"{c['row']}: {c['stored_ratio']:.2f}x -> {c['ratio']:.2f}x ({c['change']:+.1%})"
                          for c in worse[:3])
        raise RegressionError(f"bench {name}: {len(worse)} of {len(compared)} rows fell by more than "
                              f"{tolerance:.0%} against {against}: {shown}")
    return compared
