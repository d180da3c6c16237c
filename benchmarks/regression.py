"""Throughput regressions fail a command: `ccfs-fast bench NAME ... --against FILE.json [--tolerance 0.15]`
measures as usual, then compares each row's ratio (ccfs-fast against its baseline measured in the same
call: the only figure that carries across machines) with the same row of the committed JSON, prints
both and the change per row, and exits 1 when any ratio fell by more than the tolerance. A row's
absolute figure (images/s, seconds) is compared too, but only when the stored row was measured on the
same CPU model and device, and shown, not judged; otherwise it is shown as not comparable.

Ratios shift between CPU models too (a kernel against Python sets gains more on one cache hierarchy
than another), so a stored file may hold one set of rows per CPU model: a row is compared with the
stored row of this machine's CPU model where there is one, else with any stored row of its shape
(the table says which). `--record` adds or replaces this machine's rows in the file: the deliberate
way to refresh the committed figures."""
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


def cpu_of(row: dict) -> str | None:
    return (row.get("environment") or {}).get("cpu")


def stored_row(stored: list[dict], row: dict, spec: RatioSpec) -> dict | None:
    """The stored row of `row`'s shape, preferring one measured on the same CPU model (the last such)."""
    same_shape = [r for r in stored if spec.ratio in r and row_key(r, spec) == row_key(row, spec)]
    same_cpu = [r for r in same_shape if cpu_of(r) == cpu_of(row)]
    return (same_cpu or same_shape or [None])[-1]


def compare(stored: list[dict], now: list[dict], spec: RatioSpec, tolerance: float) -> list[dict]:
    """Per row measured now that the stored file holds too: both ratios, the change (now / stored - 1),
    the absolute figures where comparable, and whether the ratio fell by more than `tolerance`."""
    out = []
    for row in now:
        before = stored_row(stored, row, spec)
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
                    "absolute_change": absolute, "regressed": change < -tolerance,
                    "stored_cpu": cpu_of(before), "same_cpu": cpu_of(before) == cpu_of(row)})
    return out


def record(path: Path, rows: list[dict], spec: RatioSpec) -> int:
    """Adds `rows` (with their environment) to the stored file, replacing the stored rows of the same
    shape and CPU model; rows of other machines are kept. Written to a temporary file first and
    renamed, so an interrupted refresh leaves the committed file whole. Returns the rows replaced."""
    stored = read_stored(path)
    fresh = {(row_key(r, spec), cpu_of(r)) for r in rows}
    kept = [r for r in stored if (row_key(r, spec), cpu_of(r)) not in fresh]
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(kept + rows, indent=1) + "\n")
    tmp.replace(path)
    return len(stored) - len(kept)


def check(name: str, rows: list[dict], against: Path, tolerance: float, record_rows: bool = False) -> list[dict]:
    """Compares a benchmark's rows with the committed ones and prints the table; RegressionError (exit
    1) when a ratio fell by more than the tolerance (absolute figures are shown, never judged: they
    move with the machine's other work). With `record_rows`, this machine's rows are written into
    `against` instead of judged."""
    if not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance {tolerance}: a share of the stored ratio in [0, 1), e.g. 0.15")
    spec = spec_of(name)
    here = environment()
    rows = [{"environment": here, **row} for row in rows]
    compared = compare(read_stored(against), rows, spec, tolerance)
    if not compared and not record_rows:
        raise ConfigError(f"--against {against}: none of its rows is one this run measured (rows are matched by "
                          f"{', '.join(spec.key)}); compare a quick run with a quick run's file")
    print(format_table(["row", "stored ratio", "stored on", "ratio now", "change", "absolute change", "verdict"],
                       [(c["row"], f"{c['stored_ratio']:.2f}x", "this CPU model" if c["same_cpu"]
                         else f"{c['stored_cpu'] or 'unknown'} (ratios shift between CPU models)",
                         f"{c['ratio']:.2f}x", f"{c['change']:+.1%}",
                         "not comparable (another machine)" if c["absolute_change"] is None
                         else f"{c['absolute_change']:+.1%}",
                         "recorded" if record_rows else "REGRESSED" if c["regressed"] else "ok")
                        for c in compared]))
    if record_rows:
        replaced = record(against, rows, spec)
        print(f"recorded {len(rows)} rows measured on {here.get('cpu')} in {against} (replacing {replaced}); "
              "commit it with the reason")
        return compared
    if not all(c["same_cpu"] for c in compared):
        print(f"note: some rows are compared with figures from another CPU model; `ccfs-fast bench {name} ... "
              f"--against {against} --record` stores this machine's own")
    worse = [c for c in compared if c["regressed"]]
    if worse:
        shown = "; ".join(f"{c['row']}: {c['stored_ratio']:.2f}x -> {c['ratio']:.2f}x ({c['change']:+.1%})"
                          for c in worse[:3])
        raise RegressionError(f"bench {name}: {len(worse)} of {len(compared)} rows fell by more than "
                              f"{tolerance:.0%} against {against}: {shown}")
    return compared
