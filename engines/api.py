"""The one-call Python API: ``resunetpp.load(...)`` and a model that segments images.

::

    import resunetpp

    model = resunetpp.load("dist/openvino/model_int8.xml")   # any artifact, or "default"
    mask = model.predict("polyp.jpg")                          # (H, W) uint8 at the image's size
    probs = model.predict_proba(pil_image)                     # (K, H, W) float32 at the image's size
    for mask in model.predict_many(paths_or_arrays, batch_size=4):
        ...
    model.info()                                               # backend, device, precision, classes

An image is a path, a PIL image or an ``(H, W, 3)`` / ``(H, W)`` uint8 array. Preprocessing,
the engine call, restoring to the original size and thresholding are the ones ``resunetpp
infer`` runs (the artifact's own record); masks are 0/1 for one class, class indices for
several.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp.defaults import resolve_model
from resunetpp.engines.base import Engine
from resunetpp.errors import ResUNetError
from resunetpp.imageio import read_image
from resunetpp.preprocess import probs_to_mask

__all__ = ["SegmentationModel", "load"]


def _as_array(image: Any, channels: int) -> np.ndarray:
    """A path, PIL image or uint8 array as ``(H, W, channels)`` uint8."""
    if isinstance(image, (str, Path)):
        return read_image(image, channels=channels)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    if not isinstance(image, np.ndarray):
        raise ResUNetError(f"cannot segment a {type(image).__name__}: pass a path, a PIL image or an "
                           "(H, W, 3) uint8 array")
    if image.dtype != np.uint8:
        raise ResUNetError(f"image array has dtype {image.dtype}; expected uint8 (0-255)")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] not in (1, 3, 4):
        raise ResUNetError(f"image array has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 1 and image.shape[2] == 3:  # ITU-R 601 luma, as PIL's "L"
        image = (image @ np.array([299, 587, 114]) // 1000).astype(np.uint8)[:, :, None]
    return np.ascontiguousarray(image)


class SegmentationModel:
    """A loaded artifact that segments images; see the module docstring. Close it (or use ``with``)."""

    def __init__(self, engine: Engine, threshold: float = 0.5, input_warnings: bool = True) -> None:
        import warnings

        from resunetpp.input_checks import InputWarner

        if not 0.0 < threshold < 1.0:
            raise ResUNetError(f"threshold must be between 0 and 1, got {threshold}")
        self.engine = engine
        self.threshold = threshold
        #: One ``UserWarning`` for the first grayscale or tiny image this model sees.
        self.input_warner = InputWarner(lambda line: warnings.warn(line, UserWarning, stacklevel=4),
                                        engine.preprocessing.channels, enabled=input_warnings,
                                        silence_hint="; load(..., input_warnings=False) silences it")

    # ---- the API -------------------------------------------------------------------------------
    def predict_proba(self, image: Any) -> np.ndarray:
        """Class probabilities ``(K, H, W)`` float32 at the image's own size."""
        return next(self._probs([image], 1))

    def predict(self, image: Any) -> np.ndarray:
        """The mask ``(H, W)`` uint8 at the image's own size (0/1, or class indices)."""
        return probs_to_mask(self.predict_proba(image), self.threshold)

    def predict_many(self, images: Iterable[Any], batch_size: int = 1, proba: bool = False) -> Iterator[np.ndarray]:
        """Masks (or probabilities with ``proba=True``) of ``images``, in order, ``batch_size`` per engine
        call (consecutive images of equal network input size are batched)."""
        if batch_size < 1:
            raise ResUNetError(f"batch_size must be at least 1, got {batch_size}")
        for probs in self._probs(images, batch_size):
            yield probs if proba else probs_to_mask(probs, self.threshold)

    def info(self) -> dict:
        """What runs: backend, device, precision, the artifact, classes and preprocessing."""
        return {**self.engine.describe(), "num_classes": self.engine.num_classes,
                "class_names": list(self.engine.class_names), "threshold": self.threshold,
                "preprocessing": self.engine.preprocessing.to_dict()}

    # ---- plumbing ------------------------------------------------------------------------------
    def _probs(self, images: Iterable[Any], batch_size: int) -> Iterator[np.ndarray]:
        pre = self.engine.preprocessing
        batch: list[tuple[np.ndarray, tuple[int, int]]] = []

        def flush() -> Iterator[np.ndarray]:
            probs = self.engine.predict(np.stack([x for x, _ in batch]))
            for p, (h, w) in zip(probs, [size for _, size in batch]):
                yield pre.restore(p, h, w)
            batch.clear()

        for image in images:
            array = _as_array(image, pre.channels)
            self.input_warner.check(image if isinstance(image, (str, Path)) else "an image", array)
            try:
                x = pre.apply(array)
            except ValueError as e:
                raise ResUNetError(f"cannot preprocess the image ({e})") from None
            if batch and (len(batch) >= batch_size or batch[0][0].shape != x.shape):
                yield from flush()
            batch.append((x, array.shape[:2]))
        if batch:
            yield from flush()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "SegmentationModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        d = self.engine.describe()
        return f"SegmentationModel({d.get('file')!s}, backend={d.get('backend')}, precision={d.get('precision')})"


def load(model: str | Path = "default", *, backend: str = "auto", device: str | None = None,
         threshold: float = 0.5, input_warnings: bool = True, **options: Any) -> SegmentationModel:
    """Open ``model`` -- a checkpoint, ``.onnx``, OpenVINO ``.xml``, TensorRT ``.engine``, or
    ``"default"`` (the shipped Kvasir-SEG model) -- on ``backend`` (``auto``: from the suffix), loaded
    and ready to :meth:`~SegmentationModel.predict`. ``options`` are the backend's engine options;
    ``input_warnings=False`` silences the one warning about a grayscale or tiny image."""
    from resunetpp import engines

    model = resolve_model(model, "model")
    engine = engines.open(model, backend=backend, device=device, **options)
    try:
        engine.load()
        return SegmentationModel(engine, threshold, input_warnings)
    except BaseException:
        engine.close()
        raise
