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
    engine: dict = field(default_factory=dict)  # Engine.describe() of what ran (evaluate_path)

    def as_dict(self) -> dict:
        out = {"n": self.n, **self.mean.as_dict(), "images": self.rows}
        if self.engine:
            out["engine"] = self.engine
        return out

    def worst(self, n: int) -> list[dict]:
        """The ``n`` per-image rows with the lowest Dice, lowest first (ties: image name)."""
        return sorted(self.rows, key=lambda r: (r["dice"], r["image"]))[:max(0, n)]


def comparison_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.45):
    """``image`` (H, W, C uint8) with ground truth against prediction: green where both mark the
    foreground, red where only the prediction does (false positive), yellow where only the ground
    truth does (missed). A PIL RGB image."""
    from PIL import Image

    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    out = rgb.astype(np.float32)
    p, t = pred > 0, truth > 0
    for where, colour in ((p & t, (0, 200, 0)), (p & ~t, (230, 0, 0)), (~p & t, (255, 220, 0))):
        out[where] = out[where] * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def write_comparison_overlay(folder: Path, sample: Sample, pred: np.ndarray, truth: np.ndarray,
                             channels: int) -> Path:
    """``folder/<stem>_overlay.png`` (:func:`comparison_overlay`), written atomically."""
    from resunetpp.atomic import atomic_path
    from resunetpp.imageio import read_image

    image = read_image(sample.image_path, channels=channels)
    path = Path(folder) / f"{sample.stem}_overlay.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            comparison_overlay(image, pred, truth).save(tmp, format="PNG")
    except OSError as e:
        raise ResUNetError(f"{path}: cannot write the overlay ({e.strerror or e})") from None
    return path


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
             threshold: float = 0.5, progress: Callable[[int], None] | None = None,
             overlay_dir: Path | None = None) -> EvalResult:
    """Score ``predict`` on ``dataset``; with ``overlay_dir``, also write each image's ground truth
    against prediction there (:func:`write_comparison_overlay`)."""
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
        if overlay_dir is not None:
            write_comparison_overlay(overlay_dir, sample, pred, mask, pre.channels)
        if progress:
            progress(1)
    if not rows:
        raise ValueError("no image with a ground-truth mask to evaluate")
    return EvalResult(len(rows), mean_scores(rows), out_rows)


def evaluate_path(model_path: str | Path, data: str | Path, split: str | Path | None = None, *,
                  batch_size: int = 1, device: str = "auto", threshold: float = 0.5,
                  show_progress: bool = False, backend: str = "auto", engine_options: dict | None = None,
                  overlay_dir: Path | None = None) -> EvalResult:
    """Evaluate the model file ``model_path`` on the Kvasir-SEG-layout folder ``data``.

    ``model_path`` is any artifact :func:`engines.open` runs (a checkpoint, ``.onnx``, ``.xml``,
    ``.engine``), on ``backend`` (``auto``: the one its suffix picks) with ``engine_options`` (the
    backend's ``-O KEY=VALUE`` options); ``device`` is that backend's. The engine is
    loaded before any image is read, so model problems surface first. ``split`` is a split file
    or a name such as ``val`` (``DATA/val.txt``); ``None`` takes every image. Scores are computed
    per image at the original mask resolution, then averaged. Problems with any input raise
    :class:`~resunetpp.errors.ResUNetError` naming the file.
    """
    if batch_size < 1:
        raise ResUNetError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0.0 < threshold < 1.0:
        raise ResUNetError(f"threshold must be between 0 and 1, got {threshold}")
    with engines.open(model_path, backend=backend, device=device, **(engine_options or {})) as engine:
        try:
            dataset = SegmentationDataset(data, split, engine.num_classes, channels=engine.preprocessing.channels)
            if not show_progress:
                result = evaluate(engine.predict, dataset, engine.preprocessing, batch_size, threshold,
                                  overlay_dir=overlay_dir)
            else:
                from rich.progress import Progress

                with Progress(transient=True) as bar:
                    task = bar.add_task(f"evaluating {Path(model_path).name}", total=len(dataset))
                    result = evaluate(engine.predict, dataset, engine.preprocessing, batch_size, threshold,
                                      progress=lambda k: bar.advance(task, k), overlay_dir=overlay_dir)
        except FloatingPointError as e:
            raise ResUNetError(str(e)) from None
        result.engine = {k: v for k, v in engine.describe().items() if k != "file"}
        return result


def results_table(result: EvalResult, title: str = "evaluation"):
    """A rich table of the mean scores (the per-image rows go to ``--json``); the title names the
    backend, device and precision that ran."""
    from rich.table import Table

    from resunetpp.engines.base import engine_line

    if result.engine:
        title = f"{title}: {engine_line(result.engine)}"
    table = Table(title=title, title_justify="left")
    table.add_column("images", justify="right")
    for name in ("Dice", "IoU", "precision", "recall"):
        table.add_column(name, justify="right")
    m = result.mean
    table.add_row(str(result.n), *(f"{v:.4f}" for v in (m.dice, m.iou, m.precision, m.recall)))
    return table


def worst_table(result: EvalResult, n: int):
    """A rich table of the ``n`` images with the lowest Dice."""
    from rich.table import Table

    table = Table(title=f"worst {min(n, result.n)} of {result.n} images by Dice", title_justify="left")
    table.add_column("image")
    for name in ("Dice", "IoU", "precision", "recall"):
        table.add_column(name, justify="right")
    for r in result.worst(n):
        table.add_row(r["image"], *(f"{r[k]:.4f}" for k in ("dice", "iou", "precision", "recall")))
    return table
