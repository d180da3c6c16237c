"""The coarse stage's pool pass (docs/design.md §1.1 step 4.3): which eligible pool images a phase's filter predicts.

`full` predicts every eligible image (teacher-correct, not yet selected). `lazy` is exact when the
fine stage's order key is known before prediction (a score file with simple / hard, or random with
its seeded key): the selection is then the first curpc coarse survivors of each class in key order
(globally, curpc x C, without balance), so eligible images are predicted in key order, chunk after
chunk, and a class stops once it has curpc survivors. A class that runs out has had every image
predicted, so the shortfall policies see what `full` would show them.

A `gate` decides eligibility only when the pass reaches an image (the lazy teacher pass: the teacher
predicts an image the first time a phase walks past it). The pass then walks every not-yet-selected
image in the same order, asks the gate about each round's images, and lets the filter predict only
those it passes; a bucket's survivors are counted exactly as when ineligible images were never in
its order, so the selection is that of a pass over the eligible images alone.

Pure functions of numpy arrays; the prediction itself is a callable the caller passes in.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from beton_builder.base.errors import UnknownNameError

COARSE_PASSES = ("lazy", "full")
MARGIN = 1.25        # a chunk aims at 25% more survivors than a class still needs
DEFAULT_RATE = 0.25  # survivor rate assumed before anything was measured
MIN_RATE = 0.02      # never plan as if fewer than 1 in 50 predicted images survive
PRIOR_IMAGES = 10    # a bucket's own rate counts after this many of its images are predicted
CPU_MIN_CHUNK = 64   # a CPU is as busy with 64 images as with 256 (ResNet-18 32x32: 161 vs 158 img/s)


def check_pass(name: str) -> str:
    if name not in COARSE_PASSES:
        raise UnknownNameError("coarse pass", name, list(COARSE_PASSES))
    return name


def ordered_buckets(eligible: np.ndarray, labels: np.ndarray, key: np.ndarray, num_classes: int,
                    balance: bool) -> list[np.ndarray]:
    """The eligible pool indices of each bucket (a class with balance; one bucket without) in
    selection order: ascending (key, index). eligible bool [n], labels int [n], key float64 [n]."""
    index = np.flatnonzero(eligible)
    bucket = labels[index] if balance else np.zeros(len(index), np.int64)
    order = np.lexsort((index, key[index], bucket))
    index, bucket = index[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange((num_classes if balance else 1) + 1))
    return [index[bounds[b]:bounds[b + 1]] for b in range(len(bounds) - 1)]


@dataclass
class PassState:
    """Progress of one phase's lazy pass: per bucket its ordered eligible indices, how many are
    predicted (a prefix) and how many of those survived the coarse stage."""

    buckets: list[np.ndarray]
    need: int
    predicted: np.ndarray = field(init=False)
    survivors: np.ndarray = field(init=False)
    rounds: int = 0

    def __post_init__(self) -> None:
        self.predicted = np.zeros(len(self.buckets), np.int64)
        self.survivors = np.zeros(len(self.buckets), np.int64)

    def open_buckets(self) -> np.ndarray:
        sizes = np.array([len(b) for b in self.buckets], np.int64)
        return np.flatnonzero((self.survivors < self.need) & (self.predicted < sizes))


def bucket_rates(state: PassState, buckets: np.ndarray, rate: float) -> np.ndarray:
    """Each bucket's survivor rate estimate: its own survivors over its predicted images, with
    PRIOR_IMAGES pseudo-images at the overall `rate`, so a class whose filter is right far more (or
    less) often than average is planned by what it showed; at least MIN_RATE. float64 [len(buckets)]."""
    shown = state.survivors[buckets] + PRIOR_IMAGES * rate
    return np.maximum(shown / (state.predicted[buckets] + PRIOR_IMAGES), MIN_RATE)


def plan_chunk(state: PassState, rate: float, min_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The next round: for every bucket still short of `need` survivors with images left, the next
    images in its order, enough to fill it at its survivor rate estimate (bucket_rates, from the
    overall `rate`, with a margin); grown together to at least `min_chunk` images so the device gets
    full batches. Returns (pool indices, bucket of each)."""
    open_ = state.open_buckets()
    if not len(open_):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rates = bucket_rates(state, open_, max(rate, MIN_RATE))
    left = np.array([len(state.buckets[b]) - state.predicted[b] for b in open_], np.int64)
    want = np.ceil((state.need - state.survivors[open_]) / rates * MARGIN).astype(np.int64)
    take = np.minimum(want, left)
    if take.sum() < min_chunk and left.sum() > take.sum():
        take = np.minimum(left, np.ceil(take * (min_chunk / max(take.sum(), 1))).astype(np.int64) + 1)
    parts = [state.buckets[b][state.predicted[b]:state.predicted[b] + t] for b, t in zip(open_, take)]
    return np.concatenate(parts), np.repeat(open_, take)


