"""A finished (or unfinished) run's final synthetic set, read back from its output directory: the
distilled images it used (the first cpc of each class, class after class) and then the real images
it selected (curriculum after curriculum, each in the order chosen: easiest first within a class),
with their labels, curricula and difficulty scores; and the images themselves, as stored."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.errors import DataError
from beton_builder.beton import BetonFile
from ccfs_fast.data.readers import iterate_rows, read_labels, stored_bytes
from ccfs_fast.data.space import class_map, pool_labels_of
from ccfs_fast.runs.config import distilled_shortage
from ccfs_fast.runs.run_inputs import input_places, read_run_json, resolve_run_inputs
from ccfs_fast.selection.scores import pool_order_scores, score_kind

READ_BATCH = 512


@dataclass
class RunSet:
    """The set in the run's training order. Distilled part: `distilled_rows` (rows of the distilled
    .beton) with `distilled_labels`; real part: `selected` (pool indices) with `selected_labels`,
    `curriculum` (1-based) and `scores` (the score file's value, or the filter's true-class logit for
    --score logits; NaN where unknown)."""

    run_dir: Path
    settings: dict
    pool: BetonFile
    distilled: BetonFile
    distilled_rows: np.ndarray
    distilled_labels: np.ndarray
    selected: np.ndarray
    selected_labels: np.ndarray
    curriculum: np.ndarray
    scores: np.ndarray
    complete: bool
    phases_done: int
    input_places: tuple[Path, ...] = ()  # where the run's inputs are (run_inputs.input_places)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.pool.manifest.class_names

    @property
    def size(self) -> int:
        return len(self.distilled_rows) + len(self.selected)

    @property
    def labels(self) -> np.ndarray:
        """int64 [size]: every image's label in the set's order."""
        return np.concatenate([self.distilled_labels, self.selected_labels])


def read_run_state(run_dir: Path) -> tuple[dict, dict]:
    """(state.json, selected_indices.json) of a run directory; one-line errors for a missing or damaged one."""
    return read_run_json(run_dir, "state.json"), read_run_json(run_dir, "selected_indices.json")


SET_INPUTS = ("pool", "distilled", "score_path")  # what a run's set is read from


def open_run_set(run_dir: str | Path, given: dict[str, Path] | None = None) -> RunSet:
    """The run's set (see RunSet), its .beton files opened (and checked against their manifests). Its
    inputs are the run's own, found and checked by run_inputs (`given`: where a flag says one is now)."""
    run_dir = Path(run_dir)
    state, selection = read_run_state(run_dir)
    settings = state["settings"]
    inputs = resolve_run_inputs(state, run_dir, SET_INPUTS, given)
    pool, distilled = BetonFile.open(inputs["pool"]), BetonFile.open(inputs["distilled"])
    cpc = int(settings["image_per_class"] * settings["alpha"] + 1e-9)
    labels = pool_labels_of(class_map(pool, distilled), read_labels(distilled))  # as the pool's labels
    rows = []
    for c, name in enumerate(pool.manifest.class_names):
        members = np.flatnonzero(labels == c)
        if len(members) < cpc:
            raise DataError(distilled_shortage(distilled.path, name, c, len(members), cpc))
        rows.append(members[:cpc])
    distilled_rows = np.concatenate(rows).astype(np.int64)
    selected = np.asarray(selection["idx_selected"], np.int64)
    counts = [p["selected"] for p in state["phases"]]
    curriculum = np.repeat(np.arange(1, len(counts) + 1), counts)[:len(selected)]
    return RunSet(run_dir, settings, pool, distilled, distilled_rows, labels[distilled_rows], selected,
                  read_labels(pool)[selected], curriculum,
                  _selected_scores(run_dir, settings, inputs.get("score_path"), pool, selected, curriculum),
                  bool(selection.get("complete")), int(selection.get("phases_done", len(counts))),
                  tuple(input_places(state, run_dir, given)))


def _selected_scores(run_dir: Path, settings: dict, score_path: Path | None, pool: BetonFile, selected: np.ndarray,
                     curriculum: np.ndarray) -> np.ndarray:
    """The difficulty score of each selected image in the score kind's own units (NaN where unknown)."""
    if score_kind(settings["score"]).from_file:
        return pool_order_scores(score_path, pool.path)[selected].astype(np.float64)
    out = np.full(len(selected), np.nan)
    for k in np.unique(curriculum):  # --score logits: the phase filter's true-class logit (its audit file)
        path = run_dir / f"phase{k}_candidates.npz"
        if path.is_file():
            with np.load(path) as audit:
                logit = dict(zip(audit["index"].tolist(), audit["logit"].tolist()))
            mine = np.flatnonzero(curriculum == k)
            out[mine] = [logit.get(int(i), np.nan) for i in selected[mine]]
    return out


def images(beton: BetonFile, rows: np.ndarray) -> Iterator[np.ndarray | bytes]:
    """The images of `rows` in that order, as stored: uint8 [h, w, 3] pixels of a raw .beton, the
    encoded JPEG bytes of a JPEG one (stored_bytes)."""
    if beton.manifest.variable_size:
        yield from stored_bytes(beton, rows)
        return
    rows = np.asarray(rows, np.int64)
    for start in range(0, len(rows), READ_BATCH):
        for batch in iterate_rows(beton, rows[start:start + READ_BATCH], READ_BATCH, 2):
            yield from batch[0].numpy()
