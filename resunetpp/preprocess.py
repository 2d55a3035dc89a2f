"""The one preprocessing and postprocessing definition, stored in every checkpoint and artifact.

Every backend (torch, ONNX Runtime, OpenVINO, TensorRT) calls :meth:`Preprocessing.apply` on the
decoded image and :meth:`Preprocessing.restore` on the probabilities, so all of them see the
same tensors. Two policies make any image acceptable to the network (whose height and width
must be multiples of 8):

* ``resize`` (default, as the ResUNet++ paper trains): resize to ``size`` (bilinear), predict,
  resize the probabilities back to the original size.
* ``pad``: keep the resolution, pad bottom/right with zeros (after normalisation) up to the next
  multiple of 8, predict, crop. Needs a model exported with dynamic height and width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from resunetpp.errors import RecordFieldError
from resunetpp.model_config import MAX_INPUT_SIZE, SIZE_MULTIPLE, input_size_problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("resize", "pad")
#: Accepted ranges of the normalisation, on the 0..1 pixel scale (pixels are divided by 255 first).
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (1e-3, 1.0)
FIELDS = ("size", "mode", "mean", "std", "channels")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers_problem(values: object, channels: int, low: float, high: float) -> str | None:
    if not isinstance(values, (list, tuple)) or not all(_is_number(v) for v in values):
        return f"must be a list of {channels} numbers, got {values!r}"
    if len(values) != channels:
        return f"needs {channels} values (one per channel), got {len(values)}: {list(values)}"
    if not all(math.isfinite(v) for v in values):
        return f"must be finite numbers, got {list(values)}"
    if not all(low <= v <= high for v in values):
        return f"must lie in [{low:g}, {high:g}] (the 0..1 pixel scale), got {list(values)}"
    return None


def preprocessing_problem(d: object) -> tuple[str, str] | None:
    """The first invalid field of a preprocessing record as ``(field, problem)``, or ``None``.

    Strict about types (a record is data from a file): ``size`` two ints, multiples of
    :data:`~resunetpp.model.SIZE_MULTIPLE` up to :data:`~resunetpp.model.MAX_INPUT_SIZE`; ``mode``
    one of :data:`MODES`; ``channels`` 1 or 3; ``mean`` and ``std`` one finite number per channel
    within :data:`MEAN_RANGE` and :data:`STD_RANGE`. A missing field takes its default.
    """
    if not isinstance(d, Mapping):
        return "", f"must be a mapping, got {type(d).__name__}"
    for key in d:
        if key not in FIELDS:
            return str(key), f"unknown field (known: {', '.join(FIELDS)})"
    default = Preprocessing.__dataclass_fields__
    channels = d.get("channels", default["channels"].default)
    if isinstance(channels, bool) or channels not in (1, 3):
        return "channels", f"must be 1 or 3, got {channels!r}"
    mode = d.get("mode", default["mode"].default)
    if not isinstance(mode, str) or mode not in MODES:
        return "mode", f"must be one of {', '.join(MODES)}, got {mode!r}"
    if "size" in d:
        size = d["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            return "size", f"must be [height, width], got {size!r}"
        for side in size:
            problem = input_size_problem(side)
            if problem:
                return "size", f"each side {problem}"
    for key, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
        if key in d:
            problem = _numbers_problem(d[key], channels, low, high)
            if problem:
                return key, problem
        elif channels != 3:
            return key, f"is required for {channels}-channel preprocessing"
    return None


@dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int] = (256, 256)  # (height, width), used by mode "resize"
    mode: str = "resize"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if len(self.size) != 2 or any(s <= 0 or s % SIZE_MULTIPLE for s in self.size):
            raise ValueError(f"size must be (height, width), positive multiples of {SIZE_MULTIPLE}; got {self.size}")
        if any(s > MAX_INPUT_SIZE for s in self.size):
            raise ValueError(f"size must be at most {MAX_INPUT_SIZE} a side, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        for key, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
            problem = _numbers_problem(getattr(self, key), self.channels, low, high)
            if problem:
                raise ValueError(f"{key} {problem}")

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Preprocessing":
        """From a record; any invalid field raises :class:`~resunetpp.errors.RecordFieldError`
        (:func:`preprocessing_problem`)."""
        problem = preprocessing_problem(d)
        if problem is not None:
            raise RecordFieldError(*problem)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def with_size(self, size: int | Sequence[int] | None) -> "Preprocessing":
        if size is None:
            return self
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return Preprocessing(hw, self.mode, self.mean, self.std, self.channels)

    # ---- forward ----------------------------------------------------------------------------
    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (H, W) for an original image of ``height`` x ``width``."""
        if self.mode == "resize":
            return self.size
        m = SIZE_MULTIPLE
        padded = (-(-height // m) * m, -(-width // m) * m)
        if max(padded) > MAX_INPUT_SIZE:
            raise ValueError(f"image is {width}x{height}; preprocessing mode 'pad' runs the network at the image's "
                             f"size, at most {MAX_INPUT_SIZE}x{MAX_INPUT_SIZE}")
        return padded

    def apply(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, C)`` uint8 -> ``(C, h, w)`` float32, normalised, of an accepted size."""
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, C) uint8 image, got {image.shape} {image.dtype}")
        if image.shape[2] != self.channels:
            if self.channels == 3 and image.shape[2] == 1:
                image = np.repeat(image, 3, axis=2)
            elif self.channels == 1 and image.shape[2] >= 3:
                image = np.asarray(Image.fromarray(image[:, :, :3]).convert("L"))[:, :, None]
            else:
                raise ValueError(f"expected {self.channels} channels, got {image.shape[2]}")
        h, w = image.shape[:2]
        th, tw = self.input_size(h, w)
        if self.mode == "resize" and (h, w) != (th, tw):
            pil = Image.fromarray(image[:, :, 0] if self.channels == 1 else image)
            image = np.asarray(pil.resize((tw, th), Image.BILINEAR))
            if image.ndim == 2:
                image = image[:, :, None]
        x = image.astype(np.float32) * (1.0 / 255.0)
        x -= np.asarray(self.mean, np.float32)
        x /= np.asarray(self.std, np.float32)
        x = np.ascontiguousarray(x.transpose(2, 0, 1))
        if self.mode == "pad" and (h, w) != (th, tw):
            out = np.zeros((self.channels, th, tw), np.float32)
            out[:, :h, :w] = x
            x = out
        return x

    # ---- backward ---------------------------------------------------------------------------
    def restore(self, probs: np.ndarray, height: int, width: int) -> np.ndarray:
        """``(K, h, w)`` probabilities of one image -> ``(K, height, width)`` at the original size."""
        if self.mode == "pad":
            return np.ascontiguousarray(probs[:, :height, :width])
        if probs.shape[-2:] == (height, width):
            return probs
        import torch  # lazily: reading records and preprocessing need no torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))[None]
        return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0].numpy()


def probs_to_mask(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``(K, H, W)`` probabilities -> ``(H, W)`` uint8: 0/1 for one class, argmax otherwise."""
    if probs.shape[0] == 1:
        return (probs[0] > threshold).astype(np.uint8)
    return probs.argmax(axis=0).astype(np.uint8)
