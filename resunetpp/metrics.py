"""Segmentation metrics on binary (foreground) masks, per image, then averaged.

Conventions: an image where both prediction and ground truth are empty scores Dice = IoU =
precision = recall = 1 (a perfect answer); for multi-class masks the foreground metrics average
over classes 1..K-1 that occur in either mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scores:
    dice: float
    iou: float
    precision: float
    recall: float

    def as_dict(self) -> dict[str, float]:
        return {"dice": self.dice, "iou": self.iou, "precision": self.precision, "recall": self.recall}


def _binary(pred: np.ndarray, gt: np.ndarray) -> Scores:
    p = pred.astype(bool)
    g = gt.astype(bool)
    tp = float(np.count_nonzero(p & g))
    fp = float(np.count_nonzero(p & ~g))
    fn = float(np.count_nonzero(~p & g))
    if tp + fp + fn == 0:
        return Scores(1.0, 1.0, 1.0, 1.0)
    return Scores(
        dice=2 * tp / (2 * tp + fp + fn),
        iou=tp / (tp + fp + fn),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
    )


def scores(pred: np.ndarray, gt: np.ndarray, num_classes: int = 1) -> Scores:
    """Foreground scores of one predicted mask against one ground-truth mask (same shape)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if num_classes <= 2:
        return _binary(pred > 0, gt > 0)
    per = [_binary(pred == c, gt == c) for c in range(1, num_classes) if (pred == c).any() or (gt == c).any()]
    if not per:
        return Scores(1.0, 1.0, 1.0, 1.0)
    return Scores(*(float(np.mean([getattr(s, f) for s in per])) for f in ("dice", "iou", "precision", "recall")))


def dice(pred: np.ndarray, gt: np.ndarray, num_classes: int = 1) -> float:
    return scores(pred, gt, num_classes).dice


def mean_scores(rows: list[Scores]) -> Scores:
    if not rows:
        raise ValueError("no images to average")
    return Scores(*(float(np.mean([getattr(r, f) for r in rows])) for f in ("dice", "iou", "precision", "recall")))
