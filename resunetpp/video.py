"""Video decoding and encoding through FFmpeg (PyAV, the ``av`` package): files, URLs, overlays.

The shared primitives of ``resunetpp infer`` on video files, ``resunetpp stream`` and
``resunetpp bench --video``:

* :func:`probe` -- a video's size, frame rate, frame count and codec, or one line naming the
  source and the problem (:class:`~resunetpp.errors.InputFileError`);
* :class:`VideoReader` -- decodes in its own daemon thread into a bounded queue (so decoding
  overlaps inference), converts each frame to RGB and, with ``resize_to``, also resizes it to the
  model's input ONCE in that thread with FFmpeg's swscale (``SWS_BILINEAR``, RGB to RGB: a
  triangle filter whose support widens with the downscale factor, like PIL's ``BILINEAR`` that
  :meth:`~resunetpp.preprocess.Preprocessing.apply` uses -- on smooth images the two differ by
  about 0.2 grey levels on average, 2 at most; ``AREA`` and ``BICUBIC`` differ by 2.6 and 4.3,
  ``FAST_BILINEAR``, which does not widen its support and aliases, by 3.3, 28 at most). A truncated or corrupt file yields every frame that
  decodes and then reports the problem (:attr:`VideoReader.error`); a file of which no frame
  decodes raises;
* :class:`VideoWriter` -- H.264 (``libx264``) into a temporary name beside the output, renamed
  when closed; an exception or Ctrl-C still flushes the encoder and closes the container, so the
  frames written so far form a playable file.

Why PyAV and not OpenCV: PyAV is FFmpeg itself (every container and codec FFmpeg has, exact
timestamps, frame counts, stream metadata, swscale, encoder options such as CRF), raises typed
errors that name the problem, and releases the GIL while decoding and encoding. OpenCV's
``VideoCapture`` hides errors (a corrupt file reads as "no more frames") and is used only for
cameras, where it is the portable way to open a device.

``av`` is imported inside functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from resunetpp.atomic import write_problem
from resunetpp.errors import InputFileError, OutputWriteError, ResUNetError

__all__ = ["VIDEO_SUFFIXES", "URL_SCHEMES", "INTERPOLATION", "Frame", "VideoInfo", "VideoReader", "VideoWriter",
           "is_url", "is_video_path", "probe"]

#: File suffixes read as videos (FFmpeg reads more; these are the ones a source claims by name).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts",
                  ".wmv", ".flv", ".3gp", ".ogv")
#: Network sources FFmpeg opens with an open/read timeout.
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "rtp://", "tcp://", "srt://")
#: swscale interpolation for the model-input resize; see the module docstring for why bilinear.
INTERPOLATION = "BILINEAR"
#: Seconds a URL may take to open, and a read may stall, before it fails with one line.
URL_TIMEOUT_S = 10.0
#: Output container per suffix (the temporary name ends in ``.partial``, so FFmpeg is told).
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi",
                     ".webm": "webm"}


def is_url(source: str | Path) -> bool:
    """Whether ``source`` is a network URL (``rtsp://``, ``http://``, ``udp://`` ...)."""
    return isinstance(source, str) and source.lower().startswith(URL_SCHEMES)


def is_video_path(path: str | Path) -> bool:
    """Whether ``path``'s suffix is a video container's (:data:`VIDEO_SUFFIXES`)."""
    return not is_url(path) and Path(str(path)).suffix.lower() in VIDEO_SUFFIXES


# ---- probing --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    """What a video source says about itself (``frames``: the container's count, when it has one)."""

    path_or_url: str
    width: int
    height: int
    fps: Fraction | None
    frames: int | None
    codec: str
    duration_s: float | None


AV_INSTALL_HINT = "video needs PyAV (the FFmpeg binding): pip install 'resunetpp[video]'"


def _import_av():
    """``import av``, or one line saying how to install it."""
    try:
        import av
    except ImportError:
        raise ResUNetError(AV_INSTALL_HINT) from None
    return av


def _av_problem(error: BaseException) -> str:
    """The one-line reason of a PyAV/FFmpeg error (no errno, no repeated file name)."""
    import av

    if isinstance(error, av.error.FileNotFoundError):
        return "no such file"
    if isinstance(error, av.error.IsADirectoryError):
        return "is a folder, not a video"
    if isinstance(error, av.error.PermissionError):
        return "cannot read it (Permission denied)"
    if isinstance(error, av.error.InvalidDataError):
        return "not a video, or corrupt (FFmpeg finds no readable container in it)"
    if isinstance(error, av.error.DemuxerNotFoundError):
        return "unsupported container (this FFmpeg build cannot read it)"
    if isinstance(error, av.error.DecoderNotFoundError):
        return "unsupported codec (this FFmpeg build has no decoder for it)"
    if isinstance(error, (av.error.ExitError, av.error.TimeoutError, TimeoutError)):
        return "no answer (timed out)"
    if isinstance(error, av.error.FFmpegError):
        text = error.strerror or type(error).__name__
        return f"cannot read it ({text})"
    return f"cannot read it ({error})"


def _open_container(source: str | Path, options: dict | None, timeout: float | None) -> Any:
    """``av.open`` for reading, errors as one :class:`InputFileError` line naming ``source``."""
    av = _import_av()

    text = str(source)
    if not is_url(text):
        path = Path(text)
        if path.is_dir():
            raise InputFileError(text, "is a folder, not a video")
        if not path.exists():
            raise InputFileError(text, "no such file")
        if not path.is_file():
            raise InputFileError(text, "not a regular file")
    if timeout is None and is_url(text):
        timeout = URL_TIMEOUT_S
    try:
        return av.open(text, "r", options={str(k): str(v) for k, v in (options or {}).items()},
                       timeout=timeout)
    except (av.error.FFmpegError, OSError, TimeoutError) as e:
        problem = _av_problem(e)
        if is_url(text) and isinstance(e, av.error.FFmpegError) and not isinstance(e, av.error.InvalidDataError):
            problem = f"cannot open the stream ({e.strerror or type(e).__name__})" \
                if "timed out" not in problem else f"cannot open the stream within {timeout:g} s (no answer)"
        raise InputFileError(text, problem) from None


def _video_stream(container: Any, source: str) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise InputFileError(source, "has no video stream" + (f" (only {', '.join(kinds)})" if kinds else ""))
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InputFileError(source, "unsupported codec (this FFmpeg build has no decoder for its video stream)")
    return stream


def _info(container: Any, stream: Any, source: str) -> VideoInfo:
    ctx = stream.codec_context
    if not ctx.width or not ctx.height:
        raise InputFileError(source, "its video stream has no frame size (corrupt or not a video)")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = Fraction(rate) if rate and rate > 0 else None
    frames = int(stream.frames) if stream.frames and stream.frames > 0 else None
    duration = None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000
    return VideoInfo(source, int(ctx.width), int(ctx.height), fps, frames, str(ctx.name), duration)


def probe(source: str | Path, *, options: dict | None = None, timeout: float | None = None) -> VideoInfo:
    """Open ``source`` (a file or a URL) and return its :class:`VideoInfo`.

    Raises :class:`~resunetpp.errors.InputFileError` (``<source>: <problem>``): no such file, not a
    video, no video stream, unsupported codec, unreadable, a URL that does not answer within
    ``timeout`` seconds (:data:`URL_TIMEOUT_S` by default).
    """
    text = str(source)
    container = _open_container(text, options, timeout)
    try:
        return _info(container, _video_stream(container, text), text)
    finally:
        container.close()


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """One decoded frame: ``image`` ``(H, W, 3)`` uint8 RGB at the source's size; ``model_input``
    the same frame resized in the decode thread to ``resize_to`` (``None`` without it);
    ``decoded_at`` the :func:`time.perf_counter` when the decoder produced it."""

    index: int
    pts_s: float
    image: np.ndarray
    model_input: np.ndarray | None
    decoded_at: float


_END = object()


class VideoReader:
    """The frames of a video file or stream, decoded in a daemon thread into a bounded queue.

    ``VideoReader(source, resize_to=(h, w))`` (``(height, width)``, as
    :attr:`Preprocessing.size <resunetpp.preprocess.Preprocessing.size>`) also hands each frame
    resized to the model's input (:data:`INTERPOLATION`, swscale). The source is opened in the
    constructor, so a missing file, a non-video, an unsupported codec or an unreachable URL raises
    there (:class:`InputFileError`); :attr:`info` is its :class:`VideoInfo`. Iterate once.

    ``realtime=True`` paces the frames at the file's own rate (a file played like a live source).
    ``drop_oldest=True`` never blocks the decoder: when the queue is full the oldest waiting frame
    is dropped and counted in :attr:`dropped` (a live source must be read as it comes).
    ``options``: FFmpeg options (e.g. ``{"rtsp_transport": "tcp"}``); ``timeout``: seconds a URL may
    take to open or stall (:data:`URL_TIMEOUT_S`).

    A packet that does not decode is skipped and counted (:attr:`decode_errors`); a file that ends
    early (fewer frames than its container announces, or a read error) stops the decoding. Either
    sets :attr:`error` to one line naming the source and the problem, calls ``on_warning(line)``
    once, and iteration ends normally after the frames that decoded. If no frame decodes at all,
    iterating raises :class:`InputFileError`.
    """

    def __init__(self, source: str | Path, *, resize_to: tuple[int, int] | None = None, queue_size: int = 8,
                 realtime: bool = False, options: dict | None = None, timeout: float | None = None,
                 drop_oldest: bool = False, on_warning: Callable[[str], None] | None = None,
                 interpolation: str = INTERPOLATION) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if resize_to is not None and (len(resize_to) != 2 or min(resize_to) < 1):
            raise ValueError(f"resize_to must be (height, width), positive, got {resize_to}")
        self.source = str(source)
        self.resize_to = None if resize_to is None else (int(resize_to[0]), int(resize_to[1]))
        self.realtime = realtime
        self.drop_oldest = drop_oldest
        self.interpolation = interpolation
        self.on_warning = on_warning
        self.error: str | None = None
        self.decode_errors = 0
        self.dropped = 0
        self.frames_decoded = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._iterated = False
        self._fatal: BaseException | None = None
        self._first_decode_error = ""
        self._container = _open_container(self.source, options, timeout)
        try:
            self._stream = _video_stream(self._container, self.source)
            self.info = _info(self._container, self._stream, self.source)
        except BaseException:
            self._container.close()
            raise
        self._stream.thread_type = "AUTO"  # frame + slice threads in the decoder
        from av.video.reformatter import VideoReformatter

        self._to_rgb, self._to_small = VideoReformatter(), VideoReformatter()

    # ---- the decode thread ---------------------------------------------------------------------------
    def _set_error(self, problem: str) -> None:
        if self.error is None:
            self.error = f"{self.source}: {problem}"
            if self.on_warning is not None:
                with contextlib.suppress(Exception):
                    self.on_warning(self.error)

    def _put(self, item: object) -> bool:
        """Queue ``item``; False when the reader was closed meanwhile."""
        while not self._stop.is_set():
            if self.drop_oldest and item is not _END:
                try:
                    self._queue.put_nowait(item)
                    return True
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self._queue.get_nowait()
                        self.dropped += 1
                    continue
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _convert(self, frame: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """The frame as RGB at the stream's size, and resized to ``resize_to`` (swscale, both with
        a cached context). The resize runs RGB -> RGB after the conversion: scaling straight from
        YUV 4:2:0 interpolates the half-resolution chroma differently (~9 grey levels from PIL's
        bilinear on smooth frames, against ~0.2 this way)."""
        w, h = self.info.width, self.info.height
        rgb = self._to_rgb.reformat(frame, width=w, height=h, format="rgb24", interpolation=self.interpolation)
        image = rgb.to_ndarray()
        small = None
        if self.resize_to is not None:
            th, tw = self.resize_to
            if (th, tw) == (h, w):
                small = image
            else:
                small = self._to_small.reformat(rgb, width=tw, height=th, format="rgb24",
                                                interpolation=self.interpolation).to_ndarray()
        return image, small

    def _decode(self) -> None:
        import av

        first_pts: float | None = None
        last_pts: float | None = None
        t0 = 0.0
        fps = float(self.info.fps) if self.info.fps else 25.0
        try:
            try:
                for packet in self._container.demux(self._stream):
                    if self._stop.is_set():
                        return
                    try:
                        decoded = packet.decode()
                    except av.error.DecoderNotFoundError:
                        self._set_error("unsupported codec (this FFmpeg build has no decoder for it)")
                        return
                    except (av.error.InvalidDataError, av.error.FFmpegError) as e:
                        self.decode_errors += 1
                        if self.decode_errors == 1:
                            self._first_decode_error = e.strerror or type(e).__name__
                        continue
                    for frame in decoded:
                        image, small = self._convert(frame)
                        index = self.frames_decoded
                        pts = frame.time if frame.time is not None else index / fps
                        if self.realtime:
                            if first_pts is None:
                                first_pts, t0 = pts, time.perf_counter()
                            delay = t0 + (pts - first_pts) - time.perf_counter()
                            if delay > 0 and self._stop.wait(delay):
                                return
                        last_pts = float(pts)
                        item = Frame(index, last_pts, image, small, time.perf_counter())
                        self.frames_decoded += 1
                        if not self._put(item):
                            return
            except (av.error.FFmpegError, OSError) as e:
                if self._stop.is_set():
                    return
                self._set_error(f"reading stopped after {self.frames_decoded} frame(s): {_av_problem(e)}")
            if self.error is None:
                self._check_complete(last_pts, fps)
        except BaseException as e:  # a bug or MemoryError: the consumer re-raises it
            self._fatal = e
        finally:
            self._put(_END)

    def _check_complete(self, last_pts: float | None, fps: float) -> None:
        """After the last packet: report a file that ends early or had packets that did not decode."""
        n, expected = self.frames_decoded, self.info.frames
        bad = (f"; {self.decode_errors} packet(s) did not decode ({self._first_decode_error})"
               if self.decode_errors else "")
        if is_url(self.source):
            if bad:
                self._set_error(f"corrupt stream: {n} frame(s) decoded{bad}")
            return
        if expected and n < expected:
            self._set_error(f"truncated or corrupt: {n} of {expected} frames decode{bad}")
            return
        duration = self.info.duration_s
        start = self._stream.start_time * self._stream.time_base if self._stream.start_time and \
            self._stream.time_base else 0.0
        if not expected and duration and n and last_pts is not None \
                and (last_pts - float(start)) + 1.0 / fps < duration - max(2.0 / fps, 0.05 * duration):
            self._set_error(f"truncated or corrupt: decoding stops at {last_pts - float(start):.2f} s of "
                            f"{duration:.2f} s ({n} frame(s)){bad}")
            return
        if bad:
            self._set_error(f"corrupt: {n} frame(s) decode{bad}")

    # ---- the consumer side -----------------------------------------------------------------------------
    def start(self) -> "VideoReader":
        """Start the decode thread (iterating starts it too)."""
        if not self._started:
            self._started = True
            self._thread = threading.Thread(target=self._decode, name="video-decode", daemon=True)
            self._thread.start()
        return self

    def __iter__(self) -> Iterator[Frame]:
        if self._iterated:
            raise RuntimeError(f"{self.source}: a VideoReader is iterated once")
        self._iterated = True
        self.start()
        while True:
            item = self._queue.get()
            if item is _END:
                break
            yield item
        if self._fatal is not None:
            raise self._fatal
        if self.frames_decoded == 0 and not self._stop.is_set():
            problem = self.error.split(": ", 1)[1] if self.error else "no frame"
            raise InputFileError(self.source, f"no frame decodes ({problem})")

    def close(self) -> None:
        """Stop the decode thread (promptly: it checks between frames) and close the container.

        A thread iterating the reader meanwhile stops too: the stopped decoder queues no end
        marker, so close() queues one (after the frames still queued are dropped)."""
        self._stop.set()
        self._drain()  # unblock a decoder waiting on a full queue
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._thread is None or not self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._container.close()
        self._drain()  # a frame the decoder queued before it saw the stop
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_END)  # wake a consumer blocked in __iter__

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---- writing ---------------------------------------------------------------------------------------------
class VideoWriter:
    """Encode RGB frames into ``path`` (H.264 in MP4 by default; the container from the suffix).

    The file is written under a temporary name beside ``path`` (``.<name>.<pid>-XXXXXXXX<suffix>.partial``,
    the convention of :mod:`resunetpp.atomic`, so a killed run's leftovers are swept) and renamed
    onto ``path`` by :meth:`close`. Leaving the ``with`` block by an exception -- KeyboardInterrupt
    included -- still flushes the encoder and finishes the container, so the frames written so far
    are a playable file; a writer that got no frame leaves nothing.

    Size and rate are kept exactly: ``yuv420p`` (what every player takes) needs even sides, so an
    odd-sized video is encoded as ``yuv444p`` (full-resolution chroma; High 4:4:4 profile, which
    FFmpeg-based players and VLC play, some browsers do not) rather than padded or cropped.
    No audio is written. ``crf`` is x264's constant quality (18: visually lossless; 23 is x264's default).
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: Fraction | float | int, *,
                 codec: str = "libx264", crf: int = 20, preset: str = "veryfast", pix_fmt: str | None = None,
                 options: dict | None = None) -> None:
        av = _import_av()
        self.path = Path(path)
        if width < 1 or height < 1:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        rate = Fraction(fps).limit_denominator(1_000_000) if not isinstance(fps, Fraction) else fps
        if rate <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.width, self.height, self.fps = int(width), int(height), rate
        self.pix_fmt = pix_fmt or ("yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p")
        self.frames_written = 0
        self._last_pts = -1  # the last frame's tick of 1/fps
        self._last_pts_s: float | None = None  # and its time in seconds
        self._closed = False
        suffix = self.path.suffix.lower()
        fmt = CONTAINER_FORMATS.get(suffix)
        if fmt is None:
            raise ResUNetError(f"{self.path}: unsupported video suffix {suffix or '(none)'} "
                               f"(use one of {', '.join(sorted(CONTAINER_FORMATS))})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{os.getpid()}-", suffix=f"{suffix}.partial",
                                       dir=self.path.parent)
            os.close(fd)
        except OSError as e:
            raise OutputWriteError(self.path, write_problem(e), e.errno, e.strerror) from None
        self.tmp_path = Path(tmp)
        copts = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
        try:
            self._container = av.open(str(self.tmp_path), "w", format=fmt, options=copts)
            stream = self._container.add_stream(codec, rate=rate)
            stream.width, stream.height = self.width, self.height
            stream.pix_fmt = self.pix_fmt
            opts = {"crf": str(crf), "preset": preset} if codec in ("libx264", "libx265") else {}
            opts.update({str(k): str(v) for k, v in (options or {}).items()})
            stream.options = opts
            stream.codec_context.time_base = Fraction(1) / rate
            self._stream = stream
        except BaseException as e:
            with contextlib.suppress(Exception):
                self._container.close()
            with contextlib.suppress(FileNotFoundError):
                self.tmp_path.unlink()
            if isinstance(e, (av.error.FFmpegError, ValueError)):
                raise ResUNetError(f"{self.path}: cannot encode {codec} {self.pix_fmt} at {width}x{height} "
                                   f"({getattr(e, 'strerror', None) or e})") from None
            raise

    def write(self, image: np.ndarray, pts_s: float | None = None) -> None:
        """Encode one ``(H, W, 3)`` uint8 RGB frame of the writer's size.

        Timestamps count in ticks of ``1/fps``. ``pts_s=None``: the frame is shown one tick after
        the previous one (a constant-rate video at the nominal rate). ``pts_s`` given: the frame is
        shown at that presentation time in seconds from the start of the file (a live source's
        timestamps, so frames skipped by a drop policy leave the timing honest instead of speeding
        the video up: a variable-rate file). Timestamps must be strictly increasing (a
        ``ValueError`` otherwise); each is rounded to the nearest tick, and one that rounds onto
        the previous frame's tick (a source faster than ``fps``) is moved to the next tick.
        """
        import av

        if self._closed:
            raise RuntimeError(f"{self.path}: the writer is closed")
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
                and image.shape == (self.height, self.width, 3)):
            got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"{self.path}: frame is {got}, expected ({self.height}, {self.width}, 3) uint8")
        if pts_s is None:
            pts = self._last_pts + 1
        else:
            pts_s = float(pts_s)
            if not np.isfinite(pts_s) or pts_s < 0:
                raise ValueError(f"{self.path}: timestamp {pts_s} s is not a time from the start of the file")
            if self._last_pts_s is not None and pts_s <= self._last_pts_s:
                raise ValueError(f"{self.path}: timestamp {pts_s} s is not after the previous frame's "
                                 f"({self._last_pts_s} s)")
            pts = max(int(round(pts_s * self.fps)), self._last_pts + 1)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts
        frame.time_base = Fraction(1) / self.fps
        try:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        except OSError as e:
            raise OutputWriteError(self.path, write_problem(e), e.errno, e.strerror) from None
        self._last_pts = pts
        self._last_pts_s = pts_s if pts_s is not None else float(pts / self.fps)
        self.frames_written += 1

    @property
    def last_pts_s(self) -> float | None:
        """The presentation time (seconds) of the last frame written; None before the first."""
        return self._last_pts_s

    def close(self) -> None:
        """Flush the encoder, finish the container and rename it onto :attr:`path` (idempotent).
        With no frame written, the temporary is removed and :attr:`path` is left as it was."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                if self.frames_written:
                    for packet in self._stream.encode():
                        self._container.mux(packet)
            finally:
                self._container.close()
            if self.frames_written:
                os.replace(self.tmp_path, self.path)
        except OSError as e:
            raise OutputWriteError(self.path, write_problem(e), e.errno, e.strerror) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.tmp_path.unlink()

    def abort(self) -> None:
        """Close without keeping anything (the temporary is removed)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._container.close()
            with contextlib.suppress(FileNotFoundError):
                self.tmp_path.unlink()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # also on an exception (Ctrl-C included): the frames written so far stay a playable file
        self.close()
