"""``resunetpp infer`` on video files: the VideoFiles source, the overlay video, ``<stem>_frames.json``,
``--save-masks``, agreement with ``infer`` on the same decoded frames saved as PNG (torch, ONNX
Runtime, OpenVINO), reruns, and bad input (each one line naming the file, exit 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

av = pytest.importorskip("av")
pytest.importorskip("cv2")

from conftest import make_audio_only, mux_silence  # noqa: E402
from resunetpp import engines  # noqa: E402
from resunetpp.cli import app  # noqa: E402
from resunetpp.defaults import PACKAGE_DIR  # noqa: E402
from resunetpp.engines.video_infer import FRAME_FIELDS, SUMMARY_FIELDS  # noqa: E402
from resunetpp.errors import InputFileError, ResUNetError  # noqa: E402
from resunetpp.imageio import read_mask  # noqa: E402
from resunetpp.metrics import dice  # noqa: E402
from resunetpp.sources import open_source, registered_sources  # noqa: E402
from resunetpp.sources.video import VideoFiles  # noqa: E402
from resunetpp.video import VideoReader, probe  # noqa: E402
from test_engines import export_onnx, make_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CLIP = PACKAGE_DIR / "sample_data" / "clip.mp4"
runner = CliRunner()
W, H, N = 96, 80, 8


def write_clip(path: Path, frames: list[np.ndarray], fps=25, container_options: dict | None = None) -> Path:
    c = av.open(str(path), "w", options=container_options or {})
    s = c.add_stream("libx264", rate=fps)
    s.height, s.width = frames[0].shape[:2]
    s.pix_fmt = "yuv420p"
    s.options = {"crf": "12", "preset": "ultrafast"}
    for f in frames:
        for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def real_frames(n: int = N, w: int = W, h: int = H) -> list[np.ndarray]:
    """``n`` distinct Kvasir-SEG frames (every third frame of the shipped clip), at ``w`` x ``h``."""
    with VideoReader(SAMPLE_CLIP) as reader:
        picked = [f.image for f in reader if f.index % 3 == 0][:n]
    return [np.asarray(Image.fromarray(f).resize((w, h), Image.LANCZOS)) for f in picked]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video-infer")
    ckpt = make_checkpoint(root / "model.safetensors", size=32, logit_std=3.0)
    found = {"root": root, "torch": ckpt, "clip": write_clip(root / "clip.mp4", real_frames())}
    if engines.available_backends()["onnxruntime"] is None:
        found["onnxruntime"] = export_onnx(ckpt, root / "model.onnx")
    return found


def infer(args: list, openvino: bool = False) -> tuple[int, str, str]:
    """The CLI in process, or (OpenVINO: it may abort natively when other runtimes follow it in one
    process) as ``python -m resunetpp`` in a subprocess."""
    if not openvino:
        result = runner.invoke(app, ["infer", *map(str, args)])
        return result.exit_code, result.stdout, result.stderr
    proc = subprocess.run([sys.executable, "-m", "resunetpp", "infer", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "true"})
    return proc.returncode, proc.stdout, proc.stderr


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def check_frames_json(path: Path, clip: Path, masks: Path | None, backend: str) -> dict:
    """Every field of ``<stem>_frames.json`` against the clip, and against the mask PNGs when given."""
    record = json.loads(path.read_text())
    assert set(record) == {"summary", "frames"}
    s, frames = record["summary"], record["frames"]
    info = probe(clip)
    assert list(s) == list(SUMMARY_FIELDS)
    assert s["source"] == str(clip) and s["frames"] == len(frames) == info.frames
    assert s["complete"] is True and s["error"] is None
    assert s["fps"] > 0 and s["model_fps"] > 0
    assert 0 < s["latency_ms_p50"] <= s["latency_ms_p99"] <= max(f["latency_ms"] for f in frames)
    assert s["source_fps"] == float(info.fps) and s["source_frames"] == info.frames
    assert (s["width"], s["height"], s["codec"]) == (info.width, info.height, "h264")
    assert s["backend"] == backend and s["device"] == "cpu" and s["precision"] in ("fp32", "f32")
    assert Path(s["model"]).is_file() and s["overlay"] == f"{clip.stem}_overlay.mp4"
    assert s["masks"] == (masks.name if masks is not None else None)
    for i, f in enumerate(frames):
        assert list(f) == list(FRAME_FIELDS)
        assert f["index"] == i and f["timestamp_s"] == pytest.approx(i / float(info.fps), abs=1e-6)
        assert 0.0 <= f["area_fraction"] <= 1.0 and f["latency_ms"] > 0
        for x0, y0, x1, y1 in f["boxes"]:
            assert 0 <= x0 < x1 <= info.width and 0 <= y0 < y1 <= info.height
        if masks is not None:
            m = read_mask(masks / f"{i:06d}.png") > 0
            assert f["area_fraction"] == pytest.approx(m.mean(), abs=1e-6)
            check_boxes(f["boxes"], m)
    return record


def check_boxes(boxes: list, mask: np.ndarray) -> None:
    """The boxes are the 8-connected regions' bounding boxes (scipy's labelling, not OpenCV's)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    expected = sorted(([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop] for sl in ndimage.find_objects(labels)),
                      key=lambda b: (b[1], b[0]))
    assert boxes == expected and len(boxes) == n


