"""The live pipeline (resunetpp.engines.stream) on fake sources and fake engines: exact drop counts,
bounded queues, stopping, latencies; the fast frame overlay; the MJPEG server; an absent camera."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from resunetpp.engines.stream import StreamOptions, StreamRun, run_stream
from resunetpp.mjpeg import BOUNDARY, MjpegServer
from resunetpp.outputs import overlay_image
from resunetpp.preprocess import Preprocessing


@dataclass(frozen=True)
class FakeFrame:
    index: int
    pts_s: float
    image: np.ndarray
    model_input: np.ndarray | None
    decoded_at: float


class FakeEngine:
    """Predicts a centred square (prob 0.9) after ``delay`` seconds; counts calls."""

    def __init__(self, delay: float = 0.0, size: int = 32) -> None:
        self.preprocessing = Preprocessing(size=(size, size))
        self.num_classes = 1
        self.delay = delay
        self.calls = 0
        self.size = size

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert x.shape == (1, 3, self.size, self.size) and x.dtype == np.float32
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        probs = np.full((x.shape[0], 1, self.size, self.size), 0.1, np.float32)
        q = self.size // 4
        probs[:, :, q:-q, q:-q] = 0.9
        return probs

    def describe(self) -> dict:
        return {"backend": "fake", "device": "cpu", "precision": "fp32"}


def fake_frames(n: int, size: tuple[int, int] = (48, 64), every: float = 0.0, produced: list | None = None):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    for i in range(n):
        if every:
            time.sleep(every)
        if produced is not None:
            produced.append(time.perf_counter())
        image = np.roll(base, i, axis=1)
        yield FakeFrame(i, i / 25.0, image, None, time.perf_counter())


def test_drop_latest_counts_every_frame_with_a_slow_engine():
    engine = FakeEngine(delay=0.02)
    result = run_stream(engine, fake_frames(200, every=0.001), StreamOptions(drop="latest"), source="fake",
                        source_fps=25.0)
    assert result.frames_decoded == 200
    assert result.frames_inferred == engine.calls
    assert result.frames_decoded == result.frames_inferred + result.frames_dropped
    assert result.frames_dropped > 50  # ~1 ms a frame against 20 ms an inference (most are dropped)
    assert result.frames_output == result.frames_inferred
    assert result.kept_up is False
    assert result.latency_p50_ms is not None and result.latency_p50_ms >= 20.0


def test_drop_none_infers_every_frame_and_blocks_the_decoder():
    engine = FakeEngine(delay=0.01)
    produced: list[float] = []
    inferred_at: list[float] = []
    original = engine.predict

    def predict(x):
        out = original(x)
        inferred_at.append(time.perf_counter())
        return out

    engine.predict = predict
    options = StreamOptions(drop="none", queue_size=2)
    result = run_stream(engine, fake_frames(60, produced=produced), options, source="fake")
    assert (result.frames_decoded, result.frames_inferred, result.frames_dropped) == (60, 60, 0)
    assert result.frames_output == 60
    # the decoder waits: when frame k is produced, at most k - (queue + stages in flight) were inferred
    for k in range(20, 60):
        done = sum(t <= produced[k] for t in inferred_at)
        assert k - done <= 2 + 2 * options.queue_size + 3, (k, done)


def test_frames_limit_and_order_of_outputs():
    published: list[np.ndarray] = []
    run = StreamRun(FakeEngine(), fake_frames(100), StreamOptions(drop="none", frames=10), source="fake",
                    publish=published.append)
    run.start()
    assert run.join(timeout=20)
    result = run.finish()
    assert (result.frames_decoded, result.frames_inferred, result.frames_output) == (10, 10, 10)
    assert len(published) == 10 and published[0].shape == (48, 64, 3)
    assert result.size == (64, 48)
    # the overlay of frame 0: its image, the engine's probabilities restored to 48x64, thresholded
    first = next(fake_frames(1))
    engine = FakeEngine()
    probs = engine.predict(engine.preprocessing.apply(first.image)[None])[0]
    mask = (engine.preprocessing.restore(probs, 48, 64)[0] > 0.5).astype(np.uint8)
    assert 0 < mask.sum() < mask.size
    assert np.array_equal(published[0], np.asarray(overlay_image(first.image, mask, 1)))


def test_stop_mid_run_keeps_the_counts_exact():
    engine = FakeEngine(delay=0.01)

    def endless():
        i = 0
        while True:
            time.sleep(0.002)
            yield FakeFrame(i, i / 25, np.zeros((32, 32, 3), np.uint8), None, time.perf_counter())
            i += 1

    for drop in ("latest", "none"):
        run = StreamRun(engine, endless(), StreamOptions(drop=drop), source="fake").start()
        time.sleep(0.4)
        run.stop()
        assert run.join(timeout=10)
        run._threads[0].join(timeout=5)
        result = run.finish()
        assert result.frames_decoded > 5
        assert result.frames_decoded == result.frames_inferred + result.frames_dropped, drop


def test_keyboard_interrupt_returns_the_summary(monkeypatch):
    """Ctrl-C in the waiting thread: run_stream stops the stages and returns interrupted=True."""
    engine = FakeEngine(delay=0.005)
    calls = {"n": 0}

    def tick(snapshot):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    result = run_stream(engine, fake_frames(10_000, every=0.002), StreamOptions(drop="latest"), source="fake",
                        on_tick=tick, tick_s=0.1)
    assert result.interrupted
    assert 0 < result.frames_decoded < 10_000
    assert result.frames_decoded == result.frames_inferred + result.frames_dropped


def test_a_failing_source_raises_after_clean_up():
    from resunetpp.errors import InputFileError

    def broken():
        yield from fake_frames(3)
        raise InputFileError("rtsp://camera/x", "reading stopped")

    with pytest.raises(InputFileError, match="rtsp://camera/x: reading stopped"):
        run_stream(FakeEngine(), broken(), StreamOptions(drop="none"), source="fake")


def test_options_are_checked():
    from resunetpp.errors import ResUNetError

    with pytest.raises(ResUNetError, match="--drop"):
        StreamOptions(drop="oldest").validate()
    with pytest.raises(ResUNetError, match="--frames"):
        StreamOptions(frames=0).validate()


# ---- MJPEG server ------------------------------------------------------------------------------------------
def _get(url: str, timeout: float = 5.0) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.headers["Content-Type"], r.read()


def test_mjpeg_server_pages_and_a_slow_client():
    rng = np.random.default_rng(1)
    frames = [np.ascontiguousarray(np.broadcast_to(rng.integers(0, 255, 3, dtype=np.uint8), (40, 56, 3)))
              for _ in range(3)]
    with MjpegServer(0, stats=lambda: {"fps": 12.5, "frames_dropped": 3}) as server:
        assert server.host == "127.0.0.1"
        kind, page = _get(server.url)
        assert kind.startswith("text/html") and b'<img id="live" src="/stream.mjpg"' in page
        assert json.loads(_get(server.url + "stats.json")[1]) == {"fps": 12.5, "frames_dropped": 3}
        with pytest.raises(urllib.error.HTTPError):
            _get(server.url + "frame.jpg")  # nothing published yet: 503
        server.publish(frames[0])
        kind, data = _get(server.url + "frame.jpg")
        assert kind == "image/jpeg"
        got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert got.shape == (40, 56, 3) and np.abs(got - frames[0]).max() <= 4

        # a client that reads the multipart stream: the newest frame first, then each newer one
        stream = urllib.request.urlopen(server.url + "stream.mjpg", timeout=5)
        assert stream.headers["Content-Type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"

        def part() -> np.ndarray:
            assert stream.readline() == f"--{BOUNDARY}\r\n".encode()
            headers = {}
            while (line := stream.readline()) != b"\r\n":
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            assert headers["content-type"] == "image/jpeg"
            body = stream.read(int(headers["content-length"]))
            assert stream.read(2) == b"\r\n"
            return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)

        assert np.abs(part() - frames[0]).max() <= 4
        # the client stops reading; publishing never waits for it (100 frames in well under a second)
        start = time.perf_counter()
        for i in range(100):
            server.publish(frames[1 + i % 2])
        assert time.perf_counter() - start < 1.0
        server.publish(frames[2])
        seen = [part() for _ in range(1)]  # frames the server had already sent on, then the newest
        while np.abs(seen[-1] - frames[2]).max() > 4:
            assert len(seen) < 3, "the client got a backlog instead of the newest frame"
            seen.append(part())
        stream.close()
    # closed: the port is released
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{server.requested_port or 1}/", timeout=1)


def test_mjpeg_port_in_use_is_one_line():
    from resunetpp.errors import ResUNetError

    with MjpegServer(0) as first:
        with pytest.raises(ResUNetError, match=f"--serve {first.port}: cannot listen on 127.0.0.1:{first.port}"):
            MjpegServer(first.port).start()


# ---- camera ------------------------------------------------------------------------------------------------
def test_absent_camera_is_one_line_and_exit_1(tiny_ckpt):
    from resunetpp.cli import app

    result = CliRunner().invoke(app, ["stream", "7", str(tiny_ckpt)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: camera 7: not found (OpenCV cannot open /dev/video7: no such camera, or it is in use)"]


def test_mask_is_what_infer_computes_and_an_empty_frame_skips_the_resize():
    engine = FakeEngine()
    run = StreamRun(engine, [], StreamOptions(threshold=0.5))
    pre = engine.preprocessing
    rng = np.random.default_rng(5)
    for probs in (rng.random((1, 32, 32), dtype=np.float32), np.full((1, 32, 32), 0.2, np.float32),
                  np.pad(np.full((1, 2, 2), 0.51, np.float32), ((0, 0), (15, 15), (15, 15)))):
        expected = (pre.restore(probs, 50, 70)[0] > 0.5).astype(np.uint8)
        assert np.array_equal(run._mask(probs, 50, 70), expected)


class FakeCapture:
    """cv2.VideoCapture stand-in: a camera giving BGR frames (blue-ish, the index in pixel 0) at ~200 fps."""

    opened: list[int] = []

    def __init__(self, index, *args):
        self.index = index
        self.n = 0
        self.released = False
        FakeCapture.opened.append(index)

    def isOpened(self):
        return self.index == 0

    def read(self):
        time.sleep(0.005)
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[..., 0] = 200  # B
        frame[..., 2] = 10  # R
        frame[0, 0] = (self.n % 256, 0, 0)
        self.n += 1
        return True, frame

    def get(self, prop):
        import cv2

        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self):
        self.released = True


def test_camera_reader_gives_rgb_frames_resized_in_its_thread(monkeypatch):
    cv2 = pytest.importorskip("cv2")
    from resunetpp.sources.camera import CameraReader, camera_index

    assert (camera_index("0"), camera_index("12"), camera_index("clip.mp4"), camera_index("rtsp://x/0")) == \
        (0, 12, None, None)
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    with CameraReader(0, resize_to=(16, 24)) as camera:
        assert (camera.width, camera.height, camera.fps) == (64, 48, 30.0)
        frames = []
        for frame in camera:
            frames.append(frame)
            if len(frames) == 5:
                break
    assert [f.index for f in frames] == sorted({f.index for f in frames})
    assert all(b.pts_s > a.pts_s for a, b in zip(frames, frames[1:]))
    image = frames[0].image
    assert image.shape == (48, 64, 3) and tuple(image[5, 5]) == (10, 0, 200)  # RGB
    assert frames[0].model_input.shape == (16, 24, 3) and tuple(frames[0].model_input[8, 8]) == (10, 0, 200)
    assert camera._capture.released and not camera._thread.is_alive()


def test_camera_stream_counts_every_frame(monkeypatch, tiny_ckpt, tmp_path):
    cv2 = pytest.importorskip("cv2")
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    from resunetpp.cli import app

    summary = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["stream", "0", str(tiny_ckpt), "--frames", "15", "--drop", "none",
                                      "--json", str(summary)])
    assert result.exit_code == 0, result.output
    s = json.loads(summary.read_text())
    assert s["source"] == "camera 0" and s["source_fps"] == 30.0 and (s["width"], s["height"]) == (64, 48)
    assert s["frames_inferred"] == 15
    assert s["frames_decoded"] == s["frames_inferred"] + s["frames_dropped"]
