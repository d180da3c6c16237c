"""Where a run directory's inputs are now, and whether they are still the files the run used.

`state.json` records each input's path as the run was given it, the directory the run started in, each
input's path relative to the run directory, and each input's content digest. A command that reopens a
run (`eval --run-dir`, `export`, `report`) looks for each input it reads at the recorded path (from the
start directory when it was relative), then relative to the run directory (a run copied elsewhere
together with its inputs), or where a flag points, and takes it only when its digest is the recorded
one: a different pool at the same relative path, a replaced score file or a moved teacher is refused in
one line that names it and the flag that points at the right file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from beton_builder.base.errors import DataError


class InputMissing(DataError):
    """A run's input is nowhere it was looked for."""


class InputChanged(DataError):
    """A file where a run's input should be is not the file the run used."""

# settings key -> (what it is called in messages, its key in state["inputs"], the flag that points at it)
RUN_INPUTS: dict[str, tuple[str, str, str]] = {
    "pool": ("pool", "pool", "--pool"),
    "test": ("test set", "test", "--test"),
    "distilled": ("distilled set", "distilled", "--distilled"),
    "teacher": ("teacher", "teacher", "--teacher"),
    "score_path": ("score file", "score", "--score-path"),
}


def input_record(settings: dict, output_dir: Path) -> dict:
    """What a starting (or resuming) run records besides its settings, so that later commands find its
    inputs from anywhere: the directory it started in and each input's path relative to its output
    directory."""
    out = Path(output_dir).absolute()
    relative = {}
    for key in RUN_INPUTS:
        value = settings.get(key)
        if value is not None:
            relative[key] = os.path.relpath(Path(value).absolute(), out)
    return {"start_dir": os.getcwd(), "inputs_from_run_dir": relative}


def candidates(state: dict, run_dir: Path, key: str) -> list[Path]:
    """Where to look for input `key`: as recorded (from the run's start directory when relative; runs
    written before it was recorded: from here), then relative to the run directory."""
    recorded = Path(state["settings"][key])
    start = state.get("start_dir")
    found = [recorded if recorded.is_absolute() else Path(start or os.getcwd()) / recorded]
    beside = (state.get("inputs_from_run_dir") or {}).get(key)
    if beside is not None:
        found.append(Path(os.path.normpath(Path(run_dir).absolute() / beside)))
    return list(dict.fromkeys(found))


def input_places(state: dict, run_dir: Path, given: dict[str, Path] | None = None) -> list[Path]:
    """Every place where one of the run's inputs is or may be (each recorded input's candidates and
    the paths `given` for them) that exists: what an export may never replace."""
    places = [Path(v) for v in (given or {}).values() if v is not None]
    for key in RUN_INPUTS:
        if state["settings"].get(key) is not None:
            places += candidates(state, run_dir, key)
    return [p for p in dict.fromkeys(places) if p.exists()]


def content_digest(key: str, path: Path) -> str:
    """The digest a run records for input `key` at `path`: a .beton's content digest (its manifest's,
    checked against the file), a teacher's or score file's sha256."""
    if key in ("pool", "test", "distilled"):
        from beton_builder.beton import BetonFile

        return BetonFile.open(path).digest()
    from beton_builder.base.digests import known_digest

    return known_digest(path)


@dataclass(frozen=True)
class RunInputs:
    """The resolved paths of a run's inputs (settings key -> path), each checked against its digest."""

    paths: dict[str, Path]

    def __getitem__(self, key: str) -> Path:
        return self.paths[key]

    def get(self, key: str) -> Path | None:
        return self.paths.get(key)


def resolve_run_inputs(state: dict, run_dir: Path, needed: tuple[str, ...], given: dict[str, Path] | None = None
                       ) -> RunInputs:
    """The inputs `needed` (settings keys) of the run in `run_dir`: each the first candidate (or the
    path `given` for it, e.g. --pool) whose content is the one the run recorded. InputMissing (nothing
    there) or InputChanged (another file there) naming the input, where it was looked for and the flag
    that points at it when none is."""
    given = {k: Path(v) for k, v in (given or {}).items() if v is not None}
    settings, digests = state["settings"], state.get("inputs") or {}
    paths = {}
    for key in needed:
        if settings.get(key) is None and key not in given:
            continue  # e.g. no score file for --score logits
        name, digest_key, flag = RUN_INPUTS[key]
        expected = digests.get(digest_key)
        looked = [given[key]] if key in given else candidates(state, run_dir, key)
        existing = [p for p in looked if p.is_file()]
        if not existing:
            where = ", ".join(str(p) for p in looked)
            raise InputMissing(f"{run_dir}: the run's {name} {settings.get(key)} is not there (looked at {where}); "
                               f"the run or its inputs moved: point at the file with {flag} PATH")
        if expected is None:  # a run written before digests were recorded: its recorded path is all there is
            paths[key] = existing[0]
            continue
        seen = {}
        for path in existing:
            seen[path] = content_digest(key, path)
            if seen[path] == expected:
                paths[key] = path
                break
        else:
            path, digest = next(iter(seen.items()))
            raise InputChanged(f"{run_dir}: {path} is not the {name} the run used (sha256 {digest[:12]}... where the "
                               f"run recorded {expected[:12]}...): it changed since, or another file has that path "
                               f"from here; point at the run's own {name} with {flag} PATH")
    return RunInputs(paths)


def read_run_json(run_dir: Path, name: str) -> dict:
    """A run directory's state.json or metrics.json; a missing one is ConfigError (not a run directory),
    a damaged one (cut short, empty, not JSON) says so and what to do."""
    import json

    from beton_builder.base.errors import ConfigError

    path = Path(run_dir) / name
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{run_dir} has no readable {name} ({exc.strerror or exc}); pass the --output-dir of a "
                          "`ccfs-fast run` that finished at least one curriculum") from exc
    try:
        value = json.loads(text)
    except ValueError as exc:
        fix = ("`ccfs-fast run ... --resume` with the run's flags rewrites it from state.json" if name != "state.json"
               else "it cannot be rebuilt: start the run over with `ccfs-fast run ... --overwrite`")
        raise DataError(f"{path} is damaged ({'empty' if not text.strip() else 'cut short or not JSON'}: "
                        f"{' '.join(str(exc).split())[:80]}); {fix}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path} is damaged (a JSON {type(value).__name__}, not an object); rewrite it with "
                        "`ccfs-fast run ... --resume`")
    return value