# ---- the source ------------------------------------------------------------------------------------------
def test_video_source_claims_videos_ahead_of_images(work: dict, tmp_path: Path) -> None:
    names = [c.name for c in registered_sources()]
    assert names.index("video") < names.index("images")
    with open_source([work["clip"]]) as source:
        assert isinstance(source, VideoFiles) and source.keys == ["clip"] and source.count == N
        assert source.files() == [work["clip"]]
        items = list(source)
    assert [it.key for it in items] == [f"clip_{i:06d}" for i in range(N)]
    assert items[0].load(3).shape == (H, W, 3) and items[0].load(1).shape == (H, W, 1)
    assert str(items[2].origin) == f"{work['clip']}#frame2"
    copy = tmp_path / "b" / "clip.mkv"
    copy.parent.mkdir()
    write_clip(copy, real_frames(2))
    with open_source([str(work["clip"]), str(tmp_path / "b" / "*.mkv")]) as source:
        assert source.keys == ["clip", "clip-2"] and source.count is None  # Matroska has no frame count
    with pytest.raises(ResUNetError, match="cannot mix images and videos"):
        open_source([str(work["clip"]), "a.png"])
    with pytest.raises(InputFileError, match="the pattern matches no video file"):
        open_source([str(tmp_path / "*.avi")])


# ---- done when: the masks agree with infer on the same frames as PNG -------------------------------------
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_video_masks_agree_with_infer_on_the_decoded_frames(work: dict, tmp_path: Path, backend: str) -> None:
    reason = engines.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    clip = work["clip"]
    openvino = backend == "openvino"
    if openvino:  # converted in a subprocess too (OpenVINO stays out of this process)
        model = tmp_path / "model.xml"
        code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; "
                "from test_engines import export_openvino; export_openvino(Path(sys.argv[1]), Path(sys.argv[2]))")
        subprocess.run([sys.executable, "-c", code, str(work["onnxruntime"]), str(model)], cwd=REPO, check=True,
                       timeout=300, env={**os.environ, "CI": "true"})
    else:
        model = work[backend]
    frames_dir = tmp_path / "frames"  # the same decoded frames, lossless
    frames_dir.mkdir()
    with VideoReader(clip) as reader:
        for f in reader:
            Image.fromarray(f.image).save(frames_dir / f"{f.index:06d}.png")
    opts = ["--device", "cpu", "--batch-size", "3"] + (["-O", "precision=f32"] if openvino else [])
    rc, out, err = infer([model, clip, "--out", tmp_path / "v", "--save-masks", *opts], openvino)
    assert rc == 0, err
    assert f"{clip}: {N} frames -> {tmp_path / 'v' / 'clip_overlay.mp4'}" in out
    rc, out, err = infer([model, frames_dir, "--out", tmp_path / "i", *opts], openvino)
    assert rc == 0, err
    scores = [dice(read_mask(tmp_path / "v" / "clip_masks" / f"{i:06d}.png"),
                   read_mask(tmp_path / "i" / f"{i:06d}_mask.png")) for i in range(N)]
    assert min(scores) >= 0.99, scores
    assert sorted(p.name for p in (tmp_path / "v" / "clip_masks").iterdir()) == [f"{i:06d}.png" for i in range(N)]
    overlay = probe(tmp_path / "v" / "clip_overlay.mp4")
    source = probe(clip)
    assert (overlay.frames, overlay.width, overlay.height, overlay.fps) == \
        (source.frames, source.width, source.height, source.fps)
    with av.open(str(tmp_path / "v" / "clip_overlay.mp4")) as c:
        assert not c.streams.audio
    check_frames_json(tmp_path / "v" / "clip_frames.json", clip, tmp_path / "v" / "clip_masks",
                      "openvino" if openvino else backend)
    assert no_partials(tmp_path / "v")


