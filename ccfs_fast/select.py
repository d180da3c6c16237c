"""CCFS selection as pure functions of arrays (no torch, no I/O): the curriculum arrangement, the
coarse candidate mask, and the fine per-class top-k with shortfall policies (design §1 steps 2, 4c-4e).

Ordering convention: every method turns scores into an `order key` where LOWER is picked FIRST, ties
broken by ascending pool index. The numba kernel buckets the masked pool by class in one pass and
keeps the k best of each bucket with a bounded heap (never sorting the whole pool).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .errors import ConfigError, SelectionError, UnknownNameError


def curriculum_arrangement(spc: int, phases: int) -> list[int]:
    """Images per class per phase: spc // phases each, the remainder one each to the first phases
    (spc=40, phases=3 -> [14, 13, 13])."""
    if phases < 1:
        raise ConfigError(f"--curriculum-num must be at least 1, got {phases}")
    if spc < phases:
        raise ConfigError(f"{spc} real images per class to select cannot fill {phases} curricula; use "
                          f"--curriculum-num {max(spc, 1)} or fewer, or a larger --image-per-class")
    base, extra = divmod(spc, phases)
    return [base + (1 if k < extra else 0) for k in range(phases)]


def candidate_mask(teacher_correct: np.ndarray, selected: np.ndarray, filter_pred: np.ndarray,
                   labels: np.ndarray, misclassified: bool = True) -> np.ndarray:
    """Coarse stage. bool [n]: teacher-correct, not yet selected, and misclassified by the filter
    (`misclassified`, the paper's setting) or classified correctly. `filter_pred` int [n] needs
    values only where teacher_correct & ~selected (others, e.g. -1, are ignored)."""
    eligible = teacher_correct & ~selected
    agrees = filter_pred == labels
    return eligible & (~agrees if misclassified else agrees)


@njit(cache=True, inline="always")
def _before(key_a: float, idx_a: int, key_b: float, idx_b: int) -> bool:
    return key_a < key_b or (key_a == key_b and idx_a < idx_b)


@njit(cache=True)
def _sift_down(heap: np.ndarray, keys: np.ndarray, size: int, pos: int) -> None:
    # Max-heap on (key, index): the root is the worst of the kept items.
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        right = child + 1
        if right < size and _before(keys[heap[child]], heap[child], keys[heap[right]], heap[right]):
            child = right
        if _before(keys[heap[pos]], heap[pos], keys[heap[child]], heap[child]):
            heap[pos], heap[child] = heap[child], heap[pos]
            pos = child
        else:
            return


@njit(cache=True)
def _best_k(members: np.ndarray, keys: np.ndarray, k: int, out: np.ndarray) -> None:
    """Writes the k best of `members` (pool indices) by (key, index), best first, into out[:k]."""
    if k == 0:
        return
    heap = np.empty(k, np.int64)
    size = 0
    for idx in members:
        if size < k:
            heap[size] = idx
            size += 1
            if size == k:
                for pos in range(k // 2 - 1, -1, -1):
                    _sift_down(heap, keys, k, pos)
        elif _before(keys[idx], idx, keys[heap[0]], heap[0]):
            heap[0] = idx
            _sift_down(heap, keys, k, 0)
    if size < k:  # fewer members than k cannot happen: callers pass k <= len(members)
        return
    for end in range(k - 1, -1, -1):  # heap sort: repeatedly move the worst to the back
        out[end] = heap[0]
        heap[0] = heap[end]
        _sift_down(heap, keys, end, 0)


@njit(cache=True, parallel=True)
def select_buckets(mask: np.ndarray, bucket: np.ndarray, num_buckets: int, keys: np.ndarray,
                   budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each bucket b, the min(budgets[b], members) masked pool indices with the lowest
    (key, index), best first. mask bool [n], bucket int64 [n] in [0, num_buckets), keys float64 [n],
    budgets int64 [num_buckets]. Returns (picked int64 [sum taken] bucket after bucket,
    taken int64 [num_buckets], members int64 [num_buckets])."""
    n = mask.shape[0]
    members = np.zeros(num_buckets, np.int64)
    for i in range(n):
        if mask[i]:
            members[bucket[i]] += 1
    starts = np.zeros(num_buckets + 1, np.int64)
    for b in range(num_buckets):
        starts[b + 1] = starts[b] + members[b]
    grouped = np.empty(starts[num_buckets], np.int64)
    fill = starts[:-1].copy()
    for i in range(n):  # one pass: pool indices grouped by bucket, ascending within each
        if mask[i]:
            grouped[fill[bucket[i]]] = i
            fill[bucket[i]] += 1
    taken = np.minimum(members, budgets)
    out_starts = np.zeros(num_buckets + 1, np.int64)
    for b in range(num_buckets):
        out_starts[b + 1] = out_starts[b] + taken[b]
    picked = np.empty(out_starts[num_buckets], np.int64)
    for b in prange(num_buckets):
        _best_k(grouped[starts[b]:starts[b + 1]], keys, taken[b], picked[out_starts[b]:out_starts[b + 1]])
    return picked, taken, members


def warm_up_kernels() -> float:
    """Compiles (or loads from numba's on-disk cache) the kernels; returns the seconds it took."""
    start = time.perf_counter()
    mask = np.ones(4, dtype=np.bool_)
    select_buckets(mask, np.zeros(4, np.int64), 1, np.zeros(4), np.ones(1, np.int64))
    return time.perf_counter() - start


# --- selection methods: name -> order key (lower first) -------------------------------------------

OrderKey = Callable[[np.ndarray, int], np.ndarray]

SELECTION_METHODS: dict[str, OrderKey] = {
    # easy_key: float64 [n], lower = easier (from the score kind's direction).
    "simple": lambda easy_key, seed: easy_key,
    "hard": lambda easy_key, seed: -easy_key,
    # uniform without replacement: one seeded uniform draw per pool index, lowest first
    "random": lambda easy_key, seed: np.random.default_rng(seed).random(len(easy_key)),
}

SHORTFALL_POLICIES = ("fill", "strict", "short")


def order_key(method: str, easy_key: np.ndarray, seed: int) -> np.ndarray:
    if method not in SELECTION_METHODS:
        raise UnknownNameError("selection method", method, list(SELECTION_METHODS))
    return np.ascontiguousarray(SELECTION_METHODS[method](np.asarray(easy_key, np.float64), seed), np.float64)


@dataclass(frozen=True)
class Selection:
    """One phase's fine-stage result. indices int64 [k] in selection order; per class int64 [C]:
    candidates (coarse survivors), picked from the candidates, and filled (the `fill` top-up).
    `budget` is the phase's total (curpc * C); `unmet` = budget - k, non-zero only under `short`
    or when a class (or the pool) ran dry even after filling."""

    indices: np.ndarray
    candidates_per_class: np.ndarray
    picked_per_class: np.ndarray
    filled_per_class: np.ndarray
    budget: int

    @property
    def selected_per_class(self) -> np.ndarray:
        return self.picked_per_class + self.filled_per_class

    @property
    def unmet(self) -> int:
        return self.budget - len(self.indices)


def select_per_class(candidates: np.ndarray, labels: np.ndarray, num_classes: int, key: np.ndarray,
                     per_class: int, balance: bool = True, shortfall: str = "fill",
                     fill_pool: np.ndarray | None = None) -> Selection:
    """Fine stage. candidates bool [n]; labels int [n]; key float64 [n] (lower first, see
    `order_key`); per_class = curpc. balance: curpc per class, class after class; else the
    curpc * C best overall. Shortfall: `fill` tops a short class (or the global budget) up from
    `fill_pool` (bool [n], e.g. teacher-correct & not selected) minus the candidates, by the same
    key; `strict` raises SelectionError; `short` keeps what there is."""
    if shortfall not in SHORTFALL_POLICIES:
        raise UnknownNameError("shortfall policy", shortfall, list(SHORTFALL_POLICIES))
    labels = np.ascontiguousarray(labels, np.int64)
    key = np.ascontiguousarray(key, np.float64)
    candidates = np.ascontiguousarray(candidates, np.bool_)
    cand_counts = np.bincount(labels[candidates], minlength=num_classes).astype(np.int64)
    buckets, num_buckets = (labels, num_classes) if balance else (np.zeros_like(labels), 1)
    budgets = np.full(num_buckets, per_class if balance else per_class * num_classes, np.int64)
    picked, taken, _ = select_buckets(candidates, buckets, num_buckets, key, budgets)
    deficit = budgets - taken
    if deficit.any() and shortfall == "strict":
        raise SelectionError(_strict_message(deficit, taken, balance, per_class, num_classes))
    filled = np.zeros(0, np.int64)
    if deficit.any() and shortfall == "fill":
        if fill_pool is None:
            raise ConfigError("the `fill` shortfall policy needs a fill pool (teacher-correct, not selected)")
        extra_mask = np.ascontiguousarray(fill_pool, np.bool_) & ~candidates
        filled, _, _ = select_buckets(extra_mask, buckets, num_buckets, key, deficit)
    return Selection(_merge_class_major(picked, filled, labels, balance), cand_counts,
                     np.bincount(labels[picked], minlength=num_classes).astype(np.int64),
                     np.bincount(labels[filled], minlength=num_classes).astype(np.int64),
                     int(per_class * num_classes))


def _merge_class_major(picked: np.ndarray, filled: np.ndarray, labels: np.ndarray, balance: bool) -> np.ndarray:
    """Selection order: balanced -> class by class, each class's candidates then its top-up;
    global -> all candidates, then the top-up. Both inputs are bucket-major already."""
    if not balance or len(filled) == 0:
        return np.concatenate([picked, filled]).astype(np.int64)
    order = np.argsort(np.concatenate([labels[picked] * 2, labels[filled] * 2 + 1]), kind="stable")
    return np.concatenate([picked, filled])[order].astype(np.int64)


def _strict_message(deficit: np.ndarray, taken: np.ndarray, balance: bool, per_class: int, num_classes: int) -> str:
    if not balance:
        return (f"only {taken[0]} candidates for a budget of {per_class * num_classes} images; use "
                "--shortfall fill or short")
    short = np.flatnonzero(deficit)
    c = short[0]
    return (f"class {c} has {taken[c]} candidates but {per_class} images are to be selected "
            f"({len(short)} classes short); use --shortfall fill (top up from teacher-correct images) or short")
