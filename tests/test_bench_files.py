"""``resunetpp bench a.onnx b.xml ...``: benchmarking exported files as they are (issue 21, item 1).

A tiny checkpoint is exported once (ONNX and OpenVINO, FP32 and FP16); the files are then
benchmarked without the checkpoint, with it as a MODEL, and with ``--reference``. Timings are
never asserted, only that each row was measured against the right reference.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import make_dataset, tiny_checkpoint, run_resunetpp
from resunetpp.bench.harness import BenchOptions, run_bench_files
from resunetpp.bench.report import to_markdown
from resunetpp.errors import ResUNetError
from resunetpp.export.pipeline import ExportOptions, run_export

FAST = dict(warmup_s=0.01, duration_s=0.05, batch_sizes=(1,), threads=1, end_to_end=False)
CLI_FAST = ["--warmup-s", "0.01", "--duration-s", "0.05", "--batch-sizes", "1", "--threads", "1", "--no-end-to-end"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("benchfiles")
    ckpt = tiny_checkpoint(root / "tiny.safetensors", size=32)
    data = make_dataset(root / "eval", 3, seed=1, prefix="ev")
    report = run_export(ExportOptions(ckpt, root / "dist", formats=("onnx", "openvino"), precisions=("fp32", "fp16"),
                                      eval=data))
    paths = {(a.format, a.precision): Path(a.path) for a in report.artifacts}
    return {"root": root, "ckpt": ckpt, "data": data, "paths": paths}


def test_files_without_a_checkpoint_take_the_first_fp32_file_as_reference(files):
    p = files["paths"]
    # the FP16 file comes first: the reference is still the first FP32 one, and the note says so.
    # (OpenVINO files only in the CLI tests below: an ONNX Runtime session created in a process after
    # OpenVINO's async rows can abort natively -- see run_bench_files.)
    order = [p["onnx", "fp16"], p["onnx", "fp32"]]
    result = run_bench_files(order, BenchOptions(data=files["data"], **FAST))
    assert [(r.details["file"], r.status) for r in result.rows] == [
        (p["onnx", "fp32"].name, "ok"), (p["onnx", "fp16"].name, "ok")]
    assert [r.backend for r in result.rows] == ["onnxruntime", "onnxruntime"]
    assert [r.precision for r in result.rows] == ["fp32", "fp16"]
    ref = result.rows[0]
    assert ref.is_reference and not any(r.is_reference for r in result.rows[1:])
    assert ref.dice_vs_reference == 1.0 and ref.speedup == pytest.approx(1.0)
    assert all(r.dice_vs_reference > 0.9 and r.speedup is not None for r in result.rows)
    assert any("no reference checkpoint given" in n and p["onnx", "fp32"].name in n for n in result.notes)
    assert result.reference == f'{p["onnx", "fp32"].name} (onnxruntime fp32)'
    assert result.as_dict()["reference"] == result.reference
    assert p["onnx", "fp32"].name in to_markdown(result)


def test_a_checkpoint_among_the_files_is_the_reference(files):
    p = files["paths"]
    result = run_bench_files([p["onnx", "fp16"], files["ckpt"]], BenchOptions(data=files["data"], **FAST))
    assert [r.backend for r in result.rows] == ["torch", "onnxruntime"]
    assert result.rows[0].is_reference and not any("no reference checkpoint" in n for n in result.notes)
    assert result.settings["gflop_per_image"] > 0  # FLOPs are counted on the checkpoint


def cli(*args) -> subprocess.CompletedProcess:
    """The real command in its own process (see conftest.run_resunetpp for the one retried abort)."""
    return run_resunetpp(*args, timeout=600)


def test_cli_bench_on_files_with_reference(files, tmp_path):
    p = files["paths"]
    out = tmp_path / "b.json"
    result = cli("bench", p["openvino", "fp16"], p["onnx", "fp32"], "--reference", files["ckpt"], "--data",
                 files["data"], *CLI_FAST, "--json", out, "--max-dice-drop", "0.2")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    assert [(r["backend"], r["precision"]) for r in doc["rows"]] == [("torch", "fp32"), ("openvino", "fp16"),
                                                                     ("onnxruntime", "fp32")]
    assert doc["reference"].startswith("tiny.safetensors")
    assert doc["settings"]["gflop_per_image"] > 0


def test_cli_bench_on_one_artifact(files):
    result = cli("bench", files["paths"]["openvino", "fp32"], "--data", files["data"], *CLI_FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "openvino" in result.stdout and "Unsupported operand" not in result.stdout + result.stderr


def test_export_only_options_are_refused_with_files(files):
    with pytest.raises(ResUNetError, match="--calib applies to benchmarking a checkpoint"):
        run_bench_files([files["paths"]["onnx", "fp32"]], BenchOptions(data=files["data"], calib=files["data"], **FAST))
