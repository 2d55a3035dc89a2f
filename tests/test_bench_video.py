"""``resunetpp bench --video CLIP`` (issue 17): each row through infer's video pipeline.

A synthetic clip (moving blobs, 64x48, 25 fps, PyAV) and the tiny checkpoint; the OpenVINO runs
go through the real command in its own process (see test_bench_files for the known native abort).
Timings are never asserted -- only that they were measured, are consistent, and reach the reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_dataset, tiny_checkpoint, run_resunetpp as cli  # the real command in its own process
from resunetpp.cli import app

av = pytest.importorskip("av")
runner = CliRunner()
FRAMES, W, H, FPS = 12, 64, 48, 25
CLI_FAST = ["--warmup-s", "0.01", "--duration-s", "0.05", "--batch-sizes", "1", "--threads", "1", "--no-end-to-end"]
VIDEO_FIELDS = ("video_fps", "video_latency_ms_p50", "video_latency_ms_p99", "video_share",
                "video_dice_vs_reference", "video_dice_vs_reference_min", "video_keeps_up")


def blob_frame(i: int) -> np.ndarray:
    """A dark frame with a bright disc moving left to right (a polyp-like blob)."""
    yy, xx = np.mgrid[0:H, 0:W]
    cx, cy = 12 + 3 * i, H // 2
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 100
    img = np.full((H, W, 3), (60, 30, 30), np.uint8)
    img[disc] = (230, 160, 150)
    return img


def make_clip(path: Path, n: int = FRAMES) -> Path:
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=FPS)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    s.options = {"crf": "10", "preset": "ultrafast"}
    for i in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(blob_frame(i), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("benchvideo")
    ckpt = tiny_checkpoint(root / "tiny.safetensors", size=32)
    data = make_dataset(root / "eval", 3, seed=1, prefix="ev")
    clip = make_clip(root / "clip.mp4")
    return {"root": root, "ckpt": ckpt, "data": data, "clip": clip}


@pytest.fixture(scope="module")
def case(base) -> dict:
    root, ckpt, data, clip = base["root"], base["ckpt"], base["data"], base["clip"]
    out = root / "bench.json"
    done = cli("bench", ckpt, "--data", data, "--backends", "torch,onnxruntime,openvino", "--precisions", "fp32",
               "--video", clip, *CLI_FAST, "--json", out, "--markdown", root / "bench.md")
    assert done.returncode == 0, done.stdout + done.stderr
    return {"root": root, "ckpt": ckpt, "data": data, "clip": clip, "json": json.loads(out.read_text()),
            "md": (root / "bench.md").read_text()}


def test_every_row_runs_the_clip_end_to_end(case):
    data = case["json"]
    video = data["settings"]["video"]
    assert video["frames"] == FRAMES and (video["width"], video["height"]) == (W, H) and video["fps"] == FPS
    assert video["dice_frames"] == FRAMES and video["decode_problem"] is None
    rows = {r["backend"]: r for r in data["rows"] if r["status"] == "ok"}
    assert set(rows) == {"torch", "onnxruntime", "openvino"}
    for r in rows.values():
        assert all(r[k] is not None for k in VIDEO_FIELDS), r
        assert r["video_fps"] > 0 and 0 < r["video_latency_ms_p50"] <= r["video_latency_ms_p99"]
        assert r["video_share"] == pytest.approx(r["video_fps"] / r["model_only_ips"])
        assert r["video_keeps_up"] == (r["video_fps"] >= FPS)
        assert 0.0 <= r["video_dice_vs_reference_min"] <= r["video_dice_vs_reference"] <= 1.0
        assert r["details"]["video"]["frames"] == FRAMES  # the pipeline wrote every frame
    # the reference against itself on the same decoded frames; an FP32 file agrees with it
    assert rows["torch"]["video_dice_vs_reference"] == 1.0 and rows["torch"]["video_dice_vs_reference_min"] == 1.0
    for backend in ("onnxruntime", "openvino"):
        assert rows[backend]["video_dice_vs_reference_min"] > 0.98


def test_video_columns_and_note_in_the_markdown(case):
    md = case["md"]
    assert "| video fps (share) | g2g p50 / p99 ms | video Dice vs ref | keeps up |" in md
    assert f"- **video**: `clip.mp4`, {FRAMES} frames, {W}x{H} at {FPS} fps" in md
    r = next(r for r in case["json"]["rows"] if r["backend"] == "onnxruntime")
    assert f"| {r['video_fps']:.1f} ({100 * r['video_share']:.0f}%) |" in md
    assert any(n.startswith("video: ") for n in case["json"]["notes"])


def test_files_mode_with_a_video(base, tmp_path):
    case = base
    from resunetpp.export.pipeline import ExportOptions, run_export

    report = run_export(ExportOptions(case["ckpt"], tmp_path / "dist", formats=("onnx",), precisions=("fp32",),
                                      eval=case["data"]))
    onnx_file = Path(report.artifacts[0].path)
    out = tmp_path / "files.json"
    done = cli("bench", onnx_file, "--reference", case["ckpt"], "--data", case["data"], "--video", case["clip"],
               *CLI_FAST, "--json", out)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["video"]["frames"] == FRAMES
    by_file = {r["details"]["file"]: r for r in data["rows"]}
    assert by_file[onnx_file.name]["video_dice_vs_reference_min"] > 0.98
    assert by_file[case["ckpt"].name]["video_dice_vs_reference"] == 1.0


def test_a_clip_that_is_not_a_video_is_one_line_and_exit_1(base, tmp_path):
    case = base
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    result = runner.invoke(app, ["bench", str(case["ckpt"]), "--data", str(case["data"]), "--backends", "torch",
                                 "--precisions", "fp32", "--video", str(bad), *CLI_FAST])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "notes.mp4" in lines[0], result.output


def test_plan_video_decodes_once_and_keeps_the_reference_masks(base):
    case = base
    from resunetpp import engines
    from resunetpp.bench.video import frame_dice, plan_video
    from resunetpp.checkpoint import load_checkpoint

    with engines.open(load_checkpoint(case["ckpt"]), backend="torch") as ref:
        plan = plan_video(case["clip"], ref, max_frames=5)
        assert plan.frames == FRAMES and len(plan.inputs) == 5
        assert all(m.shape == (H, W) for m in plan.reference_masks)
        assert all(x.shape == (3, 32, 32) for x in plan.inputs)
        assert frame_dice(ref, plan) == [1.0] * 5
    assert plan.record()["dice_frames"] == 5 and plan.record()["fps"] == FPS


def test_sweep_with_a_video_keeps_up_by_video_fps(base):
    """--image-size 24,32 --video: the clip's frames at each size, the sweep's speed is the video fps."""
    from resunetpp.bench.harness import BenchOptions, run_bench
    from resunetpp.bench.report import to_markdown

    result = run_bench(BenchOptions(model=base["ckpt"], data=base["data"], backends=("torch",), precisions=("fp32",),
                                    image_sizes=(24, 32), video=base["clip"], warmup_s=0.01, duration_s=0.05,
                                    batch_sizes=(1,), threads=1, end_to_end=False))
    rows = {tuple(r.image_size): r for r in result.rows}
    assert set(rows) == {(24, 24), (32, 32)}
    for r in rows.values():
        assert r.ok and r.video_fps > 0 and r.video_dice_vs_reference == 1.0  # against itself at its size
        assert r.details["video"]["frames"] == FRAMES
    points = result.settings["size_sweep"]
    assert [p["target_fps"] for p in points] == [FPS, FPS]
    for p in points:
        assert p["video_fps"] == rows[tuple(p["image_size"])].video_fps
        assert p["keeps_up"] == (p["video_fps"] >= FPS)
    md = to_markdown(result)
    assert "keeps up: 25 fps (the clip;" in md and "| input | backend | precision | batch | status |" in md
