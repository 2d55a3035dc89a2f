"""The Triton model repository (resunetpp.export.triton_format) and the docs' Triton client.

A real export of a small trained model (ONNX FP32/FP16/INT8, OpenVINO FP32/FP16/INT8) is packaged;
every ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` schema (tritonclient's
``model_config_pb2``). No Triton server runs here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fitted_checkpoint, make_dataset
from resunetpp import engines
from resunetpp.artifact import sidecar_path, write_sidecar
from resunetpp.checkpoint import Checkpoint, save_checkpoint
from resunetpp.data import SegmentationDataset
from resunetpp.errors import ResUNetError
from resunetpp.export.triton_format import (
    TensorSpec,
    TritonOptions,
    artifacts_from_export,
    model_config,
    model_config_schema,
    parse_config,
    write_triton_repository,
)
from resunetpp.imageio import read_image
from resunetpp.model import ModelConfig, ResUNetPlusPlus
from resunetpp.preprocess import Preprocessing, probs_to_mask

pytest.importorskip("tritonclient")
REPO = Path(__file__).resolve().parents[1]
SIZE = 32
EXPECTED = {("onnx", p) for p in ("fp32", "fp16", "int8")} | {("openvino", p) for p in ("fp32", "fp16", "int8")}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    pytest.importorskip("openvino")
    from resunetpp.export.pipeline import ExportOptions, run_export

    root = tmp_path_factory.mktemp("triton")
    data = make_dataset(root / "data", 18, 40, splits={"train": list(range(12)), "val": list(range(12, 18))})
    ckpt = fitted_checkpoint(data, root / "tiny.safetensors")
    report = run_export(ExportOptions(ckpt, root / "export", formats=("onnx", "openvino"), calib=data))
    assert {(a.format, a.precision) for a in report.artifacts if a.written} == EXPECTED
    return root / "export"


@pytest.fixture(scope="module")
def repository(export_dir: Path) -> tuple[Path, list]:
    out = export_dir.parent / "triton"
    return out, write_triton_repository(artifacts_from_export(export_dir), out)


# ---- the repository of a real export --------------------------------------------------------------------
@pytest.mark.slow
def test_every_config_parses_with_tritons_schema_and_sets_the_fields(repository) -> None:
    out, models = repository
    schema = model_config_schema()
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md"] + [m.name for m in models])
    assert {(m.format, m.precision) for m in models} == EXPECTED
    for m in models:
        text = (out / m.name / "config.pbtxt").read_text()
        config = parse_config(text)
        assert config.name == m.name == f"resunetpp_{m.format}_{m.precision}" == (out / m.name).name
        if m.format == "onnx":
            assert (config.platform, config.backend) == ("onnxruntime_onnx", "")
        else:
            assert (config.platform, config.backend) == ("", "openvino")
        assert config.max_batch_size == 8
        (inp,), (outp,) = config.input, config.output
        assert (inp.name, inp.data_type, list(inp.dims)) == ("images", schema.TYPE_FP32, [3, -1, -1])
        assert (outp.name, outp.data_type, list(outp.dims)) == ("probs", schema.TYPE_FP32, [1, -1, -1])
        assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 100
        (group,) = config.instance_group
        assert (group.count, group.kind) == (1, schema.ModelInstanceGroup.KIND_CPU)


@pytest.mark.slow
def test_models_are_copies_of_the_verified_artifacts_with_their_records(repository, export_dir: Path) -> None:
    out, models = repository
    for m in models:
        version = out / m.name / "1"
        if m.format == "onnx":
            assert sorted(p.name for p in version.iterdir()) == ["model.onnx"]
            assert (version / "model.onnx").read_bytes() == m.source.read_bytes()
        else:
            assert sorted(p.name for p in version.iterdir()) == ["model.bin", "model.xml"]
            assert (version / "model.xml").read_bytes() == m.source.read_bytes()
            assert (version / "model.bin").read_bytes() == m.source.with_suffix(".bin").read_bytes()
        record = json.loads((out / m.name / "resunetpp.json").read_text())
        assert record == json.loads(sidecar_path(m.source).read_text())
        assert record["artifact"]["accuracy"]["gate"]["passed"]
    # the copies run as the originals: the ONNX FP32 model through the toolkit's engine
    onnx_model = out / "resunetpp_onnx_fp32" / "1" / "model.onnx"
    x = np.random.default_rng(0).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    record = json.loads((out / "resunetpp_onnx_fp32" / "resunetpp.json").read_text())
    with engines.open(onnx_model, record=record) as copy, engines.open(export_dir / "model_fp32.onnx") as original:
        np.testing.assert_array_equal(copy.infer(x), original.infer(x))


@pytest.mark.slow
def test_readme_keeps_preprocessing_with_the_client(repository) -> None:
    out, models = repository
    text = (out / "README.md").read_text()
    assert "Preprocessing stays with the client" in text
    for needle in ("[0.485, 0.456, 0.406]", "[0.229, 0.224, 0.225]", "32x32", "resunetpp.json", "polyp",
                   "No Triton server loaded this repository", "`model_config_pb2` of tritonclient"):
        assert needle in text, needle
    for m in models:
        assert f"`{m.name}`" in text
    assert text.count("| passed: ") == len(models)


@pytest.mark.slow
def test_rewriting_replaces_the_whole_repository(repository, export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"
    write_triton_repository(artifacts_from_export(export_dir), out)
    (out / "stale_model").mkdir()
    models = write_triton_repository([export_dir / "model_fp32.onnx"], out, TritonOptions(prefix="seg"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "seg_onnx_fp32"]
    assert [m.name for m in models] == ["seg_onnx_fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["triton"]  # no staging or old folder left


# ---- configs without an export ---------------------------------------------------------------------------
def _record(fmt: str, precision: str, **artifact) -> dict:
    return {"preprocessing": Preprocessing(size=(SIZE, SIZE)).to_dict(), "class_names": ["polyp"],
            "model": {"num_classes": 1}, "activation": "sigmoid",
            "artifact": {"format": fmt, "precision": precision, "file": f"model_{precision}.engine",
                         "input_shape": ["batch", 3, "height", "width"],
                         "output_shape": ["batch", 1, "height", "width"], **artifact}}


def test_tensorrt_plan_is_packaged_for_the_gpu_with_its_profile_bounding_the_batch(tmp_path: Path) -> None:
    plan = tmp_path / "tensorrt" / "model_fp16.engine"
    plan.parent.mkdir()
    plan.write_bytes(b"not a real plan: TensorRT cannot build one here")
    profile = {"min": [1, 3, 32, 32], "opt": [1, 3, 256, 256], "max": [4, 3, 512, 512]}
    write_sidecar(plan, _record("tensorrt", "fp16", tensorrt={"profile": profile}))
    (model,) = write_triton_repository([plan], tmp_path / "triton", TritonOptions(preferred_batch_sizes=(2, 4)))
    assert model.name == "resunetpp_tensorrt_fp16"
    assert (tmp_path / "triton" / model.name / "1" / "model.plan").read_bytes() == plan.read_bytes()
    config = parse_config(model.config)
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 4)  # min(8, the profile's 4)
    assert list(config.input[0].dims) == [3, -1, -1] and list(config.output[0].dims) == [1, -1, -1]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.instance_group[0].kind == model_config_schema().ModelInstanceGroup.KIND_GPU


def test_static_batch_gets_full_dims_and_no_dynamic_batcher() -> None:
    io = (TensorSpec("images", "TYPE_FP32", (1, 3, 256, 256)), TensorSpec("probs", "TYPE_FP32", (1, 2, 256, 256)))
    config = parse_config(model_config("m", "onnx", _record("onnx", "fp32"), io,
                                       TritonOptions(onnx_device="gpu", instances=2)))
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 3, 256, 256] and list(config.output[0].dims) == [1, 2, 256, 256]
    assert not config.HasField("dynamic_batching")
    group = config.instance_group[0]
    assert (group.count, group.kind) == (2, model_config_schema().ModelInstanceGroup.KIND_GPU)


def test_openvino_performance_hint_is_a_backend_parameter() -> None:
    io = (TensorSpec("images", "TYPE_FP32", (-1, 3, -1, -1)), TensorSpec("probs", "TYPE_FP32", (-1, 1, -1, -1)))
    config = parse_config(model_config("m", "openvino", _record("openvino", "int8"), io,
                                       TritonOptions(openvino_hint="THROUGHPUT")))
    assert config.parameters["PERFORMANCE_HINT"].string_value == "THROUGHPUT"


def test_parse_config_refuses_what_tritons_schema_refuses() -> None:
    good = 'name: "m" platform: "onnxruntime_onnx" max_batch_size: 8'
    assert parse_config(good).max_batch_size == 8
    for bad in (good + " max_batchsize: 4", good + ' input [{ name: "x" data_type: TYPE_FLOAT32 }]',
                good + " max_batch_size: many"):
        with pytest.raises(ResUNetError, match="not a valid Triton model config"):
            parse_config(bad)


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ResUNetError, match="no artifacts"):
        write_triton_repository([], tmp_path / "t")
    with pytest.raises(ResUNetError, match="prefix"):
        write_triton_repository([tmp_path / "x.onnx"], tmp_path / "t", TritonOptions(prefix="bad name"))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    write_sidecar(ckpt, _record("torch", "fp32"))
    with pytest.raises(ResUNetError, match="a Triton model is made from onnx, openvino, tensorrt artifacts"):
        write_triton_repository([ckpt], tmp_path / "t")
    a, b = tmp_path / "a" / "model_fp16.engine", tmp_path / "b" / "model_fp16.engine"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"plan")
        write_sidecar(p, _record("tensorrt", "fp16"))
    with pytest.raises(ResUNetError, match="a second tensorrt fp16 artifact"):
        write_triton_repository([a, b], tmp_path / "t")
    with pytest.raises(ResUNetError, match="no export report"):
        artifacts_from_export(tmp_path)
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.*"))


# ---- the client in docs/triton.md --------------------------------------------------------------------------
def _docs_client() -> dict:
    text = (REPO / "docs" / "triton.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    namespace: dict = {"__name__": "triton_client_from_docs"}
    exec(compile(blocks[0], "docs/triton.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_docs_client_pre_and_postprocessing_match_the_toolkit(tmp_path: Path, mode: str) -> None:
    client = _docs_client()
    pre = Preprocessing(size=(SIZE, SIZE), mode=mode)
    rng = np.random.default_rng(1)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(path)
    x, size = client["preprocess"](path, pre.to_dict())
    expected = pre.apply(read_image(path))
    assert size == (45, 70) and x.dtype == np.float32 and x.shape == (1, *expected.shape)
    np.testing.assert_array_equal(x[0], expected)
    # probabilities of a smooth blob at the network's size -> the toolkit's mask at the image's size
    hh, ww = expected.shape[1:]
    yy, xx = np.mgrid[:hh, :ww]
    probs = (1 / (1 + np.exp(((yy - hh / 2) ** 2 + (xx - ww / 3) ** 2) / (0.1 * hh * ww) - 1)))[None].astype(np.float32)
    mask = client["postprocess"](probs, size, pre.to_dict())
    reference = probs_to_mask(pre.restore(probs, *size)) * 255
    assert mask.shape == reference.shape == size
    agree = 2 * np.logical_and(mask, reference).sum() / (np.count_nonzero(mask) + np.count_nonzero(reference))
    assert agree >= 0.999, agree


def test_docs_client_builds_its_triton_request() -> None:
    pytest.importorskip("tritonclient.http")
    client = _docs_client()
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    (images,), (probs,) = client["request"](x)
    assert (images.name(), images.shape(), images.datatype()) == ("images", [2, 3, SIZE, SIZE], "FP32")
    assert probs.name() == "probs"


# ---- resunetpp export --format triton: the registered packaging format ---------------------------------------
@pytest.mark.slow
def test_export_format_triton_packages_what_the_same_export_verified(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from resunetpp.cli import app
    from resunetpp.export.formats import export_formats

    fmt = next(f for f in export_formats() if f.name == "triton")
    assert not fmt.default and fmt.order > max(f.order for f in export_formats() if f.name != "triton")
    data = make_dataset(tmp_path / "data", 8, 40, splits={"train": list(range(4)), "val": list(range(4, 8))})
    ckpt = fitted_checkpoint(data, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    runner = CliRunner()
    fast = ["--static-size", "--batch", "1", "--no-simplify", "-p", "fp32", "--eval", str(data)]
    done = runner.invoke(app, ["export", str(ckpt), "--out", str(out), "-f", "onnx", "-f", "triton", *fast])
    assert done.exit_code == 0, done.output
    report = json.loads((out / "export_report.json").read_text())
    rows = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    assert set(rows) == {("onnx", "fp32"), ("triton", "fp32")}
    assert rows["triton", "fp32"]["gate"]["models"] == ["resunetpp_onnx_fp32"]
    model = out / "triton" / "resunetpp_onnx_fp32"
    config = parse_config((model / "config.pbtxt").read_text())
    assert config.name == "resunetpp_onnx_fp32" and config.platform == "onnxruntime_onnx"
    assert (model / "1" / "model.onnx").read_bytes() == (out / "model_fp32.onnx").read_bytes()
    # opt-in: a default export writes no repository; triton alone has nothing to package
    done = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "plain"), "-f", "onnx", *fast])
    assert done.exit_code == 0 and not (tmp_path / "plain" / "triton").exists()
    done = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "alone"), "-f", "triton", *fast])
    assert done.exit_code == 1 and "nothing to export: triton fp32: packages the artifacts built in the same export" \
        in done.output
