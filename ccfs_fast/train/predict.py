"""Prediction over an index subset: argmax and one more column per image, filled into arrays made once."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ccfs_fast.train.losses import compute_autocast
from ccfs_fast.train.recipe import FastPath


class PredictionColumns:
    """(index int64, argmax int64, true-class logit float32) columns filled batch by batch into
    arrays made once (doubled if a loader yields more rows than it announced). Keeping each batch's
    few small result tensors instead fragments the C heap: every kept tensor is placed in the hole
    that the batch's large temporaries (logits [b, classes]) left, so the next batch's temporaries
    need fresh pages and the resident size grows with the pass (a 1.28 M-image teacher pass at
    1,000 classes: +2.5 GB)."""

    def __init__(self, rows: int):
        self.index, self.pred = np.empty(rows, np.int64), np.empty(rows, np.int64)
        self.logit = np.empty(rows, np.float32)
        self.filled = 0

    def put(self, index: torch.Tensor, pred: torch.Tensor, logit: torch.Tensor) -> None:
        stop = self.filled + len(index)
        if stop > len(self.index):
            size = max(stop, 2 * len(self.index))
            self.index, self.pred, self.logit = (np.resize(a, size) for a in (self.index, self.pred, self.logit))
        self.index[self.filled:stop] = index.cpu().numpy()
        self.pred[self.filled:stop] = pred.cpu().numpy()
        self.logit[self.filled:stop] = logit.cpu().numpy()
        self.filled = stop

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.index[:self.filled], self.pred[:self.filled], self.logit[:self.filled]


def _true_class_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, labels.view(-1, 1))[:, 0]


def _top2_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # noqa: ARG001 - a column's signature
    """(top-1 - top-2 logit) / max(1, |top-1|): how clear the argmax is, relative to the logits' size."""
    top = logits.topk(min(2, logits.shape[1]), dim=1).values
    gap = top[:, 0] - top[:, -1] if top.shape[1] > 1 else torch.full_like(top[:, 0], float("inf"))
    return gap / top[:, 0].abs().clamp_min(1.0)

# What predict's third column holds: name -> fn(logits float32 [b, C], labels [b]) -> [b].
PREDICTION_COLUMNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "logit": _true_class_logit,   # the coarse pass's audit and the `logits` score kind
    "margin": _top2_margin,       # the teacher-pass cache check (near-ties are not compared)
}


@torch.inference_mode()
def predict(model: nn.Module, loader, fast: FastPath | None = None, column: str = "logit"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over an index subset: (index int64 [m], argmax int64 [m], float32 [m]: the true-class logit,
    or with column="margin" the relative top-2 margin, PREDICTION_COLUMNS), in the loader's order. A
    row with a non-finite logit gets argmax -1 (the callers refuse it)."""
    third = PREDICTION_COLUMNS[column]
    model.eval()
    found = PredictionColumns(len(getattr(loader, "indices", ())))
    for images, labels, idx in loader:
        with compute_autocast(images.device.type, bool(fast and fast.bf16)):
            out = model(images)
        out = out.float()
        pred = torch.where(torch.isfinite(out).all(1), out.argmax(1), -1)
        found.put(idx, pred, third(out, labels))
    return found.columns()


@torch.inference_mode()
def predict_logits(model: nn.Module, loader, fast: FastPath | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """(index int64 [m], logits float32 [m, C] on the loader's device) of `model` over every batch of
    `loader`, unaugmented, in the loader's order: an image's soft label, fixed once."""
    model.eval()
    index, logits = [], []
    for images, _, idx in loader:
        with compute_autocast(images.device.type, bool(fast and fast.bf16)):
            logits.append(model(images).float())
        index.append(idx.cpu().numpy())
    if not logits:
        return np.zeros(0, np.int64), torch.zeros(0)
    return np.concatenate(index), torch.cat(logits)
