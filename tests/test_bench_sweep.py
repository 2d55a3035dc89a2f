"""``resunetpp bench --image-size 24,32,40``: the input-size sweep (issue 17).

A tiny checkpoint (native input 32x32) is exported once; every row runs at each size on those
dynamic-H/W artifacts. Timings are never asserted -- only that each row was measured at its size,
against the right references, and that the reports carry the numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_dataset, tiny_checkpoint, run_resunetpp as cli  # the real command in its own process
from resunetpp.bench import harness
from resunetpp.bench.harness import BenchOptions, BenchResult, BenchRow
from resunetpp.bench.report import to_markdown
from resunetpp.cli import app
from resunetpp.errors import ResUNetError

runner = CliRunner()
SIZES = (24, 32, 40)
FAST = dict(warmup_s=0.01, duration_s=0.05, batch_sizes=(1,), threads=1, end_to_end=False)
CLI_FAST = ["--warmup-s", "0.01", "--duration-s", "0.05", "--batch-sizes", "1", "--threads", "1"]
LABELS = ("torch fp32", "onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    ckpt = tiny_checkpoint(root / "tiny.safetensors", size=32)
    data = make_dataset(root / "eval", 3, size=44, seed=1, prefix="ev")  # 44x44 originals: no size is native
    calib = make_dataset(root / "calib", 3, seed=2, prefix="ca")
    done = cli("bench", ckpt, "--data", data, "--calib", calib, "--artifacts", root / "art", "--image-size",
               ",".join(map(str, SIZES)), "--backends", "torch,onnxruntime,openvino", "--precisions", "fp32,int8",
               *CLI_FAST, "--json", root / "sweep.json", "--markdown", root / "sweep.md", "--plot", root / "sweep.png")
    assert done.returncode == 0, done.stdout + done.stderr
    data_json = json.loads((root / "sweep.json").read_text())
    result = BenchResult(data_json["environment"], data_json["settings"], data_json["evaluation"],
                         data_json["calibration"], data_json["artifacts"],
                         [BenchRow(**row) for row in data_json["rows"]], data_json["notes"])
    return {"root": root, "ckpt": ckpt, "data": data, "calib": calib, "result": result, "json": data_json,
            "stdout": done.stdout}


def _rows(result) -> dict:
    return {(r.label, tuple(r.image_size)): r for r in result.rows if r.image_size}


def test_every_row_runs_at_every_size_on_one_export(sweep):
    result = sweep["result"]
    rows = _rows(result)
    for size in SIZES:
        for label in LABELS:
            r = rows[(label, (size, size))]
            assert r.ok, (label, size, r.status, r.reason)
            assert r.batch_size == 1 and r.throughput_ips > 0 and r.model_only_ips > 0
    # one export at the native size serves all sizes: the same file in every size's row
    for label in LABELS[1:]:
        assert len({rows[(label, (s, s))].artifact for s in SIZES}) == 1
    settings = result.settings
    assert settings["image_sizes"] == list(SIZES) and settings["native_size"] == [32, 32]
    flops = settings["gflop_per_image_by_size"]
    assert flops["24x24"] < flops["32x32"] < flops["40x40"]
    assert flops["32x32"] == pytest.approx(settings["gflop_per_image"])


def test_accuracy_against_the_same_size_and_the_native_reference(sweep):
    rows = _rows(sweep["result"])
    native = rows[("torch fp32", (32, 32))]
    assert native.dice_vs_native_reference == 1.0 and native.dice_vs_native_reference_min == 1.0
    for size in SIZES:
        ref = rows[("torch fp32", (size, size))]
        assert ref.dice_vs_reference == 1.0 and ref.speedup == pytest.approx(1.0)  # per size: its own reference
        ort = rows[("onnxruntime fp32", (size, size))]
        assert ort.dice_vs_reference > 0.99
        # an FP32 file agrees with the torch run at the same size: so does their Dice vs the native reference
        assert ort.dice_vs_native_reference == pytest.approx(ref.dice_vs_native_reference, abs=0.01)
        assert 0.0 <= ort.dice_vs_native_reference_min <= ort.dice_vs_native_reference <= 1.0
        assert ort.dice_vs_gt is not None and ort.speedup == pytest.approx(ort.throughput_ips / ref.throughput_ips)


def test_dice_vs_native_reference_compares_at_the_original_resolution():
    """Outputs at the row's size are restored to each image's original size and compared with the
    native reference's masks there (mean and min over images)."""
    import numpy as np

    from resunetpp.bench.harness import EvalData, measure_accuracy
    from resunetpp.preprocess import Preprocessing

    pre = Preprocessing(size=(8, 8))
    data = EvalData(pre, 1, ["a", "b"], [Path("a"), Path("b")], [np.zeros((3, 8, 8), np.float32)] * 2,
                    [(16, 16), (16, 24)], [None, None])
    left = np.zeros((1, 8, 8), np.float32)
    left[:, :, :4] = 1.0  # the left half: polyp
    native = [np.ones((16, 16), np.uint8), np.zeros((16, 24), np.uint8)]
    native[1][:, :12] = 1  # the second image's native mask is its left half too
    got = measure_accuracy(None, data, [left, left], outputs=[left, left], native_masks=native)
    assert got["dice_vs_native_reference_min"] == pytest.approx(2 * 128 / (128 + 256))  # half of an all-polyp mask
    assert got["dice_vs_native_reference"] == pytest.approx((2 * 128 / (128 + 256) + 1.0) / 2)
    assert got["dice_vs_reference"] == 1.0  # against the same-size reference: identical
    assert "dice_vs_native_reference" not in measure_accuracy(None, data, [left, left], outputs=[left, left])


