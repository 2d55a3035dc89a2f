"""``resunetpp stream``: segment a live source frame by frame, with bounded delay.

Pipeline (one thread per stage, bounded queues between them, so the stages overlap)::

    decode (VideoReader / camera thread: RGB + resize to the model input)
      -> preprocess (normalise; the "pump" thread, which also counts every decoded frame)
      -> [mailbox]  drop "latest": one slot, a newer frame replaces a waiting one (counted dropped)
                    drop "none":   a bounded queue; a full queue blocks the decoder
      -> infer (the engine)
      -> [queue] -> overlay (mask restored to the frame's size, blended; published to --serve)
      -> [queue] -> encode (--out: H.264, each frame at its source timestamp)

Counts are exact: every decoded frame is either inferred or dropped (``frames_decoded ==
frames_inferred + frames_dropped``); a frame still waiting when the run is stopped (Ctrl-C,
``--frames``) counts as dropped. Latency of a frame: from the moment the decoder produced it
(:attr:`~resunetpp.video.Frame.decoded_at`) to the moment its overlay was encoded into ``--out``
(or, without ``--out``, published to the MJPEG page).

With ``drop="latest"`` the output file holds the overlays of the inferred frames only, each at
its source timestamp (a variable frame rate file whose duration is the source's: played back,
time runs as it did live, the dropped moments show the previous overlay a little longer). With
``drop="none"`` every frame is inferred and written.
"""

from __future__ import annotations

import array
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp.engines.base import Engine, NonFiniteOutputError
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.outputs import overlay_array
from resunetpp.preprocess import probs_to_mask

__all__ = ["DROP_POLICIES", "StreamOptions", "StreamResult", "StreamRun", "StreamStats", "open_frames",
           "run_stream", "stream_source"]

DROP_POLICIES = ("latest", "none")
#: Seconds the live FPS is measured over.
RATE_WINDOW_S = 2.0
#: A stream "keeps up" when it dropped nothing and its output rate is at least this share of the source's.
KEEP_UP_SHARE = 0.95


@dataclass(frozen=True)
class StreamOptions:
    """How ``resunetpp stream`` runs; see the module docstring."""

    drop: str = "latest"
    out: Path | None = None
    frames: int | None = None  # stop after this many decoded frames
    threshold: float = 0.5
    queue_size: int = 2  # frames each queue between the stages holds (drop "none": also the mailbox)
    latency_window: int = 100  # frames the live latency p50 is measured over
    preset: str = "veryfast"  # x264 preset of --out

    def validate(self) -> None:
        if self.drop not in DROP_POLICIES:
            raise ResUNetError(f"--drop must be one of {', '.join(DROP_POLICIES)}, got {self.drop!r}")
        if self.frames is not None and self.frames < 1:
            raise ResUNetError(f"--frames must be at least 1, got {self.frames}")
        if not 0.0 < self.threshold < 1.0:
            raise ResUNetError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.queue_size < 1:
            raise ResUNetError(f"queue size must be at least 1, got {self.queue_size}")
        if self.out is not None:
            from resunetpp.video import CONTAINER_FORMATS

            if self.out.suffix.lower() not in CONTAINER_FORMATS:
                raise InputFileError(self.out, f"--out must be a video file ({', '.join(sorted(CONTAINER_FORMATS))})")
            if self.out.is_dir():
                raise InputFileError(self.out, "--out is a folder; give a video file name (e.g. live.mp4)")


# ---- stats ------------------------------------------------------------------------------------------------
def _percentile(values: Iterable[float], q: float) -> float | None:
    data = np.fromiter(values, dtype=np.float64)
    return float(np.percentile(data, q)) if data.size else None


