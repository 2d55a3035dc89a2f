"""Input the model was not trained for: grayscale or tiny images, found cheaply, warned about once.

The shipped model was trained on RGB colonoscopy frames (Kvasir-SEG, 332x487 to 1920x1072). On a
grayscale copy of a validation image it marks 69% of the image as polyp (6% on the colour
original), and nothing in its output says so; ``infer``, ``evaluate``-style callers and
:func:`resunetpp.load` warn once per run instead (:class:`InputWarner`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

#: Images with a side below this many pixels are called tiny (the network input is 256x256).
MIN_SIDE = 64
#: A colour image whose channels differ by at most this (0-255) on every sampled pixel is grayscale.
GRAY_TOLERANCE = 2
#: Pixels sampled (on a regular grid) to decide grayscale: enough to see colour, cheap on any size.
SAMPLE_PIXELS = 4096
HINT = "the model was trained on RGB colonoscopy frames; its masks on such input are unreliable"


def input_problem(image: np.ndarray) -> str | None:
    """Why ``image`` (H, W, C uint8, as decoded for a 3-channel model) is not what the model was
    trained on -- ``"grayscale"`` or ``"tiny (HxW)"`` -- or ``None``."""
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        return f"tiny ({h}x{w}, under {MIN_SIDE} px a side)"
    if image.ndim == 3 and image.shape[2] >= 3:
        step = max(1, int(np.sqrt(h * w / SAMPLE_PIXELS)))
        rgb = image[::step, ::step, :3].astype(np.int16)
        if int(np.abs(rgb[..., 0] - rgb[..., 1]).max()) <= GRAY_TOLERANCE \
                and int(np.abs(rgb[..., 1] - rgb[..., 2]).max()) <= GRAY_TOLERANCE:
            return "grayscale"
    return None


class InputWarner:
    """Calls ``warn(line)`` for the first image with an :func:`input_problem` and then stays silent
    (thread-safe: readers decode in parallel). ``enabled=False`` never warns."""

    def __init__(self, warn: Callable[[str], None], channels: int = 3, enabled: bool = True,
                 silence_hint: str = "") -> None:
        self.warn = warn
        self.enabled = enabled and channels == 3
        self.silence_hint = silence_hint
        self._lock = threading.Lock()
        self.warned = False

    def check(self, name: object, image: np.ndarray) -> None:
        if not self.enabled or self.warned:
            return
        problem = input_problem(image)
        if problem is None:
            return
        with self._lock:
            if self.warned:
                return
            self.warned = True
        self.warn(f"{name} is {problem}: {HINT} (warned once per run{self.silence_hint})")
