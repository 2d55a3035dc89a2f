"""``resunetpp bench``: rows, accuracy against the reference, reports, the Dice-drop gate.

One tiny checkpoint is exported once for the module (the slow part); every other test reuses its
artifacts folder. Timings are never asserted -- only that they were measured and are well formed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from resunetpp import engines
from resunetpp.bench import harness
from resunetpp.bench.artifacts import MARKER, plan_images
from resunetpp.bench.peak import INT8_PEAK_SHAPES
from resunetpp.bench.harness import (MATRIX, NONFINITE, BenchOptions, BenchRow, EvalData, NonFiniteResult,
                                Settings, bench_engine, gate_failures, measure_accuracy, measure_latency,
                                plan_targets, run_bench)
from resunetpp.bench.report import write_json, write_markdown, write_plot
from resunetpp.cli import app
from conftest import make_dataset, tiny_checkpoint
from resunetpp.engines.base import Engine
from resunetpp.export import calibration as cal
from resunetpp.checkpoint import load_checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.preprocess import Preprocessing

runner = CliRunner()
FAST = dict(warmup_s=0.02, duration_s=0.1)
CLI_FAST = ["--warmup-s", "0.02", "--duration-s", "0.1", "--batch-sizes", "1", "--threads", "1"]
#: Row keys the issue requires, and their types in a measured row.
REQUIRED = {"backend": str, "precision": str, "status": str, "batch_size": int, "dice_vs_reference": float,
            "dice_vs_reference_min": float, "max_abs_diff": float, "dice_vs_gt": float, "latency_ms_p50": float,
            "latency_ms_p90": float, "latency_ms_p99": float, "throughput_ips": float, "end_to_end_ips": float,
            "size_mb": float}
EXTRA = {"mean_abs_diff": float, "iou_vs_gt": float, "dice_drop": float, "load_s": float, "overhead_pct": float,
         "gflops_per_s": float}


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A tiny checkpoint, 4 evaluation and 4 calibration images, and one full benchmark run."""
    root = tmp_path_factory.mktemp("bench")
    ckpt = tiny_checkpoint(root / "tiny.safetensors", size=32)
    data = make_dataset(root / "eval", 4, seed=1, prefix="ev")
    calib = make_dataset(root / "calib", 4, seed=2, prefix="ca")
    torch_threads = torch.get_num_threads()
    result = run_bench(BenchOptions(model=ckpt, data=data, calib=calib, artifacts=root / "art", batch_sizes=(1, 2),
                                    threads=1, **FAST))
    assert torch.get_num_threads() == torch_threads  # --threads is undone after the run
    return {"root": root, "ckpt": ckpt, "data": data, "calib": calib, "art": root / "art", "result": result}


# ---- the full run -------------------------------------------------------------------------------------
def test_every_row_present_or_explained(case):
    result = case["result"]
    for backend, precision in MATRIX:
        rows = [r for r in result.rows if (r.backend, r.precision) == (backend, precision)]
        assert rows, f"{backend} {precision} missing"
        if rows[0].ok:
            assert sorted(r.batch_size for r in rows) == [1, 2]
            assert all(r.ok for r in rows), [(r.status, r.reason) for r in rows]
        else:
            assert len(rows) == 1 and rows[0].status == "skipped" and rows[0].reason, rows[0]
    measured = {r.label for r in result.rows if r.ok}
    # onnxruntime and openvino are installed here, calibration images were given: these must run.
    assert {"torch fp32", "onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8"} <= measured
    reasons = {r.label: r.reason for r in result.rows if r.status == "skipped"}
    if engines.available_backends()["tensorrt"] is not None:
        assert reasons["tensorrt fp32"] == engines.available_backends()["tensorrt"]
    if not torch.cuda.is_available():
        assert "CUDA" in reasons["torch fp16"]


