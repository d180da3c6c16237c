"""CCFS selection as pure functions of arrays (no torch, no I/O): the curriculum arrangement, the
coarse candidate mask, and the fine per-class top-k with shortfall policies (docs/design.md §1.1 steps 2, 4.3-4.5).

Ordering convention: every method turns scores into an `order key` where LOWER is picked FIRST, ties
broken by ascending pool index. The numba kernel buckets the masked pool by class in one pass and
keeps the k best of each bucket with a bounded heap (never sorting the whole pool).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from beton_builder.base.errors import ConfigError, SelectionError, UnknownNameError


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
    """Coarse stage. bool [n]: teacher-correct, not yet selected, predicted by the filter, and
    misclassified by it (`misclassified`, the paper's setting) or classified correctly.
    `filter_pred` int [n]: the filter's argmax, -1 where the image was not predicted (a lazy pass
    stops early; an unpredicted image is never a coarse survivor, so the counts are what was seen)."""
    eligible = teacher_correct & ~selected & (filter_pred >= 0)
    agrees = filter_pred == labels
    return eligible & (~agrees if misclassified else agrees)


@njit(cache=True, inline="always")
def _before(key_a: float, idx_a: int, key_b: float, idx_b: int) -> bool:
    return key_a < key_b or (key_a == key_b and idx_a < idx_b)


@njit(cache=True, inline="always")
def _swap(keys: np.ndarray, idx: np.ndarray, a: int, b: int) -> None:
    keys[a], keys[b] = keys[b], keys[a]
    idx[a], idx[b] = idx[b], idx[a]


@njit(cache=True)
def _partition_k(keys: np.ndarray, idx: np.ndarray, k: int) -> None:
    """In place: moves the k smallest (key, index) pairs to [0, k), in no order (quickselect,
    Hoare partition, median-of-three pivot; pairs are distinct since indices are)."""
    lo, hi = 0, keys.shape[0] - 1
    target = k - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _before(keys[mid], idx[mid], keys[lo], idx[lo]):
            _swap(keys, idx, mid, lo)
        if _before(keys[hi], idx[hi], keys[lo], idx[lo]):
            _swap(keys, idx, hi, lo)
        if _before(keys[hi], idx[hi], keys[mid], idx[mid]):
            _swap(keys, idx, hi, mid)
        pivot_key, pivot_idx = keys[mid], idx[mid]
        i, j = lo, hi
        while i <= j:
            while _before(keys[i], idx[i], pivot_key, pivot_idx):
                i += 1
            while _before(pivot_key, pivot_idx, keys[j], idx[j]):
                j -= 1
            if i <= j:
                _swap(keys, idx, i, j)
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return


@njit(cache=True)
def _sift_down(keys: np.ndarray, idx: np.ndarray, size: int, pos: int) -> None:
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        if child + 1 < size and _before(keys[child], idx[child], keys[child + 1], idx[child + 1]):
            child += 1
        if not _before(keys[pos], idx[pos], keys[child], idx[child]):
            return
        _swap(keys, idx, pos, child)
        pos = child


@njit(cache=True)
def _sort_pairs(keys: np.ndarray, idx: np.ndarray, size: int) -> None:
    """In-place heapsort of the first `size` (key, index) pairs, ascending."""
    for pos in range(size // 2 - 1, -1, -1):
        _sift_down(keys, idx, size, pos)
    for end in range(size - 1, 0, -1):
        _swap(keys, idx, 0, end)
        _sift_down(keys, idx, end, 0)


@njit(cache=True)
def _best_k(keys: np.ndarray, idx: np.ndarray, k: int, out: np.ndarray) -> None:
    """Writes the k best pool indices of one bucket by (key, index), best first, into out[:k].
    keys float64 [m] / idx int64 [m] are the bucket's scratch copies (reordered in place), k <= m.
    O(m + k log k): quickselect, then a heapsort of the k kept; no allocation."""
    if k == 0:
        return
    if k < keys.shape[0]:
        _partition_k(keys, idx, k)
    _sort_pairs(keys, idx, k)
    for j in range(k):
        out[j] = idx[j]


@njit(cache=True, parallel=True)
def _group_by_bucket(mask: np.ndarray, bucket: np.ndarray, num_buckets: int, keys: np.ndarray, chunks: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counting sort of the masked pool by bucket, index order kept within a bucket. The pool is cut
    into one chunk per thread; each thread counts, then scatters its chunk into its own sub-ranges.
    Returns (starts int64 [B+1], members int64 [B], grouped idx int64 [M], grouped key float64 [M])."""
    n = mask.shape[0]
    counts = np.zeros((chunks, num_buckets), np.int64)
    for t in prange(chunks):
        for i in range(t * n // chunks, (t + 1) * n // chunks):
            counts[t, bucket[i]] += mask[i]  # branch-free: 8x faster than `if mask[i]` on a mixed mask
    members = counts.sum(axis=0)
    starts = np.zeros(num_buckets + 1, np.int64)
    for b in range(num_buckets):
        starts[b + 1] = starts[b] + members[b]
    offsets = np.empty((chunks, num_buckets), np.int64)
    for b in range(num_buckets):
        running = starts[b]
        for t in range(chunks):
            offsets[t, b] = running
            running += counts[t, b]
    grouped_idx = np.empty(starts[num_buckets], np.int64)
    grouped_key = np.empty(starts[num_buckets], np.float64)
    for t in prange(chunks):
        fill = offsets[t]
        for i in range(t * n // chunks, (t + 1) * n // chunks):
            if mask[i]:
                slot = fill[bucket[i]]
                grouped_idx[slot] = i
                grouped_key[slot] = keys[i]
                fill[bucket[i]] = slot + 1
    return starts, members, grouped_idx, grouped_key


def select_buckets(mask: np.ndarray, bucket: np.ndarray, num_buckets: int, keys: np.ndarray,
                   budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each bucket b, the min(budgets[b], members) masked pool indices with the lowest
    (key, index), best first. mask bool [n], bucket int64 [n] in [0, num_buckets), keys float64 [n],
    budgets int64 [num_buckets]. Returns (picked int64 [sum taken] bucket after bucket,
    taken int64 [num_buckets], members int64 [num_buckets])."""
    chunks = max(1, min(numba.get_num_threads(), len(mask) // 65536))  # one pool chunk per thread
    return _select_buckets(mask, bucket, num_buckets, keys, budgets, chunks)


@njit(cache=True, parallel=True)
def _select_buckets(mask: np.ndarray, bucket: np.ndarray, num_buckets: int, keys: np.ndarray,
                    budgets: np.ndarray, chunks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, members, grouped_idx, grouped_key = _group_by_bucket(mask, bucket, num_buckets, keys, chunks)
    taken = np.minimum(members, budgets)
    out_starts = np.zeros(num_buckets + 1, np.int64)
    for b in range(num_buckets):
        out_starts[b + 1] = out_starts[b] + taken[b]
    picked = np.empty(out_starts[num_buckets], np.int64)
    for b in prange(num_buckets):
        lo, hi = starts[b], starts[b + 1]
        _best_k(grouped_key[lo:hi], grouped_idx[lo:hi], taken[b], picked[out_starts[b]:out_starts[b + 1]])
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
    """float64 [n]: the order the fine stage picks in, lower first: `simple` the easy-first key itself
    (easy_first_key of the scores), `hard` its reverse, `random` a uniform key drawn from `seed`."""
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
    buckets, num_buckets = (labels, num_classes) if balance else (np.zeros_like(labels), 1)
    budgets = np.full(num_buckets, per_class if balance else per_class * num_classes, np.int64)
    picked, taken, members = select_buckets(candidates, buckets, num_buckets, key, budgets)
    cand_counts = members if balance else np.bincount(labels[candidates], minlength=num_classes).astype(np.int64)
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
