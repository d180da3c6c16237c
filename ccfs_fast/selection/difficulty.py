"""Difficulty scores computed by ccfs-fast itself: forgetting events (Toneva et al. 2019)."""
from __future__ import annotations

import numpy as np


class ForgettingTracker:
    """Forgetting events (Toneva et al. 2019) over the presentations of each pool image: a
    correct -> incorrect transition between consecutive presentations. Images never classified
    correctly get max(events) + 1, ranking them hardest."""

    def __init__(self, n: int):
        self.last_correct = np.zeros(n, bool)
        self.learned = np.zeros(n, bool)
        self.events = np.zeros(n, np.int64)

    def update(self, index: np.ndarray, correct: np.ndarray) -> None:
        forgot = self.last_correct[index] & ~correct
        np.add.at(self.events, index[forgot], 1)
        self.last_correct[index] = correct
        self.learned[index] |= correct

    def scores(self) -> np.ndarray:
        out = self.events.astype(np.float32)
        out[~self.learned] = float(self.events.max(initial=0) + 1)
        return out