def test_peak_share_uses_each_sizes_flops(sweep):
    result = sweep["result"]
    flops = result.settings["gflop_per_image_by_size"]
    for r in result.rows:
        if r.ok and r.gflops_per_s is not None:
            per_image = flops["x".join(map(str, r.image_size))]
            assert r.gflops_per_s == pytest.approx(r.throughput_ips * per_image)
    assert result.environment["cpu_peak"]["int8"]["runtime_precision"] in ("u8", "i8")


def test_sweep_summary_json_markdown_and_plot(sweep, tmp_path):
    result = sweep["result"]
    points = result.settings["size_sweep"]
    assert {(tuple(p["image_size"]), f"{p['backend']} {p['precision']}") for p in points} == {
        ((s, s), label) for s in SIZES for label in LABELS}
    for p in points:
        assert p["target_fps"] == harness.DEFAULT_TARGET_FPS and p["video_fps"] is None
        assert p["keeps_up"] == (p["model_only_ips"] >= p["target_fps"])
        assert isinstance(p["dice_vs_gt"], float) and isinstance(p["dice_vs_native_reference"], float)
    data = sweep["json"]
    for row in data["rows"]:
        if row["status"] == "ok":
            assert row["image_size"] in ([s, s] for s in SIZES)
            assert isinstance(row["dice_vs_native_reference"], float)
    md = (sweep["root"] / "sweep.md").read_text()
    assert md == to_markdown(result)
    assert "## Input-size sweep" in md and "| input | backend | precision | batch | status |" in md
    sweep_md = md.split("## Input-size sweep")[1]
    r = _rows(result)[("openvino int8", (24, 24))]
    assert (f"| 24x24 | openvino | int8 | {result.settings['gflop_per_image_by_size']['24x24']:.2f} | "
            f"{r.throughput_ips:.1f} | {r.model_only_ips:.1f} | - | {r.dice_vs_gt:.4f} | "
            f"{r.dice_vs_native_reference:.4f} |") in sweep_md
    with Image.open(sweep["root"] / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000
    assert "24x24" in sweep["stdout"] and "40x40" in sweep["stdout"]  # the terminal table has the input column


def test_sweep_figure_has_a_curve_per_row_and_the_target_line(sweep):
    from resunetpp.bench.report import sweep_figure

    fig = sweep_figure(sweep["result"])
    left, right = fig.axes[:2]
    curves = [line for line in left.get_lines() if len(line.get_xdata()) == len(SIZES)]
    assert len(curves) == len(LABELS)
    assert any(list(line.get_xdata()) == [25.0, 25.0] for line in left.get_lines())  # the 25 fps line
    assert {t.get_text() for t in right.get_legend().get_texts()} == set(LABELS)


def test_a_static_size_artifact_is_a_failed_row_not_a_crash(sweep, tmp_path):
    """An artifact exported with a fixed input size cannot run the sweep's other sizes: its row says so."""
    art = sweep["root"] / "art"
    static = tmp_path / "static"
    static.mkdir()
    shutil.copy(art / "model_fp32.onnx", static / "model_fp32.onnx")
    shutil.copy(art / "model_fp32.onnx.json", static / "model_fp32.onnx.json")
    model = onnx.load(static / "model_fp32.onnx")
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], (32, 32)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    onnx.save(model, static / "model_fp32.onnx")
    artifacts = harness.ArtifactSet(static, "k", {("onnx", "fp32"): static / "model_fp32.onnx"}, {}, [], [], None)
    setup = harness._setup(BenchOptions(model=sweep["ckpt"], data=sweep["data"], calib=sweep["calib"]))
    at = harness._at_size(setup, 24)
    data = harness.EvalData.load(setup.images.evaluation, at.pre, 1)
    target = harness.Target("onnxruntime", "fp32", "cpu", {}, artifact=("onnx", "fp32"))
    from resunetpp.export.report import NullReporter

    rows = harness.bench_target(target, at, artifacts, data, [None] * len(data), harness.Settings(**{
        k: v for k, v in FAST.items() if k != "threads"}), NullReporter())
    assert len(rows) == 1 and rows[0].failed and rows[0].image_size == [24, 24]
    assert "32x32" in rows[0].reason and "24x24" in rows[0].reason
    # at its own size the same file runs
    assert harness.sized_record(static / "model_fp32.onnx", setup.pre) is None


