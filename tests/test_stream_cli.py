"""``resunetpp stream`` end to end on a synthetic clip: a file, a real HTTP stream, Ctrl-C / SIGTERM
leaving a playable overlay video, unreachable URLs and bad inputs as one line."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_checkpoint

av = pytest.importorskip("av")

from resunetpp.cli import app  # noqa: E402

runner = CliRunner()
FRAMES, WIDTH, HEIGHT = 20, 64, 48


def write_clip(path: Path, frames: int = FRAMES, width: int = WIDTH, height: int = HEIGHT, fps: int = 25) -> Path:
    """A moving bright ellipse on a textured background, H.264 at ``fps``."""
    from resunetpp.video import VideoWriter

    rng = np.random.default_rng(0)
    background = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    with VideoWriter(path, width, height, fps) as writer:
        for i in range(frames):
            image = background.copy()
            cx = width * (0.3 + 0.4 * i / max(1, frames - 1))
            image[((yy - height / 2) / (height / 4)) ** 2 + ((xx - cx) / (width / 6)) ** 2 <= 1] = (220, 180, 160)
            writer.write(image)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def decoded_frames(path: Path) -> list:
    with av.open(str(path)) as container:
        return [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def test_file_drop_none_streams_every_frame(clip, model, tmp_path):
    out, summary = tmp_path / "live.mp4", tmp_path / "summary.json"
    result = runner.invoke(app, ["stream", str(clip), str(model), "--drop", "none", "--out", str(out),
                                 "--json", str(summary)])
    assert result.exit_code == 0, result.output
    s = json.loads(summary.read_text())
    assert (s["frames_decoded"], s["frames_inferred"], s["frames_dropped"], s["frames_output"]) == (FRAMES, FRAMES, 0, FRAMES)
    assert (s["width"], s["height"], s["source_fps"]) == (WIDTH, HEIGHT, 25.0)
    assert s["latency_p50_ms"] > 0 and s["latency_p99_ms"] >= s["latency_p50_ms"]
    assert s["kept_up"] in (True, False) and s["out"] == str(out)
    frames = decoded_frames(out)
    assert len(frames) == FRAMES and frames[0][1].shape == (HEIGHT, WIDTH, 3)
    assert [round(t, 3) for t, _ in frames] == [round(i / 25, 3) for i in range(FRAMES)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_writer_keeps_the_source_timestamps_of_the_frames_it_gets(tmp_path):
    """With drop latest the file holds the inferred frames at their source times (honest rate)."""
    from resunetpp.engines.stream import _open_writer

    writer = _open_writer(tmp_path / "x.mp4", 32, 24, Fraction(25), "veryfast")
    times = [0.0, 0.04, 0.2, 0.24, 0.6]
    for i, t in enumerate(times):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8), t)
    writer.close()
    got = decoded_frames(tmp_path / "x.mp4")
    assert [round(t, 3) for t, _ in got] == times  # not 0, 0.04, 0.08 ...: time runs as it did live
    assert np.allclose([image.mean() for _, image in got], [0, 40, 80, 120, 160], atol=3)  # in order


def test_http_stream(clip, model, tmp_path):
    """A real HTTP source: the clip served by a local http.server."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(clip.parent))
    handler.log_message = lambda *a, **k: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{clip.name}"
        summary = tmp_path / "s.json"
        result = runner.invoke(app, ["stream", url, str(model), "--drop", "none", "--json", str(summary)])
        assert result.exit_code == 0, result.output
        s = json.loads(summary.read_text())
        assert s["source"] == url
        assert (s["frames_decoded"], s["frames_inferred"], s["frames_dropped"]) == (FRAMES, FRAMES, 0)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("url", ["rtsp://127.0.0.1:9/x", "http://127.0.0.1:9/x.mp4"])
def test_unreachable_url_is_one_line_within_seconds(url, model):
    start = time.perf_counter()
    result = runner.invoke(app, ["stream", url, str(model)])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}: "), result.output


def test_bad_sources_and_outputs_are_one_line(clip, model, tmp_path):
    cases = [
        (["stream", str(tmp_path / "missing.mp4"), str(model)], f"{tmp_path / 'missing.mp4'}: no such file"),
        (["stream", str(clip), str(model), "--out", str(clip)], "is an input of this run"),
        (["stream", str(clip), str(model), "--out", str(tmp_path / "x.png")], "--out must be a video file"),
        (["stream", "rtsp://127.0.0.1:9/x", str(model), "--loop"], "--loop replays a file"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, result.output)
    assert clip.stat().st_size > 0  # never written over


def _default_sigint() -> None:
    # a suite started in the background (`make test &`) runs with SIGINT ignored, which children inherit
    # and Python then leaves ignored (no KeyboardInterrupt): the child gets the default, as from a terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "resunetpp", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 60) -> str:
    """Read stderr until a line starts with ``prefix`` (the process is still running)."""
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line
    proc.kill()
    raise AssertionError(f"no {prefix!r} line; stderr: {''.join(seen)}; stdout: {proc.stdout.read()}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_leaves_a_playable_overlay_video(clip, model, tmp_path, sig):
    out, summary = tmp_path / "live.mp4", tmp_path / "summary.json"
    proc = _start(["stream", str(clip), str(model), "--realtime", "--loop", "--out", str(out),
                   "--json", str(summary)], tmp_path)
    _wait_for_line(proc, "streaming ")
    time.sleep(1.5)  # a second and a half of a 25 fps clip, looping
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopped (Ctrl-C)" in stderr
    s = json.loads(summary.read_text())
    assert s["interrupted"] is True
    assert s["frames_decoded"] == s["frames_inferred"] + s["frames_dropped"]
    frames = decoded_frames(out)  # the file is finished: every frame written decodes
    assert len(frames) == s["frames_output"] > 0
    assert frames[0][1].shape == (HEIGHT, WIDTH, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_drop_latest_on_a_live_file_writes_inferred_frames_at_their_source_times(clip, model, tmp_path, monkeypatch):
    """A model slower than the source (60 ms a frame against 40 ms): frames are dropped and counted,
    and the overlay video holds the inferred ones at their own source times (not re-timed to 25 fps)."""
    from resunetpp.engines.base import Engine

    original = Engine.predict

    def slow_predict(self, batch):
        time.sleep(0.06)
        return original(self, batch)

    monkeypatch.setattr(Engine, "predict", slow_predict)
    out, summary = tmp_path / "live.mp4", tmp_path / "s.json"
    result = runner.invoke(app, ["stream", str(clip), str(model), "--realtime", "--drop", "latest", "--out", str(out),
                                 "--json", str(summary)])
    assert result.exit_code == 0, result.output
    s = json.loads(summary.read_text())
    assert s["frames_decoded"] == FRAMES == s["frames_inferred"] + s["frames_dropped"]
    assert s["frames_dropped"] >= 3 and s["kept_up"] is False
    times = [t for t, _ in decoded_frames(out)]
    assert len(times) == s["frames_output"] == s["frames_inferred"]
    slots = [round(t * 25, 3) for t in times]
    assert all(slot == int(slot) for slot in slots)  # each at a source frame's time ...
    assert slots == sorted(set(slots)) and slots[-1] > len(slots) - 1  # ... with the gaps of the dropped ones
