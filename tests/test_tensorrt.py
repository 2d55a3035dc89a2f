"""TensorRT: build plans, profiles and trtexec lines (plain Python, run everywhere); the build
flow against a stand-in ``tensorrt`` module; and real engine builds where TensorRT and a GPU exist
(skipped elsewhere, with the reason)."""

from __future__ import annotations

import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from resunetpp.export import tensorrt_format as trtx
from resunetpp.export.onnx_graph import ShapeSpec
from resunetpp.errors import ResUNetError

TRT_OK, TRT_INFO = trtx.tensorrt_status()
SPEC = ShapeSpec(3, 1, (256, 256))


# ---- plans ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["11.0.0", "11.4.1"])
def test_tensorrt_11_is_strongly_typed_from_the_precision_onnx(version):
    for precision, source in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8_qdq")):
        plan = trtx.plan_build(version, precision)
        assert (plan.source, plan.strongly_typed, plan.flags, plan.calibrator) == (source, True, (), None)
    with pytest.raises(ResUNetError, match="no INT8 calibrators"):
        trtx.plan_build(version, "int8", calibrator="entropy")
    with pytest.raises(ResUNetError, match="no FP16 builder flag"):
        trtx.plan_build(version, "fp16", fp16_mode="flag")


def test_tensorrt_10_paths():
    p = trtx.plan_build("10.3.0", "fp32")
    assert (p.source, p.strongly_typed, p.flags) == ("fp32", False, ())
    p = trtx.plan_build("10.3.0", "fp16")
    assert (p.source, p.strongly_typed, p.flags) == ("fp16", True, ())
    p = trtx.plan_build("10.3.0", "fp16", fp16_mode="flag")
    assert (p.source, p.strongly_typed, p.flags) == ("fp32", False, ("FP16",))
    p = trtx.plan_build("10.3.0", "int8")
    assert (p.source, p.strongly_typed, p.flags, p.calibrator) == ("int8_qdq", True, (), None)
    p = trtx.plan_build("10.3.0", "int8", calibrator="entropy")
    assert (p.source, p.strongly_typed, p.flags, p.calibrator) == ("fp32", False, ("INT8",), "entropy")
    p = trtx.plan_build("10.3.0", "fp16", dla_core=0)
    assert (p.source, p.flags, p.dla_core) == ("fp32", ("FP16", "GPU_FALLBACK"), 0)
    p = trtx.plan_build("10.3.0", "int8", dla_core=1)
    assert (p.source, p.strongly_typed, p.flags) == ("int8_qdq", False, ("INT8", "FP16", "GPU_FALLBACK"))
    with pytest.raises(ResUNetError, match="DLA cores run FP16 and INT8 only"):
        trtx.plan_build("10.3.0", "fp32", dla_core=0)
    with pytest.raises(ResUNetError, match="too old"):
        trtx.plan_build("8.6.1", "fp16")
    with pytest.raises(ResUNetError, match="precision"):
        trtx.plan_build("10.3.0", "int4")


def test_profile_shapes():
    p = trtx.profile_shapes(SPEC)
    assert p.as_dict() == {"min": [1, 3, 128, 128], "opt": [1, 3, 256, 256], "max": [8, 3, 512, 512]}
    assert not p.static
    p = trtx.profile_shapes(ShapeSpec(3, 1, (256, 320), batch=4, dynamic_size=False))
    assert p.static and p.opt == (4, 3, 256, 320)
    p = trtx.profile_shapes(ShapeSpec(1, 2, (40, 56)), max_batch=2, opt_batch=2)
    assert (p.min, p.opt, p.max) == ((1, 1, 24, 32), (2, 1, 40, 56), (2, 1, 80, 112))
    with pytest.raises(ResUNetError):
        trtx.profile_shapes(SPEC, max_batch=2, opt_batch=4)
    with pytest.raises(ResUNetError, match="outside"):
        trtx.profile_shapes(SPEC, min_size=(300, 300))