class StreamStats:
    """Counters and latencies of a running stream, updated by the stage threads (thread-safe)."""

    def __init__(self, latency_window: int = 100) -> None:
        self._lock = threading.Lock()
        self.started = time.perf_counter()
        self.decoded = 0
        self.inferred = 0
        self.dropped = 0
        self.failed = 0  # inferred, but the prediction was not finite: no overlay
        self.output = 0  # overlays encoded (or published)
        self.model_seconds = 0.0
        self.latencies = array.array("d")  # seconds, every output frame
        self.recent = deque(maxlen=latency_window)
        self.output_times: deque[float] = deque()
        self.first_output: float | None = None
        self.last_output: float | None = None
        #: Frames the source itself decoded and discarded before the pipeline took them (a camera
        #: cannot wait): counted as decoded and dropped.
        self.source_dropped: Callable[[], int] = lambda: 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def model_time(self, seconds: float) -> None:
        with self._lock:
            self.model_seconds += seconds

    def output_done(self, decoded_at: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        with self._lock:
            self.output += 1
            latency = now - decoded_at
            self.latencies.append(latency)
            self.recent.append(latency)
            self.output_times.append(now)
            while self.output_times and self.output_times[0] < now - RATE_WINDOW_S:
                self.output_times.popleft()
            if self.first_output is None:
                self.first_output = now
            self.last_output = now

    def snapshot(self) -> dict[str, Any]:
        """The live numbers: counts, FPS over the last seconds, latency p50 over the last frames."""
        now = time.perf_counter()
        with self._lock:
            times = [t for t in self.output_times if t >= now - RATE_WINDOW_S]
            span = min(RATE_WINDOW_S, now - self.started)
            fps = len(times) / span if span > 0 else 0.0
            p50 = _percentile(self.recent, 50)
            early = self.source_dropped()
            return {"frames_decoded": self.decoded + early, "frames_inferred": self.inferred,
                    "frames_dropped": self.dropped + early, "frames_failed": self.failed, "frames_output": self.output,
                    "fps": round(fps, 2), "latency_p50_ms": None if p50 is None else round(p50 * 1e3, 1),
                    "seconds": round(now - self.started, 2)}


@dataclass
class StreamResult:
    """The summary of one run (``--json``)."""

    source: str
    drop: str
    frames_decoded: int
    frames_inferred: int
    frames_dropped: int
    frames_failed: int
    frames_output: int
    seconds: float
    fps: float  # overlays out per second, steady state (first to last output)
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    source_fps: float | None
    model_fps: float
    interrupted: bool = False
    out: str | None = None
    size: tuple[int, int] | None = None  # (width, height) of the frames
    engine: dict = field(default_factory=dict)
    warning: str | None = None  # e.g. a truncated file: the frames that decoded were processed

    @property
    def kept_up(self) -> bool | None:
        """Whether it kept up with the source rate: nothing dropped and an output rate of at least
        :data:`KEEP_UP_SHARE` of the source's; ``None`` when the source states no rate."""
        if self.source_fps is None or not self.source_fps > 0:
            return None
        return self.frames_dropped == 0 and self.frames_output > 0 and self.fps >= KEEP_UP_SHARE * self.source_fps

    def as_dict(self) -> dict:
        return {"source": self.source, "drop": self.drop, "frames_decoded": self.frames_decoded,
                "frames_inferred": self.frames_inferred, "frames_dropped": self.frames_dropped,
                "frames_failed": self.frames_failed, "frames_output": self.frames_output,
                "seconds": round(self.seconds, 3), "fps": round(self.fps, 3),
                "latency_p50_ms": None if self.latency_p50_ms is None else round(self.latency_p50_ms, 2),
                "latency_p99_ms": None if self.latency_p99_ms is None else round(self.latency_p99_ms, 2),
                "source_fps": None if self.source_fps is None else round(self.source_fps, 3),
                "kept_up": self.kept_up, "model_fps": round(self.model_fps, 3), "interrupted": self.interrupted,
                "out": self.out, "width": self.size[0] if self.size else None,
                "height": self.size[1] if self.size else None, "engine": self.engine, "warning": self.warning}


# ---- the mailbox between decode and infer ------------------------------------------------------------------
_END = object()


class _Mailbox:
    """``latest``: one slot, a put replaces a waiting item (returned, to be counted dropped).
    ``none``: a FIFO of ``capacity``; a put waits for room (the decoder is blocked)."""

    def __init__(self, policy: str, capacity: int, stop: threading.Event) -> None:
        self.latest = policy == "latest"
        self.capacity = 1 if self.latest else capacity
        self.items: deque = deque()
        self.cond = threading.Condition()
        self.stop = stop
        self.closed = False

    def put(self, item: Any) -> tuple[bool, int]:
        """``(accepted, dropped)``: not accepted when the run stops while waiting for room."""
        with self.cond:
            dropped = 0
            if self.latest:
                while self.items:
                    self.items.popleft()
                    dropped += 1
            else:
                while len(self.items) >= self.capacity:
                    if self.stop.is_set():
                        return False, 0
                    self.cond.wait(0.1)
            self.items.append(item)
            self.cond.notify_all()
            return True, dropped

    def get(self) -> Any:
        """The next item, or :data:`_END` when closed and empty (or the run stops)."""
        with self.cond:
            while not self.items:
                if self.closed or self.stop.is_set():
                    return _END
                self.cond.wait(0.1)
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def close(self) -> int:
        """No more puts; returns how many items are left (when stopping, they are never taken)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            return len(self.items)

    def discard(self) -> int:
        with self.cond:
            n = len(self.items)
            self.items.clear()
            self.cond.notify_all()
            return n


class _Queue:
    """A bounded FIFO between two stages; ``put`` waits for room unless the run is aborted."""

    def __init__(self, capacity: int, abort: threading.Event) -> None:
        self.items: deque = deque()
        self.capacity = capacity
        self.cond = threading.Condition()
        self.abort = abort

    def put(self, item: Any) -> bool:
        with self.cond:
            while len(self.items) >= self.capacity and item is not _END:
                if self.abort.is_set():
                    return False
                self.cond.wait(0.1)
            self.items.append(item)
            self.cond.notify_all()
            return True

    def get(self) -> Any:
        with self.cond:
            while not self.items:
                if self.abort.is_set():
                    return _END
                self.cond.wait(0.1)
            item = self.items.popleft()
            self.cond.notify_all()
            return item


# ---- the output file ---------------------------------------------------------------------------------------
def _open_writer(path: Path, width: int, height: int, fps: float | Fraction | None, preset: str):
    """A :class:`~resunetpp.video.VideoWriter` at the source's rate (25 when it has none); the run
    writes each frame at its source timestamp (``write(image, pts_s)``)."""
    from resunetpp.video import VideoWriter

    rate = fps if fps and float(fps) > 0 else 25
    return VideoWriter(path, width, height, rate, preset=preset)


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass
class _Work:
    frame: Any  # a resunetpp.video.Frame (index, pts_s, image, model_input, decoded_at)
    x: np.ndarray | None = None  # preprocessed network input (C, h, w)
    probs: np.ndarray | None = None  # (K, h, w)
    overlay: np.ndarray | None = None  # (H, W, 3)


class StreamRun:
    """One stream through one loaded engine; :func:`run_stream` drives it. ``frames`` is any iterable
    of :class:`~resunetpp.video.Frame`-like objects (``index``, ``pts_s``, ``image``, ``model_input``
    or ``None``, ``decoded_at``); ``publish(overlay)`` gets each overlay (the MJPEG server)."""

    def __init__(self, engine: Engine, frames: Iterable[Any], options: StreamOptions, *,
                 source: str = "", source_fps: float | None = None,
                 publish: Callable[[np.ndarray], None] | None = None) -> None:
        options.validate()
        self.engine = engine
        self.frames = frames
        self.opt = options
        self.source = source
        self.source_fps = source_fps
        self.publish = publish
        self.pre = engine.preprocessing
        self.num_classes = engine.num_classes
        self.stats = StreamStats(options.latency_window)
        self.stats.source_dropped = lambda: int(getattr(frames, "dropped", 0) or 0)
        self.stopping = threading.Event()  # stop taking frames (Ctrl-C, --frames, end, an error)
        self.abort = threading.Event()  # stop everything now (an error in a stage)
        self.mailbox = _Mailbox(options.drop, options.queue_size, self.stopping)
        self.to_overlay = _Queue(options.queue_size, self.abort)
        self.to_encode = _Queue(options.queue_size, self.abort)
        self.errors: list[BaseException] = []
        self.size: tuple[int, int] | None = None
        self.writer = None
        self.interrupted = False
        self._threads: list[threading.Thread] = []
        self._first_pts: float | None = None

    # ---- stages -------------------------------------------------------------------------------
    def _guard(self, stage: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                stage()
            except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
                self.errors.append(e)
                self.stopping.set()
                self.abort.set()
        return run

    def _pump(self) -> None:
        """Take decoded frames as they come, preprocess, hand to the mailbox (counting drops)."""
        try:
            for frame in self.frames:
                if self.stopping.is_set():
                    break
                self.stats.add(decoded=1)
                small = frame.model_input if frame.model_input is not None else frame.image
                try:
                    x = self.pre.apply(small)
                except ValueError as e:
                    raise ResUNetError(f"{self.source}: frame {frame.index}: cannot preprocess ({e})") from None
                accepted, dropped = self.mailbox.put(_Work(frame, x))
                if not accepted:
                    self.stats.add(dropped=1)
                    break
                if dropped:
                    self.stats.add(dropped=dropped)
                if self.opt.frames is not None and self.stats.decoded >= self.opt.frames:
                    break
        finally:
            left = self.mailbox.close()
            if self.stopping.is_set() and left:  # stopped: the waiting frames are never inferred
                self.stats.add(dropped=self.mailbox.discard())

    def _infer(self) -> None:
        try:
            while True:
                work = self.mailbox.get()
                if work is _END:
                    break
                start = time.perf_counter()
                try:
                    work.probs = self.engine.predict(work.x[None])[0]
                except NonFiniteOutputError:
                    self.stats.add(inferred=1, failed=1)
                    continue
                finally:
                    self.stats.model_time(time.perf_counter() - start)
                work.x = None
                self.stats.add(inferred=1)
                if not self.to_overlay.put(work):
                    break
        finally:
            left = self.mailbox.discard()  # stopped while frames waited: dropped
            if left:
                self.stats.add(dropped=left)
            self.to_overlay.put(_END)

    def _overlay(self) -> None:
        try:
            while True:
                work = self.to_overlay.get()
                if work is _END:
                    break
                image = work.frame.image
                h, w = image.shape[:2]
                mask = self._mask(work.probs, h, w)
                work.probs = None
                work.overlay = overlay_array(image, mask, self.num_classes)
                if self.size is None:
                    self.size = (w, h)
                if self.publish is not None:
                    self.publish(work.overlay)
                if self.opt.out is None:
                    self.stats.output_done(work.frame.decoded_at)
                elif not self.to_encode.put(work):
                    break
        finally:
            self.to_encode.put(_END)

    def _mask(self, probs: np.ndarray, height: int, width: int) -> np.ndarray:
        """The mask at the frame's size, as ``infer`` computes it (restore, then threshold). A one-class
        frame whose probabilities are all below the threshold needs no restoring: a bilinear resize
        is a convex combination of them, so no restored pixel can pass it (no polyp: the usual frame)."""
        if probs.shape[0] == 1 and float(probs.max()) < self.opt.threshold - 1e-6:
            return np.zeros((height, width), np.uint8)
        return probs_to_mask(self.pre.restore(probs, height, width), self.opt.threshold)

    def _encode(self) -> None:
        while True:
            work = self.to_encode.get()
            if work is _END:
                break
            frame = work.frame
            if self.writer is None:
                h, w = work.overlay.shape[:2]
                self.writer = _open_writer(self.opt.out, w, h, self.source_fps, self.opt.preset)
                self._first_pts = frame.pts_s
            t = frame.pts_s - self._first_pts
            last = self.writer.last_pts_s
            if last is not None and not t > last:
                t = None  # a source timestamp that does not advance: the next tick
            self.writer.write(work.overlay, t)
            self.stats.output_done(frame.decoded_at)

    # ---- control --------------------------------------------------------------------------------
    def start(self) -> "StreamRun":
        stages = [("stream-preprocess", self._pump), ("stream-infer", self._infer), ("stream-overlay", self._overlay)]
        if self.opt.out is not None:
            stages.append(("stream-encode", self._encode))
        for name, stage in stages:
            thread = threading.Thread(target=self._guard(stage), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Stop taking frames; frames already inferred are still overlaid and written."""
        self.stopping.set()

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads[1:])  # the pump may sit in a blocked read

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.perf_counter() + timeout
        for thread in self._threads[1:]:
            thread.join(None if deadline is None else max(0.0, deadline - time.perf_counter()))
        return self.done()

    def finish(self) -> StreamResult:
        """Close the output file (playable, whatever happened) and summarise."""
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.writer = None
        s = self.stats
        latencies = np.frombuffer(s.latencies, dtype=np.float64) if len(s.latencies) else np.zeros(0)
        fps = 0.0
        if s.output > 1 and s.last_output is not None and s.first_output is not None \
                and s.last_output > s.first_output:
            fps = (s.output - 1) / (s.last_output - s.first_output)
        elif s.output == 1:
            fps = 1.0 / max(float(latencies[0]), 1e-9)
        early = s.source_dropped()
        return StreamResult(
            source=self.source, drop=self.opt.drop, frames_decoded=s.decoded + early, frames_inferred=s.inferred,
            frames_dropped=s.dropped + early, frames_failed=s.failed, frames_output=s.output,
            seconds=time.perf_counter() - s.started, fps=fps,
            latency_p50_ms=float(np.percentile(latencies, 50) * 1e3) if latencies.size else None,
            latency_p99_ms=float(np.percentile(latencies, 99) * 1e3) if latencies.size else None,
            source_fps=None if self.source_fps is None else float(self.source_fps),
            model_fps=s.inferred / s.model_seconds if s.model_seconds > 0 else 0.0,
            interrupted=self.interrupted, out=str(self.opt.out) if self.opt.out is not None and s.output else None,
            size=self.size, engine=self.engine.describe(),
            warning=getattr(self.frames, "error", None))