def test_accuracy_of_real_backends(case):
    rows = {(r.label, r.batch_size): r for r in case["result"].rows}
    ref = rows[("torch fp32", 1)]
    assert ref.dice_vs_reference == 1.0 and ref.max_abs_diff == 0.0 and ref.dice_drop == 0.0
    assert ref.speedup == pytest.approx(1.0)
    ort = rows[("onnxruntime fp32", 1)]
    assert ort.max_abs_diff < 1e-4 and ort.dice_vs_reference > 0.99
    assert ort.dice_vs_gt == pytest.approx(ref.dice_vs_gt, abs=0.02)
    assert 0.0 <= ort.iou_vs_gt <= ort.dice_vs_gt <= 1.0
    for r in case["result"].rows:
        if r.ok:
            assert r.load_s > 0 and r.size_mb > 0 and Path(r.artifact).is_file()
            assert r.latency_ms_p50 <= r.latency_ms_p90 <= r.latency_ms_p99
            assert r.latency_iterations >= harness.MIN_ITERATIONS


def test_json_schema(case, tmp_path):
    path = write_json(case["result"], tmp_path / "bench.json")
    data = json.loads(path.read_text())
    env = data["environment"]
    assert env["cpu"]["model"] is None or isinstance(env["cpu"]["model"], str)
    assert isinstance(env["cpu"]["flags"], dict) and env["versions"]["torch"] and env["versions"]["onnxruntime"]
    assert env["threads"]["requested"] == 1
    assert data["calibration"]["count"] == 4 and data["evaluation"]["count"] == 4
    assert not set(data["calibration"]["images"]) & set(data["evaluation"]["images"])
    for row in data["rows"]:
        assert set(REQUIRED) | set(EXTRA) | {"reason"} <= set(row)
        for key in ("backend", "precision", "status"):
            assert isinstance(row[key], str)
        if row["status"] == "ok":
            for key, kind in {**REQUIRED, **EXTRA}.items():
                assert isinstance(row[key], kind), (row["backend"], row["precision"], key, row[key])
        else:
            assert isinstance(row["reason"], str) and row["reason"]
            assert row["dice_vs_reference"] is None and row["latency_ms_p50"] is None
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left


def test_markdown_and_png(case, tmp_path):
    md = write_markdown(case["result"], tmp_path / "bench.md").read_text()
    assert md.startswith("# resunetpp bench")
    for header in ("backend", "precision", "size MB", "Dice vs ref", "Dice vs GT", "p50 ms", "img/s", "speed-up",
                   "e2e img/s", "overhead %"):
        assert f"| {header} " in md or f" {header} |" in md
    for r in case["result"].rows:
        line = f"| {r.backend} | {r.precision} | {r.batch_size if r.batch_size is not None else '-'} | {r.status} |"
        assert line in md, line
    assert "tensorrt" in md.split("## Not measured")[1]
    png = write_plot(case["result"], tmp_path / "bench.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.md", "bench.png"]


def test_artifacts_reused_by_key(case):
    result = run_bench(BenchOptions(model=case["ckpt"], data=case["data"], calib=case["calib"], artifacts=case["art"],
                                    backends=("onnxruntime",), precisions=("fp32", "int8"), batch_sizes=(1,),
                                    end_to_end=False, **FAST))
    assert result.artifacts["exported"] == [] and result.artifacts["export_s"] is None
    assert set(result.artifacts["reused"]) == {"onnx fp32", "onnx int8"}
    assert [r.label for r in result.rows] == ["onnxruntime fp32", "onnxruntime int8"]
    assert all(r.ok and r.end_to_end_ips is None for r in result.rows)
    marker = json.loads((case["art"] / MARKER).read_text())
    assert marker["key"] == result.artifacts["key"] and marker["fields"]["checkpoint_sha256"]
    assert {"onnx fp16", "openvino fp32", "openvino int8"} <= set(marker["artifacts"])  # a narrower run keeps them