def test_trtexec_command_lines():
    shapes = trtx.profile_shapes(SPEC)
    line = trtx.trtexec_command(trtx.plan_build("10.3.0", "fp16"), "model_fp16.onnx", "e.engine", shapes,
                                timing_cache="t.cache")
    args = shlex.split(line)
    assert args[:3] == ["trtexec", "--onnx=model_fp16.onnx", "--saveEngine=e.engine"]
    assert "--minShapes=images:1x3x128x128" in args and "--optShapes=images:1x3x256x256" in args
    assert "--maxShapes=images:8x3x512x512" in args and "--stronglyTyped" in args
    assert "--memPoolSize=workspace:2048M" in args and "--timingCacheFile=t.cache" in args
    assert "--fp16" not in args
    line11 = trtx.trtexec_command(trtx.plan_build("11.1.0", "int8"), "q.onnx", "e.engine", shapes)
    assert "--stronglyTyped" not in line11 and "--int8" not in line11
    legacy = shlex.split(trtx.trtexec_command(trtx.plan_build("10.3.0", "int8", calibrator="entropy"), "m.onnx",
                                              "e.engine", shapes, calibration_cache="calib cache.bin"))
    assert "--int8" in legacy and "--calib=calib cache.bin" in legacy
    dla = shlex.split(trtx.trtexec_command(trtx.plan_build("10.3.0", "fp16", dla_core=1), "m.onnx", "e.engine",
                                           trtx.profile_shapes(ShapeSpec(3, 1, (256, 256), 1, False))))
    assert {"--fp16", "--useDLACore=1", "--allowGPUFallback", "--shapes=images:1x3x256x256"} <= set(dla)


# ---- the build flow against a stand-in tensorrt module ---------------------------------------------------
class _Enum:
    def __init__(self, *names: str) -> None:
        for i, n in enumerate(names):
            setattr(self, n, i)


def _fake_tensorrt(parse_ok: bool = True) -> tuple[types.ModuleType, dict]:
    """Only the TensorRT 10 Python API names build_engine uses; records every call."""
    calls: dict = {"flags": [], "shapes": [], "pools": {}}

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return "Unsupported operator FooBar"

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls["shapes"].append((name, tuple(mn), tuple(opt), tuple(mx)))

    class Cache:
        def serialize(self):
            return b"timing"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["pools"][pool] = size

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile):
            calls["profiles"] = calls.get("profiles", 0) + 1

        def create_timing_cache(self, data):
            calls["timing_in"] = data
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["ignore_mismatch"] = ignore_mismatch

    class Builder:
        num_DLA_cores = 2

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return object()

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"serialized-engine"

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.NetworkDefinitionCreationFlag = _Enum("EXPLICIT_BATCH", "STRONGLY_TYPED")
    trt.MemoryPoolType = _Enum("WORKSPACE", "DLA_MANAGED_SRAM")
    trt.BuilderFlag = _Enum("FP16", "INT8", "GPU_FALLBACK")
    trt.DeviceType = _Enum("GPU", "DLA")
    return trt, calls


def test_build_engine_flow(tmp_path, monkeypatch):
    trt, calls = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trtx, "gpu_info", lambda device=None: {"name": "Orin", "compute_capability": "8.7"})
    shapes = trtx.profile_shapes(SPEC)
    cache = tmp_path / "timing.cache"
    plan = trtx.plan_build("10.3.0", "int8", dla_core=1)
    facts = trtx.build_engine(plan, "model_int8_qdq.onnx", tmp_path / "e.engine", shapes, workspace_mib=512,
                              timing_cache=cache)
    assert (tmp_path / "e.engine").read_bytes() == b"serialized-engine"
    assert cache.read_bytes() == b"timing" and calls["timing_in"] == b"" and calls["ignore_mismatch"] is False
    assert calls["parsed"] == "model_int8_qdq.onnx" and calls["network_flags"] == 0  # weak typing for DLA
    assert calls["flags"] == [trt.BuilderFlag.INT8, trt.BuilderFlag.FP16, trt.BuilderFlag.GPU_FALLBACK]
    assert calls["pools"] == {trt.MemoryPoolType.WORKSPACE: 512 << 20}
    assert calls["shapes"] == [("images", shapes.min, shapes.opt, shapes.max)]
    assert calls["config"].default_device_type == trt.DeviceType.DLA and calls["config"].DLA_core == 1
    assert facts["version"] == "10.3.0" and facts["gpu"]["compute_capability"] == "8.7"
    # strongly typed on TensorRT 10 sets the network flag
    trtx.build_engine(trtx.plan_build("10.3.0", "fp16"), "m.onnx", tmp_path / "f.engine", shapes)
    assert calls["network_flags"] == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    with pytest.raises(ResUNetError, match="this device has 2 DLA core"):
        trtx.build_engine(trtx.plan_build("10.3.0", "fp16", dla_core=5), "m.onnx", tmp_path / "g.engine", shapes)