def run_stream(engine: Engine, frames: Iterable[Any], options: StreamOptions, *, source: str = "",
               source_fps: float | None = None, server: Any = None,
               on_tick: Callable[[dict], None] | None = None, tick_s: float = 0.5) -> StreamResult:
    """Run the pipeline over ``frames`` until they end, ``options.frames`` are decoded or Ctrl-C
    (KeyboardInterrupt in the calling thread, which only waits and ticks): the stages stop, what
    was inferred is written, the output file is closed and playable, and the summary returned
    with ``interrupted=True``. A stage's error (an unreadable stream, a full disk) is raised here
    after the same clean-up. ``on_tick(snapshot)`` is called every ``tick_s`` (the live line);
    ``server`` (an :class:`~resunetpp.mjpeg.MjpegServer`) gets every overlay and serves the stats."""
    run = StreamRun(engine, frames, options, source=source, source_fps=source_fps,
                    publish=server.publish if server is not None else None)
    if server is not None:  # /stats.json: the live numbers
        server.stats = run.stats.snapshot
    run.start()
    try:
        try:
            next_tick = time.perf_counter() + tick_s
            while not run.done():
                run.join(timeout=0.05)
                if on_tick is not None and time.perf_counter() >= next_tick:
                    on_tick(run.stats.snapshot())
                    next_tick += tick_s
        except KeyboardInterrupt:
            run.interrupted = True
            run.stop()
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C while closing: keep closing
                run.join(timeout=30)
    finally:
        run.stop()
        close = getattr(frames, "close", None)
        pump = run._threads[0] if run._threads else None
        for step in (close, lambda: run.join(timeout=30), lambda: pump.join(timeout=2.0) if pump else None):
            try:
                if step is not None:
                    step()  # close() wakes a pump waiting for the next frame of a live source
            except KeyboardInterrupt:  # another Ctrl-C while stopping: keep stopping, the file still closes
                run.interrupted = True
        result = run.finish()
    if run.errors:
        raise run.errors[0]
    return result


