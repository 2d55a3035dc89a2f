"""The export format registry (export/formats.py): the three formats and their artifact names as
before, the precisions, and a new ``*_format.py`` module found, parsed and run with no other edit."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import resunetpp.export as export_package
from resunetpp.export import formats, pipeline
from resunetpp.export.options import ExportOptions, TensorRTOptions
from resunetpp.export.tensorrt_format import tensorrt_status
from resunetpp.checkpoint import Checkpoint, save_checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.model import ModelConfig, ResUNetPlusPlus
from resunetpp.preprocess import Preprocessing

NAMES = {
    ("onnx", "fp32"): "model_fp32.onnx", ("onnx", "fp16"): "model_fp16.onnx", ("onnx", "int8"): "model_int8_qdq.onnx",
    ("openvino", "fp32"): "openvino/model_fp32.xml", ("openvino", "fp16"): "openvino/model_fp16.xml",
    ("openvino", "int8"): "openvino/model_int8.xml",
    ("tensorrt", "fp32"): "tensorrt/model_fp32.engine", ("tensorrt", "fp16"): "tensorrt/model_fp16.engine",
    ("tensorrt", "int8"): "tensorrt/model_int8.engine",
}


def test_the_registry_lists_the_three_formats_with_their_precisions():
    found = [f for f in formats.export_formats() if f.default]
    assert [f.name for f in found] == ["onnx", "openvino", "tensorrt"]
    # the opt-in packaging (triton) is registered too, built last, only on request
    assert list(pipeline.FORMATS) == ["onnx", "openvino", "tensorrt", "triton"]
    assert [f.name for f in formats.export_formats() if not f.default] == ["triton"]
    assert all(f.precisions == ("fp32", "fp16", "int8") for f in found)
    assert {f.name: f.backend for f in found} == {"onnx": "onnxruntime", "openvino": "openvino",
                                                  "tensorrt": "tensorrt"}
    openvino = formats.get_format("openvino")
    assert dict(openvino.verify_options) == {"precision": "f32"} and openvino.companions == (".bin",)
    assert openvino.artifact_files(Path("o/m.xml")) == [Path("o/m.xml"), Path("o/m.bin")]
    assert formats.get_format("onnx").unavailable() is None and formats.get_format("openvino").unavailable() is None
    trt = formats.get_format("tensorrt")
    ok, info = tensorrt_status()
    assert trt.unavailable() == (None if ok else info)
    assert trt.skip(ExportOptions(Path("c"), Path("o"), tensorrt=TensorRTOptions(dla_core=0)), "fp32") is not None
    assert trt.skip(ExportOptions(Path("c"), Path("o")), "fp32") is None
    assert all(f.description and "\n" not in f.description for f in found)
    with pytest.raises(KeyError, match="unknown export format 'coreml'"):
        formats.get_format("coreml")


def test_artifact_names_are_unchanged():
    assert {(f, p): formats.artifact_name(f, p) for f, p in NAMES} == NAMES
    assert {(f, p): pipeline.artifact_name(f, p) for f, p in NAMES} == NAMES
    with pytest.raises(KeyError, match="builds no int4"):
        formats.artifact_name("onnx", "int4")


def test_the_precisions_registry():
    found = formats.export_precisions()
    assert [p.name for p in found] == ["fp32", "fp16", "int8"] == list(formats.PRECISIONS)
    assert all(p.description and "\n" not in p.description for p in found)
    assert [p.name for p in found if p.needs_calibration] == ["int8"]
    with pytest.raises(ValueError, match="known precisions"):
        formats.ExportFormat("x", "x", {"int4": "m"}, "onnxruntime", build=lambda run, ps: None)


FAKE_FORMAT = '''
"""A format this test adds: a copy of the verified FP32 ONNX under fake/, verified on ONNX Runtime."""
import shutil

from resunetpp.export.formats import ExportFormat, register_format

CALLS = []


def build(run, precisions):
    CALLS.append(list(precisions))
    for precision in precisions:
        final = run.final("fake", precision)
        staged = run.work / "fake.onnx"
        shutil.copy(run.onnx_paths["fp32"], staged)
        with run.staged(staged, "fake", precision) as predict:
            metrics = run.measure("fake copy", predict)
        gate, keep = run.judge("fake", precision, metrics)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(staged, final)
        final.with_suffix(".txt").write_text("beside")
        run.add("fake", precision, final, True, metrics, gate)


FORMAT = register_format(ExportFormat(
    name="fake", description="a test format", order=5, build=build, backend="onnxruntime",
    files={"fp32": "fake/model.onnx", "fp16": "fake/model_fp16.onnx"}, companions=(".txt",),
    availability=lambda: {availability}))
'''


@pytest.fixture
def fake_format(tmp_path, monkeypatch):
    """``fake_format.py`` in a folder added to the export package's path, found by the registry's own
    discovery run again (the registry restored by monkeypatch)."""

    def install(availability: str = "None"):
        folder = tmp_path / "plugins"
        folder.mkdir(exist_ok=True)
        (folder / "fake_format.py").write_text(FAKE_FORMAT.replace("{availability}", availability))
        monkeypatch.setattr(formats, "_REGISTRY", dict(formats._registry()))  # the built-in formats, found first
        monkeypatch.setattr(formats, "_discovered", False)
        monkeypatch.setattr(export_package, "__path__", [*export_package.__path__, str(folder)])
        return formats.get_format("fake")

    yield install
    sys.modules.pop("resunetpp.export.fake_format", None)


def test_a_new_format_module_is_found_and_parsed_as_a_target(fake_format, tmp_path):
    fake = fake_format()
    assert [f.name for f in formats.export_formats()] == ["onnx", "fake", "openvino", "tensorrt", "triton"]
    assert list(pipeline.FORMATS) == ["onnx", "fake", "openvino", "tensorrt", "triton"]
    assert fake.precisions == ("fp32", "fp16") and formats.artifact_name("fake", "fp16") == "fake/model_fp16.onnx"
    ckpt, out = tmp_path / "m.safetensors", tmp_path / "out"
    targets, skipped = pipeline._parse_targets(ExportOptions(ckpt, out, formats=("fake", "onnx")), has_calib=False)
    assert targets == [("onnx", "fp32"), ("onnx", "fp16"), ("fake", "fp32"), ("fake", "fp16")]
    assert ("onnx", "int8", "needs calibration images (--calib)") in skipped
    targets, _ = pipeline._parse_targets(ExportOptions(ckpt, out, precisions=("fp32",)), has_calib=False)
    assert ("fake", "fp32") in targets
    assert "fake" in pipeline._subfolders()


def test_an_unavailable_new_format_is_skipped_or_refused_with_its_reason(fake_format, tmp_path):
    fake_format('"needs the fake runtime"')
    ckpt, out = tmp_path / "m.safetensors", tmp_path / "out"
    _, skipped = pipeline._parse_targets(ExportOptions(ckpt, out), has_calib=True)
    assert ("fake", "fp32", "needs the fake runtime") in skipped
    with pytest.raises(ResUNetError, match="--format fake: needs the fake runtime"):
        pipeline._parse_targets(ExportOptions(ckpt, out, formats=("fake",)), has_calib=True)
    with pytest.raises(ResUNetError, match=r"unknown format 'coreml' \(choose from onnx, fake, openvino, tensorrt, triton\)"):
        pipeline._parse_targets(ExportOptions(ckpt, out, formats=("coreml",)), has_calib=True)


def test_run_export_runs_a_new_format_step(fake_format, tmp_path):
    """The pipeline verifies and reports a registered format's artifacts like the built-in ones: its
    step gets the run, verifies through the registry's backend, and the report lists the file."""
    fake_format()
    torch.manual_seed(0)
    config = ModelConfig(filters=(4, 8, 8, 16), bridge=16, se_reduction=4)
    ckpt = save_checkpoint(Checkpoint(config, ResUNetPlusPlus(config).eval().state_dict(), Preprocessing(size=(32, 32)),
                                      ["blob"], {}), tmp_path / "m.safetensors")
    out = tmp_path / "out"
    report = pipeline.run_export(ExportOptions(ckpt, out, formats=("fake",), precisions=("fp32",)))
    fake_module = sys.modules["resunetpp.export.fake_format"]
    assert fake_module.CALLS == [["fp32"]]
    (art,) = report.artifacts
    assert (art.format, art.precision, art.written) == ("fake", "fp32", True)
    assert art.gate["passed"] and art.metrics["abs_error_max"] <= 1e-4  # the FP32 ONNX, on ONNX Runtime
    files = [out / "fake" / "model.onnx", out / "fake" / "model.txt"]
    assert art.size_bytes == sum(f.stat().st_size for f in files)  # the artifact and its companion
    listed = json.loads((out / "export_report.json").read_text())["artifacts"]
    assert [(a["format"], a["path"]) for a in listed] == [("fake", str(files[0]))]
    assert not (out / "model_fp32.onnx").exists()  # the FP32 ONNX was built as the source, not written


def test_help_names_come_from_the_format_modules_without_importing_them():
    """``--help`` lists ``declared_names()`` (module names, nothing imported); the registry must agree."""
    assert set(formats.declared_names()) == set(formats.format_names())