def test_overlay_frames_are_the_image_overlay_and_audio_is_dropped(work: dict, tmp_path: Path) -> None:
    from resunetpp.outputs import overlay_array

    frames = real_frames(4, 64, 48)
    clip = tmp_path / "talk.mp4"
    c = av.open(str(clip), "w")
    s = c.add_stream("libx264", rate=Fraction(30000, 1001))
    s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"crf": "12"}
    a = c.add_stream("aac", rate=8000)
    for f in frames:
        for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    mux_silence(c, a)
    c.close()
    rc, _, err = infer([work["torch"], clip, "--out", tmp_path / "o", "--save-masks", "--tta"])
    assert rc == 0, err
    out = tmp_path / "o" / "talk_overlay.mp4"
    info = probe(out)
    assert (info.frames, info.width, info.height, info.fps) == (4, 64, 48, Fraction(30000, 1001))
    with av.open(str(out)) as c:
        assert len(c.streams.video) == 1 and not c.streams.audio
    with VideoReader(clip) as src, VideoReader(out) as enc:
        for f, g in zip(src, enc):
            mask = read_mask(tmp_path / "o" / "talk_masks" / f"{f.index:06d}.png") > 0
            expected = overlay_array(f.image, mask.astype(np.uint8), 1).astype(int)
            to_overlay = float(np.abs(g.image.astype(int) - expected).mean())
            to_plain = float(np.abs(g.image.astype(int) - f.image.astype(int)).mean())
            assert to_overlay < 14.0  # H.264 4:2:0 at CRF 20: ~5 on the plain frames, more on thin green outlines
            if mask.mean() > 0.05:
                assert to_overlay < 0.5 * to_plain, (to_overlay, to_plain)


# ---- reruns ---------------------------------------------------------------------------------------------
def test_a_rerun_writes_over_the_outputs_as_for_images(work: dict, tmp_path: Path) -> None:
    out = tmp_path / "o"
    rc, _, err = infer([work["torch"], work["clip"], "--out", out, "--save-masks"])
    assert rc == 0, err
    first = json.loads((out / "clip_frames.json").read_text())
    os.utime(out / "clip_overlay.mp4", (1, 1))
    shorter = tmp_path / "short" / "clip.mp4"  # same stem, fewer frames: its masks alone remain
    shorter.parent.mkdir()
    write_clip(shorter, real_frames(3))
    rc, _, err = infer([work["torch"], shorter, "--out", out, "--save-masks"])
    assert rc == 0, err
    assert (out / "clip_overlay.mp4").stat().st_mtime > 1 and probe(out / "clip_overlay.mp4").frames == 3
    assert sorted(p.name for p in (out / "clip_masks").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert json.loads((out / "clip_frames.json").read_text())["summary"]["frames"] == 3 != first["summary"]["frames"]
    rc, _, err = infer([work["torch"], work["clip"], "--out", out])  # without --save-masks
    assert rc == 0, err
    check_frames_json(out / "clip_frames.json", work["clip"], None, "torch")
    assert no_partials(out)


# ---- bad input: one line naming the file, exit 1 ----------------------------------------------------------
def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case, problem", [
    ("not-a-video", "not a video, or corrupt"),
    ("corrupt", "not a video, or corrupt"),
    ("codec", "unsupported codec"),
    ("audio-only", "has no video stream"),
    ("missing", "no such file"),
])
def test_bad_videos_are_refused_in_one_line(work: dict, tmp_path: Path, case: str, problem: str) -> None:
    path = tmp_path / "bad.mp4"
    data = work["clip"].read_bytes()
    if case == "not-a-video":
        path.write_text("hello, I am a text file with a video's name\n" * 20)
    elif case == "corrupt":  # the container's header scrambled, the frames left as they were
        rng = np.random.default_rng(0)
        head = data.index(b"mdat")
        path.write_bytes(rng.integers(0, 256, head, dtype=np.uint8).tobytes() + data[head:])
    elif case == "codec":
        path.write_bytes(data.replace(b"avc1", b"zzzz"))
    elif case == "audio-only":
        path = make_audio_only(tmp_path / "bad.m4a", "mp4").rename(tmp_path / "bad.mov")
    rc, _, err = infer([work["torch"], path, "--out", tmp_path / "o"])
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and problem in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_truncated_video_keeps_the_frames_that_decode(work: dict, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "long.mp4", real_frames(8) * 3, container_options={"movflags": "+faststart"})
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    rc, out, err = infer([work["torch"], cut, "--out", tmp_path / "o", "--save-masks"])
    assert rc == 1
    line = one_error_line(err)
    assert line.startswith(f"error: {cut}: truncated or corrupt: ") and "of 24 frames decode" in line
    n = int(line.split("truncated or corrupt: ")[1].split(" of ")[0])
    assert 0 < n < 24
    assert "1 of 1 video(s) had a problem" in err
    overlay = probe(tmp_path / "o" / "cut_overlay.mp4")  # a valid video of the frames that decoded
    assert (overlay.frames, overlay.width, overlay.height) == (n, W, H)
    record = json.loads((tmp_path / "o" / "cut_frames.json").read_text())
    assert record["summary"]["complete"] is False and record["summary"]["error"] == line[len("error: "):]
    assert [f["index"] for f in record["frames"]] == list(range(n))
    assert len(list((tmp_path / "o" / "cut_masks").iterdir())) == n
    assert no_partials(tmp_path / "o")


