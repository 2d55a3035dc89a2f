"""Evaluation at the original mask resolution, for any backend that maps images to probabilities.

``predict`` takes a float32 ``(N, C, h, w)`` batch of preprocessed images and returns float
``(N, K, h, w)`` probabilities; every engine's :meth:`~resunetpp.engines.Engine.predict` is one
(:func:`evaluate_path` opens the model with :func:`engines.open`). Each prediction is restored to its image's original size, binarised (threshold
0.5, or argmax), and scored per image; the means are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resunetpp import engines
from resunetpp.data import Sample, SegmentationDataset
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.metrics import Scores, mean_scores, scores
from resunetpp.preprocess import Preprocessing, probs_to_mask

PredictFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class EvalResult:
    n: int
    mean: Scores
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"n": self.n, **self.mean.as_dict(), "images": self.rows}


def batched_predictions(predict: PredictFn, items: Iterable[tuple[Sample, np.ndarray, np.ndarray | None]],
                        pre: Preprocessing, batch_size: int = 1,
                        ) -> Iterator[tuple[Sample, np.ndarray, np.ndarray | None]]:
    """Yield ``(sample, probs at original size, mask)``; batches group images of equal input size."""
    pending: list[tuple[Sample, np.ndarray | None, tuple[int, int], np.ndarray]] = []

    def flush():
        x = np.stack([p[3] for p in pending])
        probs = np.asarray(predict(x), dtype=np.float32)
        for (s, m, (h, w), _), pr in zip(pending, probs):
            yield s, pre.restore(pr, h, w), m
        pending.clear()

    for sample, image, mask in items:
        try:
            x = pre.apply(image)
        except ValueError as e:  # e.g. an image over the 'pad' mode's largest network input
            raise InputFileError(sample.image_path, f"cannot preprocess ({e})") from None
        if pending and (len(pending) >= batch_size or pending[0][3].shape != x.shape):
            yield from flush()
        pending.append((sample, mask, image.shape[:2], x))
    if pending:
        yield from flush()


def evaluate(predict: PredictFn, dataset: SegmentationDataset, pre: Preprocessing, batch_size: int = 1,
             threshold: float = 0.5, progress: Callable[[int], None] | None = None) -> EvalResult:
    rows: list[Scores] = []
    out_rows: list[dict] = []
    for sample, probs, mask in batched_predictions(predict, dataset, pre, batch_size):
        if mask is None:
            continue
        if not np.isfinite(probs).all():
            raise FloatingPointError(f"{sample.image_path}: the model produced NaN or Inf")
        pred = probs_to_mask(probs, threshold)
        sc = scores(pred, mask, dataset.num_classes if dataset.num_classes > 1 else 1)
        rows.append(sc)
        out_rows.append({"image": sample.stem, **sc.as_dict()})
        if progress:
            progress(1)
    if not rows:
        raise ValueError("no image with a ground-truth mask to evaluate")
    return EvalResult(len(rows), mean_scores(rows), out_rows)


def evaluate_path(model_path: str | Path, data: str | Path, split: str | Path | None = None, *,
                  batch_size: int = 1, device: str = "auto", threshold: float = 0.5,
                  show_progress: bool = False) -> EvalResult:
    """Evaluate the model file ``model_path`` on the Kvasir-SEG-layout folder ``data``.

    ``model_path`` is any artifact :func:`engines.open` runs (a checkpoint, ``.onnx``, ``.xml``,
    ``.engine``), on the backend its suffix picks; ``device`` is that backend's. The engine is
    loaded before any image is read, so model problems surface first. ``split`` is a split file
    or a name such as ``val`` (``DATA/val.txt``); ``None`` takes every image. Scores are computed
    per image at the original mask resolution, then averaged. Problems with any input raise
    :class:`~resunetpp.errors.ResUNetError` naming the file.
    """
    if batch_size < 1:
        raise ResUNetError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0.0 < threshold < 1.0:
        raise ResUNetError(f"threshold must be between 0 and 1, got {threshold}")
    with engines.open(model_path, device=device) as engine:
        try:
            dataset = SegmentationDataset(data, split, engine.num_classes, channels=engine.preprocessing.channels)
            if not show_progress:
                return evaluate(engine.predict, dataset, engine.preprocessing, batch_size, threshold)
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task(f"evaluating {Path(model_path).name}", total=len(dataset))
                return evaluate(engine.predict, dataset, engine.preprocessing, batch_size, threshold,
                                progress=lambda k: bar.advance(task, k))
        except FloatingPointError as e:
            raise ResUNetError(str(e)) from None


def results_table(result: EvalResult, title: str = "evaluation"):
    """A rich table of the mean scores (the per-image rows go to ``--json``)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("images", justify="right")
    for name in ("Dice", "IoU", "precision", "recall"):
        table.add_column(name, justify="right")
    m = result.mean
    table.add_row(str(result.n), *(f"{v:.4f}" for v in (m.dice, m.iou, m.precision, m.recall)))
    return table
