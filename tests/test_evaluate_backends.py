"""``resunetpp evaluate`` through any backend (issue 21, items 3 and 4): ``--backend``, ``-O``,
``--device``, the header naming what ran, ``--worst N`` and ``--overlay DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_dataset, tiny_checkpoint
from resunetpp.cli import app
from resunetpp.engines.base import engine_line, precision_that_ran
from resunetpp.engines.evaluate import comparison_overlay, evaluate_path
from resunetpp.export.pipeline import ExportOptions, run_export

runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalb")
    ckpt = tiny_checkpoint(root / "tiny.safetensors", size=32)
    data = make_dataset(root / "data", 4, seed=3, prefix="im")
    report = run_export(ExportOptions(ckpt, root / "dist", formats=("onnx",), precisions=("fp32",), eval=data))
    return {"ckpt": ckpt, "data": data, "onnx": Path(report.artifacts[0].path)}


def test_onnx_evaluates_like_the_checkpoint(work):
    a = evaluate_path(work["ckpt"], work["data"], device="cpu")
    b = evaluate_path(work["onnx"], work["data"], backend="onnxruntime", engine_options={"intra_op_num_threads": 1})
    assert b.engine["backend"] == "onnxruntime" and a.engine["backend"] == "torch"
    assert b.mean.dice == pytest.approx(a.mean.dice, abs=0.02)


def test_cli_evaluate_backend_option_worst_and_overlay(work, tmp_path):
    out = tmp_path / "ov"
    result = runner.invoke(app, ["evaluate", str(work["onnx"]), "--data", str(work["data"]), "--backend",
                                 "openvino", "-O", "precision=f32", "--worst", "2", "--overlay", str(out),
                                 "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output + result.stderr
    assert "openvino on" in result.stdout.replace("\n", " ") and "(fp32)" in result.stdout
    assert "worst 2 of 4 images by Dice" in result.stdout
    doc = json.loads((tmp_path / "s.json").read_text())
    worst = sorted(doc["images"], key=lambda r: r["dice"])[:2]
    assert all(r["image"] in result.stdout for r in worst)
    assert doc["engine"]["backend"] == "openvino"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r['image']}_overlay.png" for r in doc["images"])


def test_cli_evaluate_unknown_option_is_one_line(work):
    result = runner.invoke(app, ["evaluate", str(work["onnx"]), "--data", str(work["data"]), "-O", "nonsense"])
    assert result.exit_code == 1 and result.stderr.startswith("error: --engine-option 'nonsense'")


def test_comparison_overlay_colours():
    image = np.full((2, 3, 3), 100, np.uint8)
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    truth = np.array([[1, 0, 1], [0, 0, 0]])
    out = np.asarray(comparison_overlay(image, pred, truth, alpha=1.0))
    assert tuple(out[0, 0]) == (0, 200, 0)  # both
    assert tuple(out[0, 1]) == (230, 0, 0)  # predicted only
    assert tuple(out[0, 2]) == (255, 220, 0)  # missed
    assert tuple(out[1, 0]) == (100, 100, 100)  # neither: the image


def test_precision_that_ran():
    assert precision_that_ran({"precision": "fp32", "precision_hint": "bf16"}) == "bf16 (fp32 artifact)"
    assert precision_that_ran({"precision": "fp32", "precision_hint": "f32"}) == "fp32"
    assert precision_that_ran({"precision": "fp16"}) == "fp16"
    assert precision_that_ran({"precision": "int8", "precision_hint": "bf16"}) == "int8 (float layers bf16)"
    assert precision_that_ran({"precision": "int8", "precision_hint": "f32"}) == "int8"
    assert engine_line({"backend": "openvino", "device": "CPU", "precision": "fp32", "precision_hint": "bf16"}) \
        == "openvino on CPU (bf16 (fp32 artifact))"