def test_no_frame_decodes_writes_nothing(work: dict, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", real_frames(4), container_options={"movflags": "+faststart"})
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:data.index(b"mdat") + 64])
    rc, _, err = infer([work["torch"], cut, "--out", tmp_path / "o"])
    assert rc == 1
    assert one_error_line(err).startswith(f"error: {cut}: no frame decodes (")
    assert not [p for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")]


def test_video_refusals(work: dict, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(real_frames(1)[0]).save(image)
    for args, message in [
        ([work["clip"], image], "cannot mix images and videos in one run"),
        ([work["clip"], "--save-probs"], "--save-probs writes one .npy per image; for videos use --save-masks"),
        ([work["clip"], "--ray", "local"], "--ray runs image files; run videos without --ray"),
    ]:
        rc, _, err = infer([work["torch"], *args, "--out", tmp_path / "o"])
        assert rc == 1 and err.count("\n") == 1 and message in err, err
    # --save-masks on images changes nothing: their masks are always written
    rc, _, err = infer([work["torch"], image, "--out", tmp_path / "img", "--save-masks"])
    assert rc == 0 and sorted(p.name for p in (tmp_path / "img").iterdir() if not p.name.startswith(".")) == \
        ["a_mask.png"]


def test_an_output_over_the_input_video_is_refused(work: dict, tmp_path: Path) -> None:
    victim = tmp_path / "x_overlay.mp4"
    victim.write_bytes(work["clip"].read_bytes())
    link = tmp_path / "x.mp4"
    link.symlink_to(victim)  # the input clip x.mp4 is the file x_overlay.mp4: writing it would destroy it
    before = victim.read_bytes()
    rc, _, err = infer([work["torch"], link, "--out", tmp_path])
    assert rc == 1 and "is an input of this run" in err and victim.read_bytes() == before


# ---- the sample clip -------------------------------------------------------------------------------------
def test_the_sample_clip_is_small_real_and_25_fps() -> None:
    info = probe(SAMPLE_CLIP)
    assert (info.frames, info.fps, info.width, info.height, info.codec) == (60, Fraction(25), 384, 320, "h264")
    assert SAMPLE_CLIP.stat().st_size < 2_000_000
    with VideoReader(SAMPLE_CLIP) as reader:
        frames = [f.image for f in reader]
    assert len(frames) == 60 and reader.error is None
    first = np.asarray(Image.open(sorted((PACKAGE_DIR / "sample_data" / "images").glob("cju0qx73*"))[0]))
    assert frames[0].mean() == pytest.approx(first.mean(), abs=12)  # the first sample image (borders aside)
    assert np.abs(frames[0].astype(int) - frames[2].astype(int)).mean() < 3  # held 3 frames
    assert np.abs(frames[0].astype(int) - frames[3].astype(int)).mean() > 10  # then the next image


def test_ctrl_c_leaves_a_playable_overlay_and_a_matching_record(work: dict, tmp_path: Path) -> None:
    """SIGINT in the middle of a video: exit 130, the overlay holds the frames finished so far and
    plays to its end, ``frames.json`` lists exactly those frames (``complete`` false)."""
    import signal
    import time

    frames = real_frames(8, 320, 240)
    clip = write_clip(tmp_path / "long.mp4", [frames[i % 8] for i in range(400)])
    out = tmp_path / "o"
    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "resunetpp", "infer", str(work["torch"]), str(clip), "--out",
                             str(out), "--save-masks"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "long_masks").is_dir() and len(list((out / "long_masks").glob("*.png"))) >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    record = json.loads((out / "long_frames.json").read_text())
    n = record["summary"]["frames"]
    assert record["summary"]["complete"] is False and 20 <= n < 400
    assert [f["index"] for f in record["frames"]] == list(range(n))
    assert probe(out / "long_overlay.mp4").frames == n
    with VideoReader(out / "long_overlay.mp4") as reader:
        assert sum(1 for _ in reader) == n and reader.error is None
    assert no_partials(out)
