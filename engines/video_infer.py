"""``resunetpp infer`` on video files: an overlay video, a per-frame record and optional mask PNGs.

Pipeline per video (four stages overlapping, queues bounded)::

    decode thread  (VideoReader): decode, RGB, resize to the model's input (swscale), once
    main thread    : normalise, batch (--batch-size), engine (--tta)
    post threads   : restore to the frame's size, threshold, regions, overlay, mask PNG (atomic)
    encode thread  : overlay frames in order into <stem>_overlay.mp4 (VideoWriter, H.264)

Outputs in ``--out`` per video ``<stem>`` (written over by a rerun, as image outputs are):

* ``<stem>_overlay.mp4`` -- every frame with the mask blended in (:func:`resunetpp.outputs.overlay_array`,
  the image overlay's code), the input's frame count, size and rate, no audio; under a temporary
  name until finished, and finished (playable) also when the run is interrupted;
* ``<stem>_frames.json`` -- ``summary`` and one record per frame (:data:`FRAME_FIELDS`); see
  :func:`frames_record`;
* with ``save_masks``: ``<stem>_masks/000000.png`` ... -- the mask of each frame, named by its
  index, as ``infer`` writes an image's mask (0/255; class indices in a palette for several classes).

A video that ends early or has packets that do not decode keeps every frame that decodes in its
outputs (``summary.complete`` false, ``summary.error`` the line) and counts as a failure (one line,
non-zero exit); a video of which no frame decodes writes nothing.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp.atomic import clean_stale_temporaries, write_json_atomic
from resunetpp.engines.base import Engine, NonFiniteOutputError
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.imageio import write_png_atomic
from resunetpp.outputs import mask_image, overlay_array
from resunetpp.preprocess import probs_to_mask
from resunetpp.sources.video import VideoFiles
from resunetpp.video import Frame, VideoWriter

#: ``--out`` names per video: ``<stem><suffix>`` (the masks: a folder).
VIDEO_OUTPUT_SUFFIXES = {"overlay": "_overlay.mp4", "frames": "_frames.json", "masks": "_masks"}
#: The fields of each frame's record in ``<stem>_frames.json``.
FRAME_FIELDS = ("index", "timestamp_s", "area_fraction", "boxes", "latency_ms")
#: The fields of its summary.
SUMMARY_FIELDS = ("source", "frames", "complete", "error", "fps", "model_fps", "latency_ms_p50", "latency_ms_p99",
                  "source_fps", "source_frames", "width", "height", "codec", "model", "backend", "device", "precision",
                  "overlay", "masks")
#: Frame rate written when a container does not say its own.
FALLBACK_FPS = Fraction(25)
_MASK_NAME = re.compile(r"^\d{6,}\.png$")


def regions(mask: np.ndarray) -> list[list[int]]:
    """``[x0, y0, x1, y1]`` of each 8-connected foreground region of ``mask`` (``mask > 0``), in
    pixels of the mask's resolution, ``x1``/``y1`` exclusive (so ``x1 - x0`` is the width); ordered
    by ``y0`` then ``x0``. OpenCV's ``connectedComponentsWithStats`` (the ``video`` extra)."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    boxes = [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h, _ in stats[1:n]]
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def percentile_ms(latencies: list[float], q: float) -> float | None:
    return round(float(np.percentile(latencies, q)), 3) if latencies else None


@dataclass
class VideoOutcome:
    """What one video produced (for the run's JSON and the CLI's lines)."""

    source: Path
    frames: int = 0
    overlay: Path | None = None
    frames_json: Path | None = None
    error: str | None = None
    fps: float = 0.0


@dataclass
class _VideoState:
    records: list[dict] = field(default_factory=list)
    model_seconds: float = 0.0
    inferred: int = 0


