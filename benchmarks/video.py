"""``resunetpp bench --video CLIP``: each row on a video, end to end (issue 17).

For each backend and precision the clip goes through ``infer``'s own video pipeline (decode,
preprocess, infer, overlay, encode: :func:`resunetpp.engines.infer.run_inference` on a video file,
the code ``resunetpp infer clip.mp4`` runs), and the bench reports

* the end-to-end video FPS (frames over the pipeline's wall time) and its share of the row's
  model-only rate (``video_share``);
* the glass-to-glass latency p50/p99 as the pipeline records it per frame: from the frame decoded
  to its overlay frame encoded (the encoder's call returned) (``<stem>_frames.json``'s ``latency_ms``);
* the per-frame Dice against the torch FP32 reference on the same decoded frames (mean and min),
  at the frame's own resolution -- the frames are decoded once (:class:`resunetpp.video.VideoReader`,
  resized in the decode thread as the pipeline does) and every row and the reference predict on
  those same arrays;
* whether it keeps up with the source: video FPS >= the clip's frame rate.

Decoding and encoding are :mod:`resunetpp.video`'s (PyAV); nothing here decodes or encodes itself.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp.errors import ResUNetError
from resunetpp.metrics import scores
from resunetpp.preprocess import Preprocessing, probs_to_mask

#: Frames whose masks are compared with the reference (the first ones of a longer clip); the
#: end-to-end run always covers the whole clip.
MAX_DICE_FRAMES = 300


@dataclass
class VideoPlan:
    """A clip decoded once for the accuracy check: the model inputs of its first frames (at the
    reference's input size) and the reference's masks of them at the frame size."""

    path: Path
    info: Any  # resunetpp.video.VideoInfo
    pre: Preprocessing
    num_classes: int
    inputs: list[np.ndarray] = field(repr=False)  # (C, h, w) float32 per compared frame
    reference_masks: list[np.ndarray] = field(repr=False)  # (H, W) uint8 at the frame's size
    frames: int = 0  # frames decoded (all of them, not only the compared ones)
    decode_problem: str | None = None

    @property
    def fps(self) -> float | None:
        return float(self.info.fps) if self.info.fps else None

    def record(self) -> dict:
        """JSON-ready facts about the clip."""
        return {"file": str(self.path), "width": self.info.width, "height": self.info.height, "fps": self.fps,
                "frames": self.frames, "codec": self.info.codec, "duration_s": self.info.duration_s,
                "dice_frames": len(self.inputs), "model_input": list(self.pre.size),
                "decode_problem": self.decode_problem}


def plan_video(path: str | Path, reference: Any, max_frames: int = MAX_DICE_FRAMES) -> VideoPlan:
    """Decode ``path`` once (the pipeline's reader, resized to ``reference``'s input in the decode
    thread), keep the model inputs of the first ``max_frames`` frames and ``reference``'s masks of
    them at the frame size. Raises :class:`~resunetpp.errors.InputFileError` (one line naming the
    clip) for a file that is not a video, and :class:`ResUNetError` for one of which no frame decodes."""
    from resunetpp.video import VideoReader

    path = Path(path)
    pre: Preprocessing = reference.preprocessing
    inputs, masks, frames = [], [], 0
    with VideoReader(path, resize_to=tuple(pre.size) if pre.mode == "resize" else None) as reader:
        info = reader.info
        for frame in reader:
            frames += 1
            if len(inputs) >= max_frames:
                continue
            x = pre.apply(frame.model_input if frame.model_input is not None else frame.image)
            probs = reference.predict(x[None])[0]
            h, w = frame.image.shape[:2]
            inputs.append(x)
            masks.append(probs_to_mask(pre.restore(probs, h, w)))
        problem = reader.error
    if not inputs:
        raise ResUNetError(f"{path}: no frame decodes")
    return VideoPlan(path, info, pre, reference.num_classes, inputs, masks, frames, problem)


@dataclass
class VideoMeasurement:
    """One row's numbers on the clip (:func:`measure_video`)."""

    fps: float
    latency_ms_p50: float
    latency_ms_p99: float
    dice_mean: float
    dice_min: float
    keeps_up: bool | None
    details: dict

    def fields(self) -> dict:
        """The :class:`~resunetpp.bench.harness.BenchRow` fields (``video_share`` is set with the
        model-only rate, per batch-size row)."""
        return {"video_fps": self.fps, "video_latency_ms_p50": self.latency_ms_p50,
                "video_latency_ms_p99": self.latency_ms_p99, "video_dice_vs_reference": self.dice_mean,
                "video_dice_vs_reference_min": self.dice_min, "video_keeps_up": self.keeps_up}


def frame_dice(engine: Any, plan: VideoPlan) -> list[float]:
    """Per compared frame, the Dice of ``engine``'s mask against the reference's (frame resolution)."""
    out = []
    for x, ref in zip(plan.inputs, plan.reference_masks):
        probs = engine.predict(x[None])[0]
        out.append(scores(probs_to_mask(plan.pre.restore(probs, *ref.shape)), ref, max(plan.num_classes, 1)).dice)
    return out


def measure_video(engine: Any, plan: VideoPlan, threads: int | None = None) -> VideoMeasurement:
    """``engine`` on the clip: infer's video pipeline end to end (into a temporary folder that is
    removed), and the per-frame Dice against the reference on the plan's decoded frames."""
    run = pipeline_run(engine, plan.path, threads)
    dice = frame_dice(engine, plan)
    fps = run["fps"]
    return VideoMeasurement(fps=fps, latency_ms_p50=run["latency_ms_p50"], latency_ms_p99=run["latency_ms_p99"],
                            dice_mean=float(np.mean(dice)), dice_min=float(np.min(dice)),
                            keeps_up=None if not plan.fps else bool(fps >= plan.fps),
                            details={**{k: v for k, v in run.items() if k not in ("fps",)}, "dice_frames": len(dice)})


def pipeline_run(engine: Any, path: Path, threads: int | None = None) -> dict:
    """``infer``'s video pipeline on ``path`` with ``engine`` (:func:`resunetpp.engines.infer.run_inference`
    on a :class:`~resunetpp.sources.video.VideoFiles` source, batch 1, outputs in a temporary folder
    that is removed): the summary of its ``<stem>_frames.json`` -- ``fps`` (frames over the run's
    wall time, decode to last encode), ``latency_ms_p50`` / ``_p99`` (frame decoded -> its overlay
    frame encoded (the encoder's call returned)), ``model_fps``, ``frames`` ... -- as the pipeline wrote it."""
    from resunetpp.engines.infer import InferOptions, run_inference
    from resunetpp.sources.video import VideoFiles

    with tempfile.TemporaryDirectory(prefix="resunetpp-bench-video-") as tmp:
        options = InferOptions(out=Path(tmp), batch_size=1, threads=threads or 2)
        result = run_inference(engine, VideoFiles([path]), options)
        return video_summary(result, path)


def video_summary(result: Any, path: Path) -> dict:
    """The summary of the one video of a :func:`run_inference` result (read from its frames JSON,
    every field checked); raises :class:`ResUNetError` naming ``path`` when the run failed or wrote
    no record."""
    import json

    videos = getattr(result, "videos", None) or []
    if len(videos) != 1:
        raise ResUNetError(f"{path}: infer's video path did not run on it")
    video = videos[0]
    if video.get("error"):
        raise ResUNetError(str(video["error"]))
    record = video.get("frames_json")
    try:
        summary = json.loads(Path(record).read_text())["summary"]
    except (TypeError, OSError, ValueError, KeyError) as e:
        raise ResUNetError(f"{path}: the video run wrote no readable frame record ({e})") from None
    out = {}
    for key in ("fps", "latency_ms_p50", "latency_ms_p99", "model_fps", "source_fps"):
        value = summary.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ResUNetError(f"{path}: the video run's summary has no valid {key!r} ({value!r})")
        out[key] = float(value)
    frames = summary.get("frames")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ResUNetError(f"{path}: the video run's summary has no valid 'frames' ({frames!r})")
    out["frames"] = frames
    out["complete"] = bool(summary.get("complete"))
    return out