# ---- sources ------------------------------------------------------------------------------------------------
class FrameSource:
    """What ``resunetpp stream`` reads: a camera index (``"0"``: :class:`~resunetpp.sources.camera.CameraReader`),
    a network URL or a video file (:class:`~resunetpp.video.VideoReader`). Opened in the constructor, so
    an absent camera, an unreachable URL or a bad file raises here, one line naming it.

    ``realtime``: a file is played at its own frame rate (a URL or a camera always is). ``loop``:
    a file starts again at its end (a demo that stays up); indexes and timestamps keep counting.
    Iterating yields :class:`~resunetpp.video.Frame` objects; :attr:`fps` is the source's rate
    (``None`` when it states none), :attr:`error` a warning line (e.g. a truncated file: the
    frames that decode are streamed)."""

    def __init__(self, source: str, *, resize_to: tuple[int, int] | None = None, realtime: bool = False,
                 loop: bool = False, timeout: float | None = None) -> None:
        from resunetpp.sources.camera import CameraReader, camera_index

        self.name = str(source)
        self.resize_to = resize_to
        self.realtime = realtime
        self.timeout = timeout
        self.error: str | None = None
        self.closed = False
        index = camera_index(self.name)
        self.kind = "camera" if index is not None else "url" if "://" in self.name else "file"
        if loop and self.kind != "file":
            raise ResUNetError(f"{self.name}: --loop replays a file; a {self.kind} is live")
        self.loop = loop
        self._dropped_before = 0  # by the readers of earlier --loop passes
        if index is not None:
            self.reader: Any = CameraReader(index, resize_to=resize_to)
            self.name = self.reader.name  # "camera 0"
            self.fps = self.reader.fps
            self.width, self.height = self.reader.width, self.reader.height
        else:
            self.reader = self._open()
            info = self.reader.info
            self.fps = float(info.fps) if info.fps else None
            self.width, self.height = info.width, info.height

    def _open(self) -> Any:
        from resunetpp.video import VideoReader

        return VideoReader(self.name, resize_to=self.resize_to, realtime=self.realtime and self.kind == "file",
                           timeout=self.timeout, queue_size=4)

    @property
    def dropped(self) -> int:
        """Frames the reader decoded and discarded itself (a camera's queue overflowing)."""
        return int(getattr(self.reader, "dropped", 0) or 0) + self._dropped_before

    def files(self) -> list[Path]:
        """The files read (never written over)."""
        return [Path(self.name)] if self.kind == "file" else []

    def __iter__(self) -> Iterator[Any]:
        import dataclasses

        index_offset, pts_offset = 0, 0.0
        while True:
            last = None
            for frame in self.reader:
                last = frame
                yield frame if not index_offset else dataclasses.replace(
                    frame, index=frame.index + index_offset, pts_s=frame.pts_s + pts_offset)
            self.error = getattr(self.reader, "error", None) or self.error
            if not self.loop or self.closed or last is None:
                return
            index_offset += last.index + 1
            pts_offset += last.pts_s + (1.0 / self.fps if self.fps else 0.04)
            self.reader.close()
            self._dropped_before += int(getattr(self.reader, "dropped", 0) or 0)
            self.reader = self._open()

    def close(self) -> None:
        self.closed = True
        self.reader.close()

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _warm_up(engine: Engine, height: int, width: int, threshold: float) -> None:
    """One pass of every stage on a blank frame: a runtime's first call, torch's first resize and the
    palette's matplotlib import are slow, and would otherwise stall the first live frames."""
    pre = engine.preprocessing
    blank = np.zeros((height, width, pre.channels), np.uint8)
    probs = engine.predict(pre.apply(blank)[None])[0]
    mask = probs_to_mask(pre.restore(probs, height, width), threshold)
    mask[: max(1, height // 4), : max(1, width // 4)] = 1
    overlay_array(blank, mask, engine.num_classes)


def open_frames(source: str, **kwargs: Any) -> FrameSource:
    """:class:`FrameSource` over ``source`` (a camera index, a URL or a file)."""
    return FrameSource(source, **kwargs)


def stream_source(source: str, model: str | Path, options: StreamOptions, *, backend: str = "auto",
                  device: str = "auto", engine_options: dict | None = None, realtime: bool = False,
                  loop: bool = False, serve_port: int | None = None, serve_host: str | None = None,
                  on_tick: Callable[[dict], None] | None = None, on_ready: Callable[[str], None] | None = None,
                  other_outputs: Iterable[str | Path] = ()) -> StreamResult:
    """Open ``source`` (:class:`FrameSource`), ``model`` (:func:`resunetpp.engines.open`) and, with
    ``serve_port``, an MJPEG page (:class:`resunetpp.mjpeg.MjpegServer`, on ``127.0.0.1`` unless
    ``serve_host``), then :func:`run_stream`. ``on_ready(line)`` is told when frames start flowing
    (and the page's URL). Problems raise one-line :class:`~resunetpp.errors.ResUNetError`\\ s."""
    from resunetpp import engines
    from resunetpp.atomic import make_output_folder
    from resunetpp.engines.infer import InputGuard
    from resunetpp.mjpeg import DEFAULT_HOST, MjpegServer

    options.validate()
    engine = engines.open(model, backend=backend, device=device, **(engine_options or {}))  # reads the record
    try:
        pre = engine.preprocessing
        resize_to = tuple(pre.size) if pre.mode == "resize" else None
        with open_frames(source, resize_to=resize_to, realtime=realtime, loop=loop) as frames:
            guard = InputGuard(frames.files())
            for path in ([options.out] if options.out is not None else []) + [Path(p) for p in other_outputs]:
                guard.check(Path(path), "--out" if path == options.out else "path")
            if options.out is not None:
                make_output_folder(options.out.parent, "--out")
            engine.load()
            _warm_up(engine, frames.height, frames.width, options.threshold)
            server = None
            if serve_port is not None:
                server = MjpegServer(serve_port, serve_host or DEFAULT_HOST,
                                     title=f"{frames.name if frames.kind != 'file' else Path(frames.name).name} | "
                                           f"{Path(str(model)).name}").start()
            try:
                if on_ready is not None:
                    on_ready(f"streaming {frames.name} ({frames.width}x{frames.height}"
                             + (f" at {frames.fps:.3g} fps" if frames.fps else "") + ")"
                             + (f"; watch it at {server.url}" if server is not None else ""))
                return run_stream(engine, frames, options, source=frames.name, source_fps=frames.fps,
                                  server=server, on_tick=on_tick)
            finally:
                if server is not None:
                    server.close()
    finally:
        engine.close()