def test_build_engine_reports_parser_errors(tmp_path, monkeypatch):
    trt, _ = _fake_tensorrt(parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ResUNetError, match="cannot parse the ONNX graph.*Unsupported operator FooBar"):
        trtx.build_engine(trtx.plan_build("10.3.0", "fp32"), "m.onnx", tmp_path / "e.engine",
                          trtx.profile_shapes(SPEC))
    assert not (tmp_path / "e.engine").exists()


# ---- real TensorRT ------------------------------------------------------------------------------------------
def _gpu_reason() -> str | None:
    if not TRT_OK:
        return TRT_INFO
    try:
        trtx.gpu_info()
    except Exception as e:  # no CUDA device or driver
        return f"TensorRT {TRT_INFO} imports but no CUDA device is usable ({e})"
    return None


def _run(path: Path, graph: Path, **artifact):
    """``path`` (a built engine, or an ONNX graph) run through :mod:`resunetpp.engines` as export
    verifies it, with the minimal record of its ONNX ``graph`` (plus ``artifact`` facts)."""
    from resunetpp import engines
    from resunetpp.export.metadata import graph_record

    record = graph_record(graph)
    record["artifact"].update(artifact)
    backend, device = ("onnxruntime", "cpu") if path.suffix == ".onnx" else ("tensorrt", "cuda")
    return engines.open(path, backend=backend, device=device, record=record).predict


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_matches_onnx_runtime(tmp_path, precision):
    import onnx
    import tensorrt as trt
    import torch

    from resunetpp.export.fp16 import build_fp16
    from resunetpp.export.onnx_graph import export_onnx
    from resunetpp.model import ModelConfig, ResUNetPlusPlus, WithActivation

    torch.manual_seed(0)
    spec = ShapeSpec(3, 1, (64, 64))
    model = export_onnx(WithActivation(ResUNetPlusPlus(ModelConfig(filters=(8, 8, 16, 16), bridge=16)).eval()), spec)
    if precision == "fp16":
        model = build_fp16(model).model
    src = tmp_path / f"{precision}.onnx"
    onnx.save_model(model, str(src))
    shapes = trtx.profile_shapes(spec, max_batch=4)
    plan = trtx.plan_build(trt.__version__, precision)
    facts = trtx.build_engine(plan, src, tmp_path / "e.engine", shapes, timing_cache=tmp_path / "timing.cache")
    assert facts["gpu"]["name"] and (tmp_path / "timing.cache").stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 96)).astype(np.float32)
    got = _run(tmp_path / "e.engine", src, tensorrt=facts)(x)
    tol = 1e-3 if precision == "fp32" else 1e-2  # TF32 convolutions by default on Ampere+
    assert np.abs(got - _run(src, src)(x)).max() < tol


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_real_int8_engine_from_qdq(tmp_path):
    import onnx
    import tensorrt as trt
    import torch

    from resunetpp.export.onnx_graph import export_onnx
    from resunetpp.export.quantize import QDQRecipe, calibrate_ranges, quantize_qdq
    from resunetpp.model import ModelConfig, ResUNetPlusPlus, WithActivation

    torch.manual_seed(0)
    spec = ShapeSpec(3, 1, (64, 64))
    fp32 = tmp_path / "fp32.onnx"
    onnx.save_model(export_onnx(WithActivation(ResUNetPlusPlus(ModelConfig(filters=(8, 8, 16, 16), bridge=16)).eval()),
                                spec), str(fp32))
    rng = np.random.default_rng(0)
    cache = calibrate_ranges(fp32, [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(8)],
                             tmp_path / "ranges.json")
    q = quantize_qdq(fp32, cache, tmp_path / "q.onnx", QDQRecipe())
    plan = trtx.plan_build(trt.__version__, "int8")
    facts = trtx.build_engine(plan, q.path, tmp_path / "e.engine", trtx.profile_shapes(spec, max_batch=2))
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = _run(tmp_path / "e.engine", q.path, tensorrt=facts)(x)
    assert np.isfinite(got).all() and np.abs(got - _run(q.path, q.path)(x)).mean() < 0.05


def test_skip_reason_is_stated():
    """Where TensorRT is missing, the reason names the package (what the skip and the CLI print)."""
    if TRT_OK:
        pytest.skip(f"TensorRT {TRT_INFO} is importable here")
    assert "tensorrt" in TRT_INFO and "not importable" in TRT_INFO
    assert Path(trtx.__file__).is_file()