def test_rates_read_against_the_measured_cpu_peak(case):
    """Issue 6: GFLOP/s are set against a peak measured on this CPU, per arithmetic precision."""
    result = case["result"]
    peaks = result.environment["cpu_peak"]
    assert peaks["f32"]["gflops"] > 0 and peaks["f32"]["kernel"].endswith("_f32") and peaks["f32"]["threads"] == 1
    rows = {(r.label, r.batch_size): r for r in result.rows}
    for label in ("torch fp32", "onnxruntime fp32", "openvino fp32"):
        r = rows[(label, 1)]
        assert r.peak_pct == pytest.approx(100 * r.gflops_per_s / peaks["f32"]["gflops"]), label
    # issue 19: the INT8 peak, measured on a quantized convolution that really runs in int8
    int8 = peaks["int8"]
    assert int8["runtime_precision"] in ("u8", "i8") and int8["unit"] == "GOP/s" and int8["gops"] == int8["gflops"] > 0
    assert int8["kernel"] and "f32" not in int8["kernel"] and int8["threads"] == 1
    assert tuple(int8["shape"]) in INT8_PEAK_SHAPES and set(int8["by_shape"]) == {
        "x".join(map(str, s)) for s in INT8_PEAK_SHAPES} and max(int8["by_shape"].values()) == round(int8["gops"], 1)
    assert peaks["f32"]["runtime_precision"] == "f32"
    r = rows[("openvino int8", 1)]
    assert r.peak_pct == pytest.approx(100 * r.gflops_per_s / int8["gops"])
    assert rows[("onnxruntime int8", 1)].peak_pct is None  # float convolutions on dequantized values
    if ("openvino bf16", 1) in rows and rows[("openvino bf16", 1)].ok:
        assert rows[("openvino bf16", 1)].peak_pct == pytest.approx(
            100 * rows[("openvino bf16", 1)].gflops_per_s / peaks["bf16"]["gflops"])
    assert any(n.startswith("peak: f32 ") and f"int8 {int8['gops']:.0f} GOP/s ({int8['kernel']}" in n
               for n in result.notes)
    md = write_markdown(result, case["root"] / "peak.md").read_text()
    for label in ("openvino fp32", "openvino int8"):
        r = rows[(label, 1)]
        assert f"| {r.gflops_per_s:.0f} ({r.peak_pct:.0f}%) |" in md
    assert f"int8 {int8['gops']:.0f} GOP/s ({int8['kernel']} in {int8['runtime_precision']}" in md
    data = json.loads(write_json(result, case["root"] / "peak.json").read_text())
    assert data["environment"]["cpu_peak"]["int8"]["kernel"] == int8["kernel"]


def test_arithmetic_precision_of_rows():
    def row(backend: str, precision: str, device: str = "cpu", **details) -> BenchRow:
        return BenchRow(backend, precision, device=device, details=details)

    assert harness.arithmetic_precision(row("openvino", "fp32", precision_hint="f32")) == "f32"
    assert harness.arithmetic_precision(row("openvino", "fp16", precision_hint="bf16")) == "bf16"
    assert harness.arithmetic_precision(row("openvino", "int8", precision_hint="f32")) == "int8"
    assert harness.arithmetic_precision(row("onnxruntime", "int8", providers=["CPUExecutionProvider"])) is None
    assert harness.arithmetic_precision(row("torch", "bf16")) == "bf16"
    assert harness.arithmetic_precision(row("torch", "fp32", device="cuda")) is None
    assert harness.arithmetic_precision(row("onnxruntime", "fp32", "auto", providers=["CPUExecutionProvider"])) == "f32"
    assert harness.arithmetic_precision(row("onnxruntime", "fp32", "auto", providers=["CUDAExecutionProvider",
                                                                                       "CPUExecutionProvider"])) is None
    assert harness.arithmetic_precision(row("onnxruntime", "fp16", providers=["CPUExecutionProvider"])) is None
    rows = [BenchRow("torch", "fp32", device="cpu", batch_size=1, throughput_ips=2.0),
            BenchRow("openvino", "bf16", device="cpu", batch_size=1, throughput_ips=8.0,
                     details={"precision_hint": "bf16"})]
    harness.add_speedups(rows, 10**10, {"f32": {"gflops": 40.0}, "bf16": {"gflops": 100.0}})
    assert [r.gflops_per_s for r in rows] == [20.0, 80.0] and [r.peak_pct for r in rows] == [50.0, 80.0]
    assert rows[1].speedup == 4.0
    q = [BenchRow("openvino", "int8", device="cpu", batch_size=1, throughput_ips=30.0)]
    harness.add_speedups(q, 10**10, {"f32": {"gflops": 40.0}, "int8": {"gflops": 600.0, "gops": 600.0}})
    assert q[0].peak_pct == 50.0  # against the int8 peak, not f32's
    q = [BenchRow("openvino", "int8", device="cpu", batch_size=1, throughput_ips=30.0)]
    harness.add_speedups(q, 10**10, {"f32": {"gflops": 40.0}})
    assert q[0].gflops_per_s == 300.0 and q[0].peak_pct is None  # no int8 peak measured: no share