class VideoRun:
    """Runs :class:`~resunetpp.sources.video.VideoFiles` for ``run_inference`` (its lock, sweep,
    options and input guard already applied); counts as its image run does (frames are its images).

    ``options``: the run's :class:`~resunetpp.engines.infer.InferOptions`; ``predict(x)``: the
    engine's prediction of a batch (with ``--tta`` applied by the caller); ``failures`` are
    ``(origin, line)`` pairs.
    """

    def __init__(self, engine: Engine, options: Any, predict: Callable[[np.ndarray], np.ndarray],
                 progress: Callable[[int], None] | None, on_error: Callable[[str], None] | None,
                 on_warning: Callable[[str], None] | None) -> None:
        self.engine = engine
        self.opt = options
        self.predict = predict
        self.pre = engine.preprocessing
        self.num_classes = engine.num_classes
        self.progress = progress or (lambda n: None)
        self.on_error = on_error or (lambda line: None)
        self.on_warning = on_warning or (lambda line: None)
        self.failures: list[tuple[Path, str]] = []
        self.images = 0  # frames decoded
        self.written = 0  # frames encoded
        self.inferred = 0
        self.model_seconds = 0.0
        self.videos: list[VideoOutcome] = []
        described = engine.describe()
        self.engine_info = {"model": str(described.get("file", "")), "backend": described.get("backend"),
                            "device": described.get("device"), "precision": described.get("precision")}

    def fail(self, origin: Path, message: str) -> None:
        self.failures.append((origin, message))
        self.on_error(message)

    def outputs(self, key: str) -> list[Path]:
        """The files a video of this key writes (its masks folder's PNGs are named by frame)."""
        return [self.opt.out / f"{key}{VIDEO_OUTPUT_SUFFIXES[k]}" for k in ("overlay", "frames")]

    def check_options(self) -> None:
        if self.opt.save_probs:
            raise ResUNetError("--save-probs writes one .npy per image; for videos use --save-masks "
                               "(one mask PNG per frame)")

    # ---- stages --------------------------------------------------------------------------------------------
    def _predict(self, batch: list[Frame], state: _VideoState) -> np.ndarray:
        x = np.stack([self.pre.apply(f.model_input if f.model_input is not None else f.image) for f in batch])
        start = time.perf_counter()
        try:
            return self.predict(x)
        finally:
            state.model_seconds += time.perf_counter() - start
            state.inferred += len(batch)

    def _post(self, frame: Frame, probs: np.ndarray, masks_dir: Path | None) -> tuple[np.ndarray, float, list]:
        h, w = frame.image.shape[:2]
        mask = probs_to_mask(self.pre.restore(probs, h, w), self.opt.threshold)
        overlay = overlay_array(frame.image, mask, self.num_classes)
        if masks_dir is not None:
            write_png_atomic(masks_dir / f"{frame.index:06d}.png", mask_image(mask, self.num_classes))
        return overlay, float(np.count_nonzero(mask)) / mask.size, regions(mask)

    @staticmethod
    def _encode(writer: VideoWriter, frame: Frame, post: Future) -> dict:
        overlay, area, boxes = post.result()
        writer.write(overlay)
        encoded = time.perf_counter()
        return {"index": frame.index, "timestamp_s": round(frame.pts_s, 6), "area_fraction": round(area, 6),
                "boxes": boxes, "latency_ms": round((encoded - frame.decoded_at) * 1000.0, 3)}

    # ---- one video ---------------------------------------------------------------------------------------
    def run_video(self, source: VideoFiles, i: int) -> None:
        key, path, info = source.keys[i], source.paths[i], source.infos[i]
        out = self.opt.out
        overlay_path, json_path = self.outputs(key)
        masks_dir = out / f"{key}{VIDEO_OUTPUT_SUFFIXES['masks']}" if self.opt.save_masks else None
        if masks_dir is not None:
            masks_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(masks_dir)
        fps = info.fps
        if fps is None:
            fps = FALLBACK_FPS
            self.on_warning(f"{path}: the container gives no frame rate; the overlay is written at {fps} fps")
        resize_to = self.pre.size if self.pre.mode == "resize" else None
        state = _VideoState()
        outcome = VideoOutcome(path)
        self.videos.append(outcome)
        start = time.perf_counter()
        error: str | None = None
        pending: deque[Future] = deque()
        limit = 2 * self.opt.threads + self.opt.batch_size
        writer: VideoWriter | None = None
        finished = False

        def drain(keep: int) -> None:
            while len(pending) > keep:
                state.records.append(pending.popleft().result())
                self.written += 1
                self.progress(1)

        try:
            with source.reader(i, resize_to=resize_to, queue_size=max(8, 2 * self.opt.batch_size)) as reader, \
                    VideoWriter(overlay_path, info.width, info.height, fps) as writer, \
                    ThreadPoolExecutor(self.opt.threads, thread_name_prefix="video-post") as post, \
                    ThreadPoolExecutor(1, thread_name_prefix="video-encode") as encode:
                batch: list[Frame] = []

                def flush() -> None:
                    probs = self._predict(batch, state)
                    for frame, pr in zip(batch, probs):
                        pending.append(encode.submit(self._encode, writer, frame,
                                                     post.submit(self._post, frame, pr, masks_dir)))
                    batch.clear()
                    drain(limit)

                try:
                    try:
                        for frame in reader:
                            self.images += 1
                            batch.append(frame)
                            if len(batch) >= self.opt.batch_size:
                                flush()
                        if batch:
                            flush()
                    except NonFiniteOutputError as e:
                        error = f"{path}: prediction is not finite ({e}); stopped at frame {self.images - 1}"
                    except InputFileError as e:  # no frame decodes
                        error = str(e)
                    drain(0)
                except BaseException:  # Ctrl-C, a failed write: keep the frames already encoding
                    for fut in pending:
                        fut.cancel()  # those not started (the encoder runs them in order: a prefix ran)
                    for fut in pending:
                        if not fut.cancelled():
                            with contextlib.suppress(Exception):
                                state.records.append(fut.result())
                                self.written += 1
                    pending.clear()
                    raise
                if error is None:
                    error = reader.error
            finished = True
        finally:
            self.inferred += state.inferred
            self.model_seconds += state.model_seconds
            seconds = time.perf_counter() - start
            outcome.frames = len(state.records)
            outcome.fps = outcome.frames / seconds if seconds > 0 else 0.0
            if state.records:
                outcome.overlay = overlay_path
                outcome.frames_json = json_path
                write_json_atomic(json_path, self.frames_record(
                    path, info, fps, state, seconds, error, overlay_path, masks_dir,
                    complete=finished and error is None))
                if masks_dir is not None and error is None:
                    self._remove_surplus_masks(masks_dir, len(state.records))
        outcome.error = error
        if error is not None:
            self.fail(path, error)

    def frames_record(self, path: Path, info, fps: Fraction, state: _VideoState, seconds: float,
                      error: str | None, overlay: Path, masks_dir: Path | None, complete: bool) -> dict:
        """``{"summary": {...}, "frames": [...]}``: see :data:`SUMMARY_FIELDS` and :data:`FRAME_FIELDS`.

        ``fps``: frames written per second of the whole run (decode to last encode, end to end);
        ``model_fps``: frames per second inside the engine; latencies: frame decoded -> its overlay
        frame encoded (the encoder's call returned), in ms; ``source_fps`` the container's rate (``fps`` of the
        overlay); ``source_frames`` the container's frame count (``null`` when it has none).
        """
        latencies = [r["latency_ms"] for r in state.records]
        n = len(state.records)
        summary = {
            "source": str(path), "frames": n, "complete": complete, "error": error,
            "fps": round(n / seconds, 3) if seconds > 0 else None,
            "model_fps": round(state.inferred / state.model_seconds, 3) if state.model_seconds > 0 else None,
            "latency_ms_p50": percentile_ms(latencies, 50), "latency_ms_p99": percentile_ms(latencies, 99),
            "source_fps": round(float(fps), 6), "source_frames": info.frames, "width": info.width,
            "height": info.height, "codec": info.codec, **self.engine_info,
            "overlay": overlay.name, "masks": masks_dir.name if masks_dir is not None else None,
        }
        return {"summary": summary, "frames": state.records}

    @staticmethod
    def _remove_surplus_masks(masks_dir: Path, frames: int) -> None:
        """Masks of frame indices this video does not have (an older, longer video of the same stem)."""
        for p in masks_dir.iterdir():
            if _MASK_NAME.match(p.name) and int(p.stem) >= frames:
                with contextlib.suppress(OSError):
                    p.unlink()

    def run(self, source: VideoFiles) -> None:
        for i in range(len(source.paths)):
            self.run_video(source, i)