def record_chunk(state: PassState, chunk_buckets: np.ndarray, survived: np.ndarray) -> None:
    """Counts a predicted round: survived bool [m] per image of the chunk (in plan order)."""
    np.add.at(state.predicted, chunk_buckets, 1)
    np.add.at(state.survivors, chunk_buckets, survived.astype(np.int64))
    state.rounds += 1


@dataclass(frozen=True)
class PassResult:
    """What a pass predicted: index / pred / logit of every predicted image (in prediction order),
    `eligible` the eligible images it reached (with a gate: those the gate passed; else all of them),
    per class the (key, index) at which it stopped (NaN / -1: nothing to reach) and whether it
    reached every image it could (exhausted), and the rounds it took."""

    mode: str
    index: np.ndarray
    pred: np.ndarray
    logit: np.ndarray
    eligible: int
    stop_key: np.ndarray
    stop_index: np.ndarray
    exhausted: np.ndarray
    rounds: int

    @property
    def predicted(self) -> int:
        return len(self.index)


Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
Gate = Callable[[np.ndarray], np.ndarray]


def coarse_pass(mode: str, eligible: np.ndarray, labels: np.ndarray, key: np.ndarray | None, num_classes: int,
                curpc: int, balance: bool, misclassified: bool, predict: Predict, rate: float | None = None,
                min_chunk: int = 1024, gate: Gate | None = None) -> PassResult:
    """Predicts the phase's eligible pool images, all of them (`full`) or lazily in key order (`lazy`,
    needs `key`). predict(indices) -> (index, pred, logit) for those indices (any order). `rate`: the
    survivor rate to plan the first round with (e.g. the previous phase's). gate(indices) -> bool
    [len(indices)]: which of the images `eligible` marks are eligible indeed, asked only for the images
    the pass reaches (None: all of them are)."""
    check_pass(mode)
    if gate is not None and (mode == "full" or key is None):
        raise ValueError("a gate needs the lazy pass and a known key (a full pass reads every eligible image: "
                         "decide eligibility first)")
    if mode == "full" or key is None:
        index, pred, logit = predict(np.flatnonzero(eligible))
        full_key = np.full(len(labels), np.nan) if key is None else key  # logits: no key before prediction
        buckets = ordered_buckets(eligible, labels, np.zeros(len(labels)) if key is None else key, num_classes, True)
        return _result("full", index, pred, logit, eligible, buckets, [len(b) for b in buckets], full_key, 1)
    buckets = ordered_buckets(eligible, labels, key, num_classes, balance)
    state = PassState(buckets, curpc if balance else curpc * num_classes)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    reached = np.zeros(len(labels), bool)  # images the pass walked past: predicted, or refused by the gate
    passed_gate = eligible.copy() if gate is None else np.zeros(len(labels), bool)
    seen = survived_total = 0
    while True:
        measured = survived_total / seen if seen >= 200 else None
        chunk, chunk_buckets = plan_chunk(state, measured or rate or DEFAULT_RATE, min_chunk)
        if not len(chunk):
            break
        reached[chunk] = True
        ok = np.ones(len(chunk), bool) if gate is None else np.asarray(gate(chunk), bool)
        passed_gate[chunk[ok]] = True
        survived = np.zeros(len(chunk), bool)
        if ok.any():
            got_index, got_pred, got_logit = predict(np.sort(chunk[ok]))
            by_index = np.argsort(got_index)
            chunk_pred = got_pred[by_index][np.searchsorted(got_index[by_index], chunk[ok])]
            survived[ok] = (chunk_pred != labels[chunk[ok]]) == misclassified
            parts.append((got_index, got_pred, got_logit))
        record_chunk(state, chunk_buckets, survived)
        seen += len(chunk)
        survived_total += int(survived.sum())
    index, pred, logit = (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, d)
                          for k, d in ((0, np.int64), (1, np.int64), (2, np.float32)))
    class_orders = state.buckets if balance else ordered_buckets(eligible, labels, key, num_classes, True)
    if balance:
        done = list(state.predicted)
    else:  # per class: how far its own key order was reached (a prefix, since the global order is)
        done = [int(reached[order].sum()) for order in class_orders]
    return _result("lazy", index, pred, logit, passed_gate, class_orders, done, key, state.rounds)


def _result(mode: str, index, pred, logit, eligible: np.ndarray, class_orders: list[np.ndarray], done: list[int],
            key: np.ndarray, rounds: int) -> PassResult:
    classes = len(class_orders)
    stop_key, stop_index = np.full(classes, np.nan), np.full(classes, -1, np.int64)
    exhausted = np.zeros(classes, bool)
    for c, (order, count) in enumerate(zip(class_orders, done)):
        exhausted[c] = count >= len(order)
        if count:
            stop_index[c] = order[count - 1]
            stop_key[c] = key[order[count - 1]]
    return PassResult(mode, np.asarray(index, np.int64), np.asarray(pred, np.int64), np.asarray(logit, np.float32),
                      int(eligible.sum()), stop_key, stop_index, exhausted, rounds)