def test_conv_peak_measures_the_requested_precision():
    pytest.importorskip("openvino")
    from resunetpp.bench.peak import CONV_SHAPE, conv_flops, conv_peak

    assert conv_flops(CONV_SHAPE) == 2 * 4 * 256 * 32 * 32 * 256 * 9
    small = (1, 16, 16, 16, 3)
    got = conv_peak("f32", threads=1, seconds=0.05, shape=small)
    assert got["gflops"] > 0 and got["kernel"].endswith("_f32") and got["threads"] == 1 and got["shape"] == list(small)
    assert got["runtime_precision"] == "f32" and "gops" not in got
    q = conv_peak("int8", threads=1, seconds=0.05, shape=small)
    assert q["runtime_precision"] in ("u8", "i8") and q["gops"] == q["gflops"] > 0 and q["unit"] == "GOP/s"
    assert q["kernel"] and "f32" not in q["kernel"] and q["threads"] == 1


def test_an_int8_peak_that_runs_in_float_is_refused(monkeypatch):
    """A quantized convolution the plugin leaves in float is no INT8 peak: it is left out, with why,
    and the f32 peak stands."""
    pytest.importorskip("openvino")
    import dataclasses as dc

    from resunetpp.bench import peak
    from resunetpp.engines import openvino_engine

    real = openvino_engine.compile_conv

    def float_int8(shape, precision="f32", threads=None):
        conv = real((1, 8, 8, 8, 3), "f32" if precision == "int8" else precision, threads)
        return dc.replace(conv, kernel="jit_avx2_f32") if precision == "int8" else conv

    monkeypatch.setattr(openvino_engine, "compile_conv", float_int8)
    problems: dict = {}
    got = peak.cpu_peaks(threads=1, bf16=False, seconds=0.02, int8=True, problems=problems)
    assert set(got) == {"f32"} and "in f32, not in int8" in problems["int8"]
    with pytest.raises(ResUNetError, match="not in int8"):
        peak.conv_peak("int8", threads=1, seconds=0.01)
    notes: list = []
    rows = [BenchRow("openvino", "int8", device="cpu", batch_size=1, throughput_ips=1.0)]
    got = harness.measure_peaks(rows, 1, {}, notes, seconds=0.02)
    assert set(got) == {"f32"} and any(n.startswith("the CPU's int8 peak could not be measured") for n in notes)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="measured from /proc/stat (Linux)")
