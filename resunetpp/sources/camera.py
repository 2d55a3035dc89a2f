"""A camera as a live frame source for ``resunetpp stream 0`` (OpenCV ``VideoCapture``).

This is the one place OpenCV captures anything: PyAV (FFmpeg) opens a camera only through a
platform-specific device name and input format (``/dev/video0`` with ``v4l2`` on Linux,
``"0"`` with ``avfoundation`` on macOS, ``video=<friendly name>`` with ``dshow`` on Windows),
while ``cv2.VideoCapture(index)`` opens camera ``index`` the same way everywhere. Files and
network streams are read by PyAV (:mod:`resunetpp.video`).

:class:`CameraReader` yields the same :class:`~resunetpp.video.Frame` objects as
:class:`~resunetpp.video.VideoReader`, read in its own daemon thread, converted to RGB and
resized to the model's input there (Pillow bilinear, as
:meth:`~resunetpp.preprocess.Preprocessing.apply`). A camera cannot be paused: when the
consumer is slower, the oldest waiting frame is dropped (counted in :attr:`CameraReader.dropped`).

Not an ``infer`` source (it registers nothing): a camera has no end and no files to name outputs by.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from resunetpp.errors import InputFileError

__all__ = ["CameraReader", "camera_index"]


def camera_index(source: str) -> int | None:
    """The camera index a SOURCE names (``"0"``, ``"1"`` ...), else ``None``."""
    text = source.strip()
    return int(text) if text.isdigit() and len(text) <= 3 else None


def _cv2() -> Any:
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # no "can't open camera by index" warnings
    os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
    return cv2


_END = object()


class CameraReader:
    """Frames of camera ``index``; see the module docstring. Opens in the constructor: an absent
    camera raises :class:`~resunetpp.errors.InputFileError` (``camera 7: not found (...)``)."""

    def __init__(self, index: int, *, resize_to: tuple[int, int] | None = None, queue_size: int = 2) -> None:
        cv2 = _cv2()
        self.index = index
        self.name = f"camera {index}"
        self.resize_to = resize_to
        self.dropped = 0
        self.frames_decoded = 0
        self.error: str | None = None
        capture = cv2.VideoCapture(index)
        if not capture.isOpened():
            capture.release()
            device = f"/dev/video{index}" if os.name == "posix" and os.path.isdir("/dev") else f"index {index}"
            raise InputFileError(self.name, f"not found (OpenCV cannot open {device}: no such camera, "
                                            f"or it is in use)")
        ok, first = capture.read()
        if not ok or first is None:
            capture.release()
            raise InputFileError(self.name, "opens but gives no frame (in use by another program?)")
        self._capture = capture
        self._first = first
        self.height, self.width = int(first.shape[0]), int(first.shape[1])
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0: float | None = None

    def _frame(self, bgr: np.ndarray) -> Any:
        from PIL import Image

        from resunetpp.video import Frame

        cv2 = _cv2()
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        small = None
        if self.resize_to is not None:
            th, tw = self.resize_to
            small = image if image.shape[:2] == (th, tw) else \
                np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
        index = self.frames_decoded
        self.frames_decoded += 1
        return Frame(index, now - self._t0, image, small, time.perf_counter())

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                if item is _END:
                    time.sleep(0.01)
                    continue
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _read(self) -> None:
        try:
            bgr = self._first
            self._first = None
            while not self._stop.is_set():
                if bgr is None:
                    ok, bgr = self._capture.read()
                    if not ok or bgr is None:
                        self.error = f"{self.name}: stopped giving frames after {self.frames_decoded}"
                        break
                self._put(self._frame(bgr))
                bgr = None
        finally:
            self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="camera-read", daemon=True)
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._capture.release()

    def __enter__(self) -> "CameraReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
