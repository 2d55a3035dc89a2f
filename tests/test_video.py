"""The video primitives (resunetpp.video): probe, VideoReader, VideoWriter, on synthetic clips made
here with PyAV -- tiny (64x48, a few frames), known colours, frame counts and rates."""

from __future__ import annotations

import socket
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from conftest import make_audio_only, mux_silence  # noqa: E402
from resunetpp import video  # noqa: E402
from resunetpp.atomic import clean_stale_temporaries, is_stale_temporary  # noqa: E402
from resunetpp.errors import InputFileError, ResUNetError  # noqa: E402
from resunetpp.outputs import overlay_array, overlay_image  # noqa: E402

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def colour_frame(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    a = np.empty((h, w, 3), np.uint8)
    a[:] = COLOURS[i % 3]
    return a


def noise_frame(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    """Frames that do not compress to almost nothing, so a cut file loses some of them."""
    return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_clip(path: Path, n: int = 10, w: int = 64, h: int = 48, fps: int = 25, frame=colour_frame,
              pix_fmt: str = "yuv420p", container_options: dict | None = None, codec: str = "libx264",
              audio: bool = False) -> Path:
    """A clip written straight with PyAV (not through VideoWriter, so the reader is tested alone)."""
    c = av.open(str(path), "w", options=container_options or {})
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, pix_fmt
    if codec == "libx264":
        s.options = {"crf": "10", "preset": "ultrafast"}
    a = c.add_stream("aac", rate=8000) if audio else None
    for i in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(frame(i, w, h), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    if a is not None:
        mux_silence(c, a)
    c.close()
    return path


def close_to(a: np.ndarray, colour: tuple[int, int, int], tol: int = 6) -> bool:
    return bool(np.all(np.abs(a.reshape(-1, 3).mean(0) - np.asarray(colour)) <= tol))


# ---- probe ---------------------------------------------------------------------------------------------
def test_probe_reports_size_rate_count_codec(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=10, fps=25)
    info = video.probe(clip)
    assert (info.width, info.height, info.fps, info.frames, info.codec) == (64, 48, Fraction(25), 10, "h264")
    assert info.path_or_url == str(clip)
    assert info.duration_s == pytest.approx(0.4, abs=0.05)


def test_probe_of_odd_sized_ntsc_rate(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mkv", n=4, w=63, h=47, fps=Fraction(30000, 1001), pix_fmt="yuv444p")
    info = video.probe(clip)
    assert (info.width, info.height) == (63, 47)
    assert info.fps == Fraction(30000, 1001)
    assert info.frames is None  # Matroska keeps no frame count


@pytest.mark.parametrize("case, problem", [
    ("missing", "no such file"),
    ("folder", "is a folder, not a video"),
    ("text", "not a video, or corrupt"),
    ("audio", "has no video stream (only audio)"),
    ("codec", "unsupported codec"),
])
def test_probe_and_reader_refuse_in_one_line(tmp_path: Path, case: str, problem: str) -> None:
    path = tmp_path / "x.mp4"
    if case == "folder":
        path.mkdir()
    elif case == "text":
        path.write_text("this is not a video\n" * 50)
    elif case == "audio":
        path = make_audio_only(tmp_path / "x.m4a")
    elif case == "codec":  # an H.264 clip whose sample entry says a codec FFmpeg does not know
        data = make_clip(tmp_path / "ok.mp4").read_bytes()
        assert data.count(b"avc1") >= 1
        path.write_bytes(data.replace(b"avc1", b"zzzz"))
    for call in (video.probe, video.VideoReader):
        with pytest.raises(InputFileError) as err:
            call(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg


# ---- reading ---------------------------------------------------------------------------------------------
def test_reader_yields_every_frame_in_order_with_colours_and_times(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=10, fps=25)
    with video.VideoReader(clip) as reader:
        assert reader.info.frames == 10
        frames = list(reader)
        assert reader.error is None and reader.decode_errors == 0
    assert [f.index for f in frames] == list(range(10))
    assert [f.pts_s for f in frames] == pytest.approx([i / 25 for i in range(10)])
    for f in frames:
        assert f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8
        assert f.model_input is None
        assert close_to(f.image, COLOURS[f.index % 3])
    assert all(a.decoded_at <= b.decoded_at for a, b in zip(frames, frames[1:]))


def test_reader_resizes_in_the_decode_thread_like_pil_bilinear(tmp_path: Path) -> None:
    from PIL import Image, ImageFilter

    def smooth(i: int, w: int, h: int) -> np.ndarray:
        img = Image.fromarray(noise_frame(i, w // 8, h // 8)).resize((w, h), Image.BICUBIC)
        return np.asarray(img.filter(ImageFilter.GaussianBlur(2)))

    clip = make_clip(tmp_path / "c.mp4", n=3, w=192, h=128, frame=smooth)
    seen = []
    with video.VideoReader(clip, resize_to=(32, 48)) as reader:
        for f in reader:
            assert f.model_input.shape == (32, 48, 3) and f.model_input.dtype == np.uint8
            pil = np.asarray(Image.fromarray(f.image).resize((48, 32), Image.BILINEAR)).astype(int)
            seen.append(np.abs(f.model_input.astype(int) - pil).mean())
    assert len(seen) == 3
    assert max(seen) < 2.0  # swscale's bilinear on YUV vs PIL's on RGB: the same filter, chroma aside


def test_reader_resize_to_the_source_size_is_the_image(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=2)
    with video.VideoReader(clip, resize_to=(48, 64)) as reader:
        f = next(iter(reader))
    assert f.model_input is f.image


def test_reader_queue_is_bounded_and_close_stops_the_thread(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=40)
    reader = video.VideoReader(clip, queue_size=2)
    it = iter(reader)
    next(it)
    time.sleep(0.3)
    assert reader.frames_decoded <= 1 + 2 + 1  # one consumed, two queued, one waiting to be put
    start = time.perf_counter()
    reader.close()
    assert time.perf_counter() - start < 2.0
    assert not reader._thread.is_alive()


@pytest.mark.parametrize("queue_size", [1, 8])
def test_close_wakes_a_thread_iterating_the_reader(tmp_path: Path, queue_size: int) -> None:
    """A consumer thread blocked waiting for the next (paced) frame finishes when another thread
    closes the reader: close() queues the end marker the stopped decoder does not."""
    clip = make_clip(tmp_path / "c.mp4", n=50, fps=5)  # 10 s of frames, one every 0.2 s
    reader = video.VideoReader(clip, realtime=True, queue_size=queue_size)
    got: list[int] = []
    first = threading.Event()

    def consume() -> None:
        for frame in reader:
            got.append(frame.index)
            first.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert first.wait(5.0)
    reader.close()
    consumer.join(timeout=1.0)
    assert not consumer.is_alive()
    assert 1 <= len(got) < 50


def test_reader_realtime_paces_at_the_native_rate(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=6, fps=10)
    start = time.perf_counter()
    with video.VideoReader(clip, realtime=True) as reader:
        frames = list(reader)
    elapsed = time.perf_counter() - start
    assert len(frames) == 6
    assert elapsed >= 0.45  # 6 frames at 10 fps: the last one is due 0.5 s after the first
    gaps = [b.decoded_at - a.decoded_at for a, b in zip(frames, frames[1:])]
    assert min(gaps) >= 0.08


def test_reader_drop_oldest_never_blocks_the_decoder(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=30)
    with video.VideoReader(clip, queue_size=2, drop_oldest=True) as reader:
        reader.start()
        deadline = time.perf_counter() + 10
        while reader.frames_decoded < 30 and time.perf_counter() < deadline:
            time.sleep(0.02)  # nobody consumes: the decoder goes on, dropping the oldest
        frames = list(reader)
    assert reader.dropped == 30 - 2
    assert [f.index for f in frames] == [28, 29]  # the newest ones are kept


def test_truncated_file_yields_the_frames_that_decode_then_reports(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=30, frame=noise_frame, container_options={"movflags": "+faststart"})
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:int(len(data) * 0.5)])
    warnings: list[str] = []
    with video.VideoReader(cut, on_warning=warnings.append) as reader:
        frames = list(reader)
    assert 0 < len(frames) < 30
    assert [f.index for f in frames] == list(range(len(frames)))
    assert reader.error == f"{cut}: truncated or corrupt: {len(frames)} of 30 frames decode" or \
        reader.error.startswith(f"{cut}: truncated or corrupt: {len(frames)} of 30 frames decode;")
    assert warnings == [reader.error]
    with video.VideoReader(clip) as whole:  # the frames that decode are the file's first ones
        for f, g in zip(frames, whole):
            assert f.index == g.index and np.array_equal(f.image, g.image)


def test_truncated_matroska_without_a_frame_count_is_reported_from_its_duration(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mkv", n=30, frame=noise_frame)
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[:int(len(data) * 0.5)])
    with video.VideoReader(cut) as reader:
        frames = list(reader)
    assert 0 < len(frames) < 30
    assert reader.error.startswith(f"{cut}: truncated or corrupt: decoding stops at ")


def test_a_file_of_which_no_frame_decodes_raises_one_line(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=30, frame=noise_frame, container_options={"movflags": "+faststart"})
    data = clip.read_bytes()
    moov_end = data.index(b"mdat") + 4  # keep the header, cut inside the first frame's data
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:moov_end + 64])
    with video.VideoReader(cut) as reader:
        with pytest.raises(InputFileError) as err:
            list(reader)
    msg = str(err.value)
    assert msg.startswith(f"{cut}: no frame decodes (") and "\n" not in msg


def test_unreachable_url_fails_within_the_timeout(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts the connection, never answers
    port = server.getsockname()[1]
    try:
        start = time.perf_counter()
        with pytest.raises(InputFileError) as err:
            video.probe(f"http://127.0.0.1:{port}/live.mp4", timeout=1.0)
        assert time.perf_counter() - start < 8.0
    finally:
        server.close()
    assert str(err.value).startswith(f"http://127.0.0.1:{port}/live.mp4: cannot open the stream")

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    with pytest.raises(InputFileError) as err:
        video.VideoReader(f"rtsp://127.0.0.1:{port}/cam", timeout=1.0)
    assert str(err.value) == f"rtsp://127.0.0.1:{port}/cam: cannot open the stream (Connection refused)"


# ---- writing ---------------------------------------------------------------------------------------------
def test_writer_round_trip_keeps_count_size_rate_and_colours(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    with video.VideoWriter(out, 64, 48, Fraction(25)) as w:
        for i in range(10):
            w.write(colour_frame(i))
        assert not out.exists()  # under a temporary name until closed
        assert w.tmp_path.parent == tmp_path and w.tmp_path.name.startswith(".o.mp4.")
    assert w.frames_written == 10 and out.is_file() and not w.tmp_path.exists()
    info = video.probe(out)
    assert (info.width, info.height, info.fps, info.frames, info.codec) == (64, 48, Fraction(25), 10, "h264")
    with video.VideoReader(out) as r:
        frames = list(r)
    assert [close_to(f.image, COLOURS[f.index % 3]) for f in frames] == [True] * 10
    with av.open(str(out)) as c:
        assert c.streams.video[0].pix_fmt == "yuv420p" and not c.streams.audio


def _frame_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as container:
        return [float(f.time) for f in container.decode(video=0)]


def test_writer_timestamps_nominal_rate_and_given_times(tmp_path: Path) -> None:
    """write(image): one tick of 1/fps after the previous frame; write(image, pts_s): at that time
    (rounded to a tick; one rounding onto the previous tick moves to the next); the two mix."""
    frame = np.zeros((48, 64, 3), np.uint8)
    nominal = tmp_path / "nominal.mp4"
    with video.VideoWriter(nominal, 64, 48, Fraction(25)) as w:
        for _ in range(4):
            w.write(frame)
        assert w.last_pts_s == pytest.approx(0.12)
    assert _frame_times(nominal) == pytest.approx([0.0, 0.04, 0.08, 0.12])

    timed = tmp_path / "timed.mp4"
    with video.VideoWriter(timed, 64, 48, Fraction(25)) as w:
        assert w.last_pts_s is None
        for t in (0.0, 0.2, 0.21, 1.0):  # 0.21 rounds onto 0.2's tick: the next one, 0.24
            w.write(frame, t)
        w.write(frame)  # then the nominal rate again
        for bad in (1.0, 0.5, -1.0, float("nan")):
            with pytest.raises(ValueError, match="timestamp"):
                w.write(frame, bad)
        assert w.frames_written == 5
    assert _frame_times(timed) == pytest.approx([0.0, 0.2, 0.24, 1.0, 1.04])


def test_writer_odd_size_kept_exactly_as_yuv444p(tmp_path: Path) -> None:
    out = tmp_path / "odd.mkv"
    with video.VideoWriter(out, 63, 47, Fraction(30000, 1001)) as w:
        assert w.pix_fmt == "yuv444p"
        for i in range(4):
            w.write(colour_frame(i, 63, 47))
    info = video.probe(out)
    assert (info.width, info.height, info.fps) == (63, 47, Fraction(30000, 1001))
    with video.VideoReader(out) as r:
        assert len(list(r)) == 4


def test_writer_interrupted_still_leaves_a_playable_file(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    with pytest.raises(KeyboardInterrupt):
        with video.VideoWriter(out, 64, 48, 25) as w:
            for i in range(7):
                w.write(colour_frame(i))
            raise KeyboardInterrupt
    assert video.probe(out).frames == 7
    with video.VideoReader(out) as r:
        assert len(list(r)) == 7 and r.error is None
    assert [p.name for p in tmp_path.iterdir()] == ["o.mp4"]


def test_writer_without_frames_leaves_nothing_and_keeps_an_old_file(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    with video.VideoWriter(out, 64, 48, 25):
        pass
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["o.mp4"]


def test_writer_refuses_wrong_frames_and_suffixes(tmp_path: Path) -> None:
    with video.VideoWriter(tmp_path / "o.mp4", 64, 48, 25) as w:
        with pytest.raises(ValueError, match=r"expected \(48, 64, 3\) uint8"):
            w.write(colour_frame(0, 32, 32))
        with pytest.raises(ValueError):
            w.write(colour_frame(0).astype(np.float32))
        w.write(colour_frame(0))
    with pytest.raises(ResUNetError, match="unsupported video suffix .gif"):
        video.VideoWriter(tmp_path / "o.gif", 64, 48, 25)
    with pytest.raises(ValueError):
        video.VideoWriter(tmp_path / "o.mp4", 64, 48, 0)


def test_a_killed_writers_temporary_is_swept(tmp_path: Path) -> None:
    w = video.VideoWriter(tmp_path / "o.mp4", 64, 48, 25)
    w.write(colour_frame(0))
    assert not is_stale_temporary(w.tmp_path)  # its writer (this process) is alive
    fake = tmp_path / w.tmp_path.name.replace(f".{__import__('os').getpid()}-", ".999999999-")
    w.tmp_path.rename(fake)
    w.tmp_path = fake
    assert is_stale_temporary(fake)
    assert clean_stale_temporaries(tmp_path) == [fake]
    w.abort()


def test_video_container_suffixes_and_urls() -> None:
    assert video.is_video_path("a/b.MP4") and video.is_video_path(Path("x.mkv"))
    assert not video.is_video_path("x.png") and not video.is_video_path("rtsp://h/x.mp4")
    assert video.is_url("rtsp://cam/1") and video.is_url("udp://@:1234") and not video.is_url("clip.mp4")


@pytest.mark.parametrize("shape,classes", [((40, 60), 1), ((100, 37), 3), ((600, 700), 1), ((9, 17), 3), ((530, 300), 4)])
def test_overlay_array_and_image_are_the_pil_reference(shape: tuple[int, int], classes: int) -> None:
    """overlay_array (frames) and overlay_image (PNGs) give the pixels of the whole-image float
    blend with PIL's rank filters: empty masks, rectangles touching the borders, scattered pixels,
    several bands of rows (the work is done only where the mask reaches)."""
    from conftest import overlay_before  # the PIL reference

    rng = np.random.default_rng(sum(shape) + classes)
    for trial in range(6):
        image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        mask = np.zeros(shape, np.uint8)
        for _ in range(3):  # rectangles, some touching the borders
            a, b = sorted(rng.integers(0, shape[0], 2))
            c, d = sorted(rng.integers(0, shape[1], 2))
            mask[a:b + 1, c:d + 1] = rng.integers(1, max(2, classes))
        if trial == 0:
            mask[:] = 0
        if trial == 1:
            mask = (rng.random(shape) > 0.7).astype(np.uint8)
        if trial == 2:  # a line just past the first band of rows, one just before it, the last column
            mask[:] = 0
            mask[min(257, shape[0] - 1), : shape[1] // 2] = 1
            mask[max(0, min(253, shape[0] - 3)), shape[1] // 3:] = max(1, classes - 1)
            mask[:, -1] = 1
        expected = np.asarray(overlay_before(image, mask, classes))
        arr = overlay_array(image, mask, classes)
        assert arr.shape == (*shape, 3) and arr.dtype == np.uint8
        assert np.array_equal(arr, expected)
        assert np.array_equal(np.asarray(overlay_image(image, mask, classes)), expected)
    with pytest.raises(ValueError, match="differ in size"):
        overlay_array(image, mask[1:], classes)

def test_reader_thread_is_a_daemon_and_iterates_once(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=3)
    with video.VideoReader(clip) as reader:
        assert len(list(reader)) == 3
        assert reader._thread.daemon and reader._thread.name == "video-decode"
        with pytest.raises(RuntimeError, match="iterated once"):
            list(reader)
    assert threading.active_count() >= 1


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (2, 2), (7, 9), (300, 257)])
@pytest.mark.parametrize("size", [3, 5])
def test_square_filter_is_pils_max_and_min_filter(shape: tuple[int, int], size: int) -> None:
    """The overlay's outline filter (numpy, separable) gives PIL's MaxFilter/MinFilter pixels."""
    from PIL import Image, ImageFilter

    from resunetpp.outputs import square_filter

    m = np.random.default_rng(size).integers(0, 4, shape).astype(np.uint8)
    pil = Image.fromarray(m, "L")
    np.testing.assert_array_equal(square_filter(m, size, np.maximum), np.asarray(pil.filter(ImageFilter.MaxFilter(size))))
    np.testing.assert_array_equal(square_filter(m, size, np.minimum), np.asarray(pil.filter(ImageFilter.MinFilter(size))))


def test_overlay_of_multi_class_masks_matches_the_float_blend() -> None:
    """The tabulated blend gives the float32 blend's pixels (several classes, grey and RGBA images)."""
    from resunetpp.outputs import palette

    rng = np.random.default_rng(3)
    for channels in (1, 3, 4):
        image = rng.integers(0, 256, (30, 40, channels), dtype=np.uint8)
        mask = np.kron(rng.integers(0, 4, (3, 4)), np.ones((10, 10), int)).astype(np.uint8)  # 10 px blocks
        rgb = np.repeat(image, 3, axis=2) if channels == 1 else image[:, :, :3]
        colors = palette(4).astype(np.float32)
        blend = np.where((mask > 0)[:, :, None], rgb.astype(np.float32) * 0.6 + colors[mask] * 0.4, rgb)
        expected = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
        got = overlay_array(image, mask, 4)
        from resunetpp.outputs import square_filter

        hi, lo = square_filter(mask, 3, np.maximum), square_filter(mask, 3, np.minimum)
        edge = (hi != lo) & (hi > 0)
        assert edge.any() and (~edge).any()
        assert np.array_equal(got[~edge], expected[~edge])  # the fill: the float blend's pixels
        assert np.array_equal(got[edge], palette(4)[hi[edge]])  # the outline: the class colour
def square(mask: np.ndarray) -> np.ndarray:
    from resunetpp.outputs import square_filter

    return square_filter(mask, 3, np.maximum)


def test_without_pyav_video_input_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = make_clip(tmp_path / "c.mp4", n=2)
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # `import av` raises ImportError
    for call in (lambda: video.probe(clip), lambda: video.VideoWriter(tmp_path / "o.mp4", 64, 48, 25)):
        with pytest.raises(ResUNetError, match=r"pip install 'resunetpp\[video\]'"):
            call()