def test_other_processes_cpu_sees_a_busy_neighbour():
    import subprocess
    import sys
    import time

    from resunetpp.bench.env import other_processes_cpu

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)  # the interpreter has started and spins
        with other_processes_cpu() as busy:
            time.sleep(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy.pct is not None and 100.0 / (os.cpu_count() or 1) * 0.5 <= busy.pct <= 100.0
    rows = [BenchRow("openvino", "fp32", batch_size=1, details={"other_processes_cpu_pct": 48.0}),
            BenchRow("torch", "fp32", batch_size=1, details={"other_processes_cpu_pct": 1.0})]
    (note,) = harness._contention_notes(rows)
    assert "up to 48%" in note and "openvino fp32 b1 (48%)" in note and "torch" not in note
    assert harness._contention_notes(rows[1:]) == []


# ---- accuracy on a hand-made case --------------------------------------------------------------------
def _hand_made(num: int = 3) -> tuple[EvalData, list[np.ndarray]]:
    """16x16 inputs tagged with their index; reference: left half 0.9, right half 0.1; GT = left half."""
    pre = Preprocessing(size=(16, 16))
    inputs = [np.full((3, 16, 16), float(i), np.float32) for i in range(num)]
    ref = np.full((1, 16, 16), 0.1, np.float32)
    ref[:, :, :8] = 0.9
    gt = np.zeros((16, 16), np.uint8)
    gt[:, :8] = 1
    data = EvalData(pre, 1, [f"im{i}" for i in range(num)], [Path(f"im{i}.png") for i in range(num)], inputs,
                    [(16, 16)] * num, [gt] * num)
    return data, [ref.copy() for _ in range(num)]


def _lookup(outputs: list[np.ndarray]):
    return lambda x: np.stack([outputs[int(xi[0, 0, 0])] for xi in x])


def test_accuracy_reference_output_is_perfect():
    data, ref = _hand_made()
    acc = measure_accuracy(_lookup(ref), data, ref)
    assert acc["dice_vs_reference"] == 1.0 and acc["dice_vs_reference_min"] == 1.0 and acc["dice_drop"] == 0.0
    assert acc["max_abs_diff"] == 0.0 and acc["mean_abs_diff"] == 0.0
    assert acc["dice_vs_gt"] == 1.0 and acc["iou_vs_gt"] == 1.0 and acc["dice_vs_gt_drop"] == 0.0


def test_accuracy_inverted_mask_is_near_zero():
    data, ref = _hand_made()
    acc = measure_accuracy(_lookup([1.0 - r for r in ref]), data, ref)
    assert acc["dice_vs_reference"] < 0.01 and acc["dice_drop"] > 0.99
    assert acc["max_abs_diff"] == pytest.approx(0.8) and acc["mean_abs_diff"] == pytest.approx(0.8)
    assert acc["dice_vs_gt"] < 0.01 and acc["iou_vs_gt"] < 0.01


def test_accuracy_partial_overlap_by_hand():
    data, ref = _hand_made()
    out = [r.copy() for r in ref]
    out[1][:, :, 4:8] = 0.2  # image 1 keeps only the left quarter: Dice 2*64/(128+64), IoU 64/128
    acc = measure_accuracy(_lookup(out), data, ref)
    assert acc["dice_vs_reference_min"] == pytest.approx(2 / 3)
    assert acc["dice_vs_reference"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert acc["iou_vs_gt"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert acc["dice_vs_gt_drop"] == pytest.approx(1 - (1 + 2 / 3 + 1) / 3)
    assert acc["max_abs_diff"] == pytest.approx(0.7)


def test_accuracy_nan_is_not_averaged():
    data, ref = _hand_made()
    out = [r.copy() for r in ref]
    out[2][0, 3, 3] = np.nan
    with pytest.raises(NonFiniteResult, match="1 of 3"):
        measure_accuracy(_lookup(out), data, ref)


# ---- bench_engine with fake engines -----------------------------------------------------------------
def _fake_probs(x: np.ndarray) -> np.ndarray:
    """A deterministic 'model': sigmoid of the channel mean (a real engine of it returns this)."""
    return (1.0 / (1.0 + np.exp(-x.mean(axis=1, keepdims=True)))).astype(np.float32)


class FakeEngine(Engine):
    """A real :class:`Engine` (input/output checks and all) whose backend returns a chosen answer."""

    backend = "fake"
    option_names = ("mode",)

    def _load_impl(self) -> None:
        pass

    def _close_impl(self) -> None:
        pass

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        probs = _fake_probs(batch)
        mode = self.options.get("mode", "same")
        if mode == "inverted":
            return 1.0 - probs
        if mode == "nan":
            probs[0, 0, 0, 0] = np.nan
        return probs


def _fake_engine(tmp_path: Path, pre: Preprocessing, mode: str) -> FakeEngine:
    record = {"preprocessing": pre.to_dict(), "model": {"num_classes": 1}, "class_names": ["polyp"],
              "activation": "sigmoid", "artifact": {"precision": "fp32", "input_shape": ["batch", 3, "h", "w"]}}
    return FakeEngine(tmp_path / "fake.model", record, mode=mode)


@pytest.fixture
def fake_data(tmp_path) -> EvalData:
    root = make_dataset(tmp_path / "data", 3, seed=3, prefix="im")
    return EvalData.load(cal.select_images(root, None, None, role="evaluation"), Preprocessing(size=(32, 32)), 1)


def test_bench_engine_reference_answer(fake_data, tmp_path):
    reference = [_fake_probs(x[None])[0] for x in fake_data.inputs]
    engine = _fake_engine(tmp_path, fake_data.pre, "same").load()
    rows = bench_engine(engine, BenchRow("fake", "fp32"), fake_data, reference,
                        Settings(batch_sizes=(1, 2), threads=1, **FAST))
    assert [(r.status, r.batch_size) for r in rows] == [("ok", 1), ("ok", 2)]
    for r in rows:
        assert r.dice_vs_reference == 1.0 and r.max_abs_diff == 0.0 and r.dice_vs_gt is not None
        assert r.latency_source == "runtime" and isinstance(r.overhead_pct, float)
        assert r.throughput_ips > 0 and r.end_to_end_ips > 0 and r.end_to_end_ratio > 0
    assert gate_failures(rows, 0.0) == []


def test_bench_engine_inverted_fails_the_gate(fake_data, tmp_path):
    reference = [_fake_probs(x[None])[0] for x in fake_data.inputs]
    engine = _fake_engine(tmp_path, fake_data.pre, "inverted").load()
    rows = bench_engine(engine, BenchRow("fake", "int8"), fake_data, reference,
                        Settings(batch_sizes=(1,), end_to_end=False, **FAST))
    assert rows[0].ok and rows[0].dice_vs_reference < 0.05 and rows[0].dice_drop > 0.95
    assert gate_failures(rows, 0.5) == [f"fake int8 (Dice drop {rows[0].dice_drop:.4f} > 0.5)"]
    assert gate_failures(rows, 1.0) == []


def test_bench_engine_nan_is_reported_failing(fake_data, tmp_path):
    reference = [_fake_probs(x[None])[0] for x in fake_data.inputs]
    engine = _fake_engine(tmp_path, fake_data.pre, "nan").load()
    rows = bench_engine(engine, BenchRow("fake", "fp16"), fake_data, reference, Settings(batch_sizes=(1, 8), **FAST))
    assert len(rows) == 1 and rows[0].status == NONFINITE and "NaN" in rows[0].reason
    assert rows[0].dice_vs_reference is None and rows[0].latency_ms_p50 is None
    assert gate_failures(rows, 1.0) == [f"fake fp16 ({NONFINITE})"]


def test_bench_engine_refuses_other_preprocessing(fake_data, tmp_path):
    engine = _fake_engine(tmp_path, Preprocessing(size=(64, 64)), "same").load()
    rows = bench_engine(engine, BenchRow("fake", "fp32"), fake_data, [], Settings(batch_sizes=(1,), **FAST))
    assert rows[0].status == "failed: preprocessing mismatch"


def test_measure_latency_shape():
    x = np.zeros((2, 3, 8, 8), np.float32)
    both = measure_latency(lambda a: a + 1, lambda a: a, x, 0.0, 0.01)
    assert both["source"] == "runtime" and isinstance(both["overhead_pct"], float)
    assert both["latency"]["iterations"] >= harness.MIN_ITERATIONS
    assert both["latency"]["p50"] <= both["latency"]["p90"] <= both["latency"]["p99"]
    alone = measure_latency(lambda a: a, None, x, 0.0, 0.01)
    assert alone["source"] == "engine" and alone["overhead_pct"] is None


# ---- planning -----------------------------------------------------------------------------------------
def test_plan_targets_explains_every_combination():
    flags = {"avx2": True, "avx512_bf16": False, "amx_bf16": False}
    available = {"onnxruntime": None, "openvino": None, "tensorrt": "no CUDA device"}
    targets, skipped = plan_targets(harness.BACKENDS, harness.PRECISIONS, device="cpu", cpu_flags=flags,
                                    available=available, calib_missing="pass --calib", threads=3)
    labels = [t.label for t in targets] + [r.label for r in skipped]
    assert sorted(labels) == sorted(f"{b} {p}" for b, p in MATRIX)
    reasons = {r.label: r.reason for r in skipped}
    assert reasons["tensorrt int8"] == "no CUDA device"
    assert reasons["onnxruntime int8"] == "pass --calib" and reasons["openvino int8"] == "pass --calib"
    assert "bf16" in reasons["torch bf16"] and "bf16" in reasons["openvino bf16"]
    by_label = {t.label: t for t in targets}
    assert by_label["openvino fp32"].options == {"threads": 3, "precision": "f32"}
    assert by_label["onnxruntime fp32"].options == {"intra_op_num_threads": 3}
    assert by_label["torch fp32"].artifact is None and by_label["openvino fp16"].artifact == ("openvino", "fp16")
    only, none = plan_targets(("openvino",), ("bf16",), device="cpu", cpu_flags={"avx512_bf16": True},
                              available=available, calib_missing=None, threads=None)
    assert [t.label for t in only] == ["openvino bf16"] and only[0].artifact == ("openvino", "fp32")
    assert only[0].options == {"precision": "bf16"} and none == []


def test_plan_images_splits_the_shipped_samples(tmp_path):
    samples = make_dataset(tmp_path / "samples", 6, splits={"val": list(range(6))}, prefix="s")
    plan = plan_images(samples, None, None, True, samples)
    assert plan.evaluation.stems == ["s000", "s001", "s002"] and plan.calibration.stems == ["s003", "s004", "s005"]
    assert plan.calib_missing is None and "first 3 are evaluated" in plan.notes[0]
    other = make_dataset(tmp_path / "other", 2, prefix="o")
    plan = plan_images(other, None, None, True, samples)
    assert plan.evaluation.stems == ["o000", "o001"] and plan.calibration.stems == ["s003", "s004", "s005"]
    plan = plan_images(other, None, None, False, samples)
    assert plan.calibration is None and "--calib" in plan.calib_missing
    with pytest.raises(ResUNetError, match="overlap"):
        plan_images(samples, None, samples, False, None)


def test_default_model_evaluates_and_calibrates_on_disjoint_halves():
    from resunetpp.defaults import default_data_path, default_model_path

    if default_model_path() is None or default_data_path() is None:
        pytest.skip("this install ships no default model / sample data")
    setup = harness._setup(BenchOptions())
    ev, calib = setup.images.evaluation, setup.images.calibration
    val = [s for s in (default_data_path() / "val.txt").read_text().split() if s]
    assert setup.default_model and ev.stems == val[: len(val) // 2] and calib.stems == val[len(val) // 2:]
    assert not set(ev.file_hashes) & set(calib.file_hashes)


# ---- the command line ---------------------------------------------------------------------------------
def _tamper(art: Path, dest: Path) -> Path:
    """A copy of the artifacts whose ONNX FP32 returns 1 - p (an inverted mask) and INT8 returns NaN."""
    shutil.copytree(art, dest)
    for name, op, value in (("model_fp32.onnx", "Sub", 1.0), ("model_int8_qdq.onnx", "Mul", float("nan"))):
        model = onnx.load(str(dest / name))
        graph = model.graph
        last = next(n for n in graph.node if "probs" in n.output)
        last.output[list(last.output).index("probs")] = "probs_raw"
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), "tamper_c"))
        inputs = ["tamper_c", "probs_raw"] if op == "Sub" else ["probs_raw", "tamper_c"]
        graph.node.append(helper.make_node(op, inputs, ["probs"], name="tamper"))
        onnx.save(model, str(dest / name))
    return dest


def test_cli_gate_passes_and_writes_reports(case, tmp_path):
    out = tmp_path / "r"
    result = runner.invoke(app, ["bench", str(case["ckpt"]), "--data", str(case["data"]), "--calib", str(case["calib"]),
                                 "--artifacts", str(case["art"]), "--backends", "torch,onnxruntime", "--precisions",
                                 "fp32", *CLI_FAST, "--json", str(out / "b.json"), "--markdown", str(out / "b.md"),
                                 "--plot", str(out / "b.png"), "--max-dice-drop", "0.01"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "onnxruntime" in result.stdout and "wrote" in result.stdout
    rows = json.loads((out / "b.json").read_text())["rows"]
    assert [(r["backend"], r["precision"], r["status"]) for r in rows] == [("torch", "fp32", "ok"),
                                                                          ("onnxruntime", "fp32", "ok")]
    assert (out / "b.md").is_file() and (out / "b.png").stat().st_size > 1000


def test_cli_gate_fails_naming_rows(case, tmp_path):
    art = _tamper(case["art"], tmp_path / "art")
    json_path = tmp_path / "b.json"
    args = ["bench", str(case["ckpt"]), "--data", str(case["data"]), "--calib", str(case["calib"]), "--artifacts",
            str(art), "--backends", "torch", "--backends", "onnxruntime", "--precisions", "fp32,int8", *CLI_FAST,
            "--no-end-to-end", "--json", str(json_path)]
    result = runner.invoke(app, [*args, "--max-dice-drop", "0.2"])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip().splitlines()[-1]  # after the progress lines
    assert err.startswith("error: 2 row(s) fail --max-dice-drop 0.2")
    assert "onnxruntime fp32 (Dice drop" in err and f"onnxruntime int8 ({NONFINITE})" in err
    assert "torch fp32" not in err
    rows = {r["backend"] + " " + r["precision"]: r for r in json.loads(json_path.read_text())["rows"]}
    assert rows["onnxruntime fp32"]["dice_vs_reference"] < 0.05  # the report is written before the gate
    assert rows["onnxruntime int8"]["status"] == NONFINITE and rows["onnxruntime int8"]["dice_vs_reference"] is None
    assert json.loads((art / MARKER).read_text())["artifacts"]  # reused, not re-exported over the tampering
    no_gate = runner.invoke(app, args)
    assert no_gate.exit_code == 0, no_gate.stderr


def test_cli_bad_input(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["bench", str(bad), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.safetensors" in lines[0]
    assert not (tmp_path / "b.json").exists()
    for option, value in (("--backends", "torch,cuda"), ("--precisions", "int4"), ("--batch-sizes", "1,0")):
        result = runner.invoke(app, ["bench", option, value])
        assert result.exit_code == 2 and option in result.output + result.stderr


def test_load_checkpoint_sha_is_the_cache_key(case):
    key, fields = harness.artifact_key(load_checkpoint(case["ckpt"]), Preprocessing(size=(32, 32)), None)
    other, _ = harness.artifact_key(load_checkpoint(case["ckpt"]), Preprocessing(size=(64, 64)), None)
    assert key != other and len(key) == 16 and fields["checkpoint_sha256"] == load_checkpoint(case["ckpt"]).sha256
    # the INT8 recipe is part of the key: a changed default re-exports instead of reusing old artifacts
    assert fields["recipes"]["qdq"]["quantize_outputs"] is False and fields["openvino_int8"] == "qdq"