def test_sweep_options_checked():
    with pytest.raises(ResUNetError, match="each size once"):
        BenchOptions(image_sizes=(32, 32)).validate()
    with pytest.raises(ResUNetError, match="multiple of 8"):
        BenchOptions(image_sizes=(32, 30)).validate()
    with pytest.raises(ResUNetError, match="not both"):
        BenchOptions(image_size=32, image_sizes=(24, 32)).validate()


def test_cli_image_size_list(sweep, tmp_path):
    bad = runner.invoke(app, ["bench", str(sweep["ckpt"]), "--image-size", "24,x"])
    assert bad.exit_code != 0 and "--image-size" in bad.output
    dup = runner.invoke(app, ["bench", str(sweep["ckpt"]), "--data", str(sweep["data"]), "--image-size", "24,24"])
    assert dup.exit_code == 1 and "each size once" in dup.output
    files = runner.invoke(app, ["bench", str(sweep["root"] / "art" / "model_fp32.onnx"), "--image-size", "24,32"])
    assert files.exit_code == 1 and "--image-size applies to benchmarking a checkpoint" in files.output
    out = tmp_path / "s.json"
    done = runner.invoke(app, ["bench", str(sweep["ckpt"]), "--data", str(sweep["data"]), "--calib",
                               str(sweep["calib"]), "--artifacts", str(sweep["root"] / "art"), "--backends",
                               "torch,onnxruntime", "--precisions", "fp32", "--image-size", "24,32",
                               "--warmup-s", "0.01", "--duration-s", "0.05", "--batch-sizes", "1",
                               "--no-end-to-end", "--json", str(out)])
    assert done.exit_code == 0, done.output
    data = json.loads(out.read_text())
    assert data["settings"]["image_sizes"] == [24, 32]
    assert sorted((tuple(r["image_size"]), r["backend"]) for r in data["rows"]) == [
        ((24, 24), "onnxruntime"), ((24, 24), "torch"), ((32, 32), "onnxruntime"), ((32, 32), "torch")]
