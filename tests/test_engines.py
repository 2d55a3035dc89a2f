"""Engines: one suite over every registered backend (torch, onnxruntime, openvino and tensorrt
today; those unavailable here skipped with their reason), against the torch engine as reference.

Artifacts are made by small helpers here (legacy ``torch.onnx.export`` + sidecar, OpenVINO
``convert_model``), following the contract of :mod:`resunetpp.artifact`. The tiny models get a
scaled head so that their probabilities spread over [0, 1] (a freshly initialised network
answers ~0.5 everywhere, which would make agreement tests weak).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resunetpp import engines
from resunetpp.engines.base import Engine, EngineInputError, NonFiniteOutputError
from resunetpp.engines.tensorrt_engine import check_compatibility, recorded_build
from resunetpp.artifact import read_record, write_sidecar
from resunetpp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.imageio import read_image
from resunetpp.model import ModelConfig, ResUNetPlusPlus, WithActivation
from resunetpp.preprocess import Preprocessing

TINY = ModelConfig(filters=(8, 8, 16, 16), bridge=16)
#: Every registered backend: the suite runs over the registry, not a hand-kept list.
BACKENDS = engines.BACKENDS
#: Absolute tolerance on probabilities against the torch engine, per backend (all fp32 here);
#: a backend not named here is held to 1e-3.
ATOL = {"torch": 0.0, "onnxruntime": 1e-4, "openvino": 1e-4, "tensorrt": 1e-3}
#: Options that make each backend compute in fp32 (OpenVINO would pick bf16 on AMX/AVX512-BF16 CPUs).
FP32_OPTIONS = {"openvino": {"precision": "f32"}}


# ---- artifact helpers (shared with test_infer.py) -------------------------------------------------------
def make_checkpoint(path: Path, *, num_classes: int = 1, mode: str = "resize", size: int = 32,
                    in_channels: int = 3, seed: int = 0, logit_std: float = 3.0,
                    nan: bool = False) -> Path:
    """A tiny random model whose scaled head gives probabilities across [0, 1]."""
    torch.manual_seed(seed)
    config = ModelConfig(in_channels=in_channels, num_classes=num_classes, filters=TINY.filters, bridge=TINY.bridge)
    model = ResUNetPlusPlus(config).eval()
    with torch.no_grad():  # centre and stretch the logits: mean 0, std ``logit_std`` on noise input
        logits = model(torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(seed)))
        mean, std = logits.mean(dim=(0, 2, 3)), logits.std(dim=(0, 2, 3)).clamp_min(1e-6)
        model.head.weight.mul_((logit_std / std)[:, None, None, None])
        model.head.bias.sub_(mean).mul_(logit_std / std)
        if nan:
            model.head.bias.fill_(float("nan"))
    mean, std = ((0.5,), (0.25,)) if in_channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pre = Preprocessing(size=(size, size), mode=mode, mean=mean, std=std, channels=in_channels)
    names = ["polyp"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)]
    return save_checkpoint(Checkpoint(config, model.state_dict(), pre, names, {"test": True}), path)


def export_onnx(checkpoint: Path, path: Path, *, static_shape: tuple[int, int, int, int] | None = None) -> Path:
    """``images`` -> ``probs`` ONNX (dynamic batch/H/W unless ``static_shape``) with its sidecar."""
    ckpt = load_checkpoint(checkpoint)
    module = WithActivation(ckpt.build_model()).eval()
    example = torch.zeros(static_shape or (1, ckpt.config.in_channels, 32, 32))
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["probs"],
                          dynamic_axes=None if static_shape else {"images": axes, "probs": axes},
                          opset_version=17, dynamo=False)
    shape = list(static_shape) if static_shape else ["batch", ckpt.config.in_channels, "height", "width"]
    write_sidecar(path, {**ckpt.metadata(), "artifact": {"format": "onnx", "precision": "fp32", "input_shape": shape}})
    return path


def export_openvino(onnx_path: Path, path: Path) -> Path:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)  # an fp32 IR
    record = read_record(onnx_path)
    write_sidecar(path, {**record, "artifact": {**record["artifact"], "format": "openvino"}})
    return path


def build_tensorrt(onnx_path: Path, path: Path, max_batch: int = 4) -> Path:
    """An fp32 TensorRT engine with one profile (batch 1..max_batch, 16..128 px); needs a GPU."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path)), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    c = network.get_input(0).shape[1]
    profile.set_shape("images", (1, c, 16, 16), (1, c, 32, 32), (max_batch, c, 128, 128))
    config.add_optimization_profile(profile)
    path.write_bytes(bytes(builder.build_serialized_network(network, config)))
    record = read_record(onnx_path)
    from cuda.bindings import runtime as cudart

    prop = cudart.cudaGetDeviceProperties(0)[1]
    write_sidecar(path, {**record, "artifact": {**record["artifact"], "format": "tensorrt", "tensorrt": {
        "version": trt.__version__, "gpu": {"compute_capability": f"{prop.major}.{prop.minor}"}}}})
    return path


def make_artifacts(folder: Path, backends=BACKENDS, **checkpoint_kwargs) -> dict[str, Path]:
    """One model as checkpoint / ONNX / IR (/ engine): ``{backend: artifact}`` for those available."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(folder / "model.safetensors", **checkpoint_kwargs)
    found = {"torch": ckpt}
    available = engines.available_backends()
    if any(available[b] is None for b in ("onnxruntime", "openvino", "tensorrt") if b in backends):
        onnx = export_onnx(ckpt, folder / "model.onnx")
        if "onnxruntime" in backends and available["onnxruntime"] is None:
            found["onnxruntime"] = onnx
        if "openvino" in backends and available["openvino"] is None:
            found["openvino"] = export_openvino(onnx, folder / "model.xml")
        if "tensorrt" in backends and available["tensorrt"] is None:
            found["tensorrt"] = build_tensorrt(onnx, folder / "model.engine")
    return found


def require(backend: str, artifacts: dict[str, Path]) -> Path:
    reason = engines.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend} unavailable here: {reason}")
    if backend not in artifacts:
        pytest.skip(f"this suite makes no {backend} artifact (make_artifacts knows "
                    f"{', '.join(sorted(artifacts))}); the backend's own tests cover it")
    return artifacts[backend]


def open_engine(backend: str, artifacts: dict[str, Path], **options) -> Engine:
    device = "cuda" if backend == "tensorrt" else "cpu"
    return engines.open(require(backend, artifacts), backend=backend, device=device,
                        **{**FP32_OPTIONS.get(backend, {}), **options})


# ---- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> dict[str, Path]:
    return make_artifacts(tmp_path_factory.mktemp("binary"))


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory) -> dict[str, Path]:
    """Three classes, ``pad`` preprocessing (keeps the resolution)."""
    return make_artifacts(tmp_path_factory.mktemp("multi"), num_classes=3, mode="pad", seed=1)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> dict[str, Path]:
    return make_artifacts(tmp_path_factory.mktemp("nan"), nan=True)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def _batch(n: int = 2, h: int = 32, w: int = 48, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c, h, w)).astype(np.float32)


# ---- the suite over every backend ------------------------------------------------------------------------
def test_output_shape_and_range(backend: str, binary: dict) -> None:
    with open_engine(backend, binary) as engine:
        probs = engine.infer(_batch(2, 32, 48))
        assert engine.name == backend and engine.num_classes == 1 and engine.activation == "sigmoid"
        assert engine.class_names == ["polyp"] and engine.precision == "fp32"
    assert probs.shape == (2, 1, 32, 48) and probs.dtype == np.float32
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert probs.min() < 0.2 and probs.max() > 0.8  # the scaled head spreads the answers


@pytest.mark.parametrize("model", ["binary", "multiclass"])
def test_agrees_with_torch(backend: str, model: str, request) -> None:
    artifacts = request.getfixturevalue(model)
    x = _batch(3, 40, 56, seed=2)
    with engines.open(artifacts["torch"]) as reference:
        expected = reference.infer(x)
    with open_engine(backend, artifacts) as engine:
        got = engine.infer(x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= ATOL.get(backend, 1e-3)


def test_multiclass_softmax_sums_to_one(backend: str, multiclass: dict) -> None:
    with open_engine(backend, multiclass) as engine:
        assert engine.num_classes == 3 and engine.activation == "softmax"
        probs = engine.infer(_batch(2, 24, 40, seed=3))
    assert probs.shape == (2, 3, 24, 40)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert len(np.unique(probs.argmax(axis=1))) > 1  # not a constant answer


@pytest.mark.parametrize("model", ["binary", "multiclass"])
def test_odd_image_size_comes_back_at_its_size(backend: str, model: str, request, tmp_path: Path) -> None:
    artifacts = request.getfixturevalue(model)
    image = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    with open_engine(backend, artifacts) as engine:
        pre = engine.preprocessing
        x = pre.apply(image)
        assert x.shape[1] % 8 == 0 and x.shape[2] % 8 == 0
        probs = pre.restore(engine.infer(x[None])[0], 37, 53)
    assert probs.shape == (engine.num_classes, 37, 53)
    assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0


def test_grayscale_and_rgba_images(backend: str, binary: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (30, 44), dtype=np.uint8)
    rgb = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((30, 44), 255, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    with open_engine(backend, binary) as engine:
        pre = engine.preprocessing

        def run(img: np.ndarray) -> np.ndarray:
            return pre.restore(engine.infer(pre.apply(img)[None])[0], *img.shape[:2])

        from_gray = run(read_image(tmp_path / "gray.png", pre.channels))
        from_rgba = run(read_image(tmp_path / "rgba.png", pre.channels))
        np.testing.assert_allclose(from_gray, run(np.repeat(gray[:, :, None], 3, axis=2)), atol=1e-6)
        np.testing.assert_allclose(from_rgba, run(rgb), atol=1e-6)  # opaque alpha: the RGB image
    assert from_gray.shape == from_rgba.shape == (1, 30, 44)


def test_wrong_shape_and_dtype_are_refused(backend: str, binary: dict) -> None:
    expected = "expected (N, 3, H, W) float32 with H, W multiples of 8"
    with open_engine(backend, binary) as engine:
        cases = [
            (np.zeros((1, 3, 250, 256), np.float32), f"engine: {backend} | input (1, 3, 250, 256) float32 | {expected}"),
            (np.zeros((1, 1, 32, 32), np.float32), f"engine: {backend} | input (1, 1, 32, 32) float32 | {expected}"),
            (np.zeros((3, 32, 32), np.float32), f"engine: {backend} | input (3, 32, 32) float32 | {expected}"),
            (np.zeros((1, 3, 32, 32), np.float64), f"engine: {backend} | input (1, 3, 32, 32) float64 | {expected}"),
            (np.zeros((1, 3, 32, 32), np.uint8), f"engine: {backend} | input (1, 3, 32, 32) uint8 | {expected}"),
        ]
        for batch, message in cases:
            with pytest.raises(EngineInputError) as info:
                engine.infer(batch)
            assert str(info.value) == f"{engine.path}: {message}"  # engine errors start with the file (issue 20)
            assert isinstance(info.value, ValueError) and isinstance(info.value, ResUNetError)
        assert engine.infer(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 1, 32, 32)  # still usable


def test_non_finite_output_is_an_error(backend: str, nan_model: dict) -> None:
    with open_engine(backend, nan_model) as engine:
        with pytest.raises(NonFiniteOutputError, match=rf"engine: {backend} \| output has 2048 NaN/Inf value\(s\) "
                                                       r"of 2048 in batch image\(s\) \[0, 1\]"):
            engine.infer(_batch(2, 32, 32))


def test_close_and_reload(backend: str, binary: dict) -> None:
    engine = open_engine(backend, binary)
    assert not engine.loaded
    first = engine.infer(_batch(1))  # loads on first use
    assert engine.loaded
    engine.close()
    engine.close()  # idempotent
    assert not engine.loaded
    np.testing.assert_array_equal(engine.infer(_batch(1)), first)
    engine.close()


def test_runtime_call_is_the_bare_backend_call(backend: str, binary: dict) -> None:
    """What `bench` measures infer()'s overhead against: the runtime's own call, same answer."""
    x = _batch(1)
    with open_engine(backend, binary) as engine:
        call = engine.runtime_call()
        raw = call(x)
        want = engine.infer(x)
    if backend == "onnxruntime":
        assert isinstance(raw, list)  # InferenceSession.run's own result
        raw = raw[0]
    elif backend == "openvino":
        raw = raw[0]  # the infer request's OVDict
    elif backend == "torch":
        import torch

        assert isinstance(raw, torch.Tensor)
        raw = raw.float().cpu().numpy()
    np.testing.assert_allclose(np.asarray(raw), want, atol=1e-5)
    assert call != engine._infer_impl or backend == "tensorrt"


# ---- backend specifics ---------------------------------------------------------------------------------
class NaNEngine(Engine):
    """A backend that answers NaN for the second image: the base must refuse it."""

    backend = "nan-test"

    def _load_impl(self) -> None:
        pass

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        out = np.full((batch.shape[0], 1, *batch.shape[2:]), 0.5, np.float32)
        out[1, 0, 0, :3] = [np.nan, np.inf, -np.inf]
        return out

    def _close_impl(self) -> None:
        pass


def test_base_reports_which_images_are_not_finite(binary: dict) -> None:
    record = load_checkpoint(binary["torch"]).metadata()
    with NaNEngine("fake.bin", record) as engine:
        with pytest.raises(NonFiniteOutputError, match=r"output has 3 NaN/Inf value\(s\) of 3072 in batch image\(s\) \[1\]"):
            engine.infer(_batch(3, 32, 32))
        assert isinstance(NonFiniteOutputError("x"), FloatingPointError)


def test_static_export_fixed_batch_and_size(binary: dict, tmp_path: Path) -> None:
    onnx = export_onnx(binary["torch"], tmp_path / "static.onnx", static_shape=(2, 3, 32, 32))
    x = _batch(5, 32, 32, seed=6)
    with engines.open(binary["torch"]) as reference:
        expected = reference.infer(x)
    with engines.open(onnx) as engine:
        c = engine.input_shape_constraints
        assert (c.batch, c.size, c.max_batch) == (2, (32, 32), 2)
        with pytest.raises(EngineInputError, match=r"input \(1, 3, 32, 32\) float32 \| expected \(2, 3, 32, 32\) float32$"):
            engine.infer(x[:1])
        got = engine.predict(x)  # 5 images: chunks of 2, the last padded and cropped
    assert got.shape == (5, 1, 32, 32)
    assert np.abs(got - expected).max() < 1e-4


def test_torch_engine_options(binary: dict) -> None:
    x = _batch(2, 32, 40, seed=7)
    with engines.open(binary["torch"]) as plain:
        expected = plain.infer(x)
    with engines.open(binary["torch"], channels_last=True) as nhwc:
        np.testing.assert_allclose(nhwc.infer(x), expected, atol=1e-5)
    with engines.open(binary["torch"], dtype="bf16") as bf16:
        assert bf16.precision == "bf16"
        assert np.abs(bf16.infer(x) - expected).max() < 0.1  # bf16 keeps ~3 significant digits
    with pytest.raises(ResUNetError, match="fp16 autocast needs --device cuda"):
        engines.open(binary["torch"], dtype="fp16")
    with pytest.raises(ResUNetError, match="unknown option"):
        engines.open(binary["torch"], precision="f32")
    if not torch.cuda.is_available():
        with pytest.raises(ResUNetError, match="no CUDA device is available to torch"):
            engines.open(binary["torch"], device="cuda")


def test_torch_engine_runs_channels_last_on_the_cpu_by_default(binary: dict) -> None:
    """Issue 6: NHWC is oneDNN's faster FP32 path on the CPU; NCHW stays available and agrees."""
    x = _batch(2, 32, 40, seed=3)
    with engines.open(binary["torch"]) as default:
        assert default.channels_last and default.describe()["channels_last"] is True
        got = default.infer(x)
    with engines.open(binary["torch"], channels_last=False) as nchw:
        assert not nchw.channels_last
        np.testing.assert_allclose(got, nchw.infer(x), atol=1e-5)


def test_torch_engine_from_an_in_memory_checkpoint(binary: dict) -> None:
    ckpt = load_checkpoint(binary["torch"])
    x = _batch(1)
    with engines.open(ckpt) as from_memory, engines.open(binary["torch"]) as from_file:
        np.testing.assert_array_equal(from_memory.infer(x), from_file.infer(x))
        assert from_memory.record["artifact"]["source_sha256"] == ckpt.sha256


def test_onnxruntime_options(binary: dict) -> None:
    require("onnxruntime", binary)
    x = _batch(2, 32, 32, seed=8)
    with engines.open(binary["onnxruntime"]) as plain:
        expected = plain.infer(x)
        assert plain.describe()["providers"] == ["CPUExecutionProvider"]
    with engines.open(binary["onnxruntime"], io_binding=True, graph_optimization_level="basic",
                      intra_op_num_threads=1) as bound:
        np.testing.assert_allclose(bound.infer(x), expected, atol=1e-5)
        assert bound.describe()["graph_optimization_level"] == "basic"
    with pytest.raises(ResUNetError, match="graph_optimization_level 'fast'"):
        engines.open(binary["onnxruntime"], graph_optimization_level="fast")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ResUNetError, match="CUDAExecutionProvider is not in this onnxruntime build"):
            engines.open(binary["onnxruntime"], device="cuda").load()


def test_openvino_async_queue_and_hints(binary: dict) -> None:
    require("openvino", binary)
    batches = [_batch(n, 32, 32, seed=n) for n in (1, 2, 3)]
    with engines.open(binary["openvino"], performance_hint="throughput", precision="f32", num_streams=2) as engine:
        assert engine.describe()["precision_hint"] == "f32"
        outs = engine.infer_async_many(batches)
        for b, o in zip(batches, outs):
            np.testing.assert_allclose(o, engine.infer(b), atol=1e-6)
        with pytest.raises(EngineInputError):
            engine.infer_async_many([np.zeros((1, 3, 30, 32), np.float32)])
    with engines.open(binary["openvino"], shape=(1, 3, 32, 32)) as static:
        assert static.input_shape_constraints.size == (32, 32)
        assert static.predict(batches[2]).shape == (3, 1, 32, 32)
    with pytest.raises(ResUNetError, match="device npu"):
        engines.open(binary["openvino"], device="npu").load()


def test_openvino_precision_hint_reaches_the_convolution_kernels(binary: dict) -> None:
    """Issue 6: an fp32 artifact compiles f32 convolution kernels (OpenVINO's CPU default would be
    bf16 on bf16 CPUs), the bf16 hint bf16 ones, and no convolution falls back to a reference kernel."""
    require("openvino", binary)
    import openvino as ov

    with engines.open(binary["openvino"]) as fp32:
        convs = [k for layer, k in fp32.kernels() if layer == "Convolution"]
        details = fp32.describe()
    assert convs and all(k.endswith("_f32") and not k.startswith("ref") for k in convs), convs
    assert sum(details["conv_kernels"].values()) == len(convs)
    assert all(not k.startswith("Convolution") for k in details["reference_kernels"])
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with engines.open(binary["openvino"], precision="bf16") as bf16:
            convs = [k for layer, k in bf16.kernels() if layer == "Convolution"]
        assert convs and all(k.endswith("_bf16") for k in convs), convs


def test_openvino_runs_an_ir_with_the_hint_it_was_verified_with(binary: dict) -> None:
    """A reduced-precision IR runs with the hint its record says the export verified it with (not the
    CPU's default, which is bf16 on bf16 CPUs); no hint recorded: the CPU's default; an option wins;
    a hint the record cannot hold is refused naming the field."""
    require("openvino", binary)
    import copy

    from resunetpp.artifact import read_record

    base = read_record(binary["openvino"])
    base["artifact"]["precision"] = "fp16"

    def hint(verified, **options):
        rec = copy.deepcopy(base)
        rec["artifact"]["openvino"] = {} if verified is None else {"verified_with_precision_hint": verified}
        with engines.open(binary["openvino"], record=rec, **options) as engine:
            return engine.describe()["precision_hint"]

    assert hint("f32") == "f32" and hint("bf16") == "bf16"
    from resunetpp.engines.openvino_engine import cpu_properties

    assert hint(None) == cpu_properties()["default_inference_precision"]
    assert hint("f32", precision="bf16") == "bf16"
    with pytest.raises(InputFileError, match="artifact.openvino.verified_with_precision_hint"):
        hint("fast")


# ---- backend selection and metadata -----------------------------------------------------------------------
def test_open_picks_the_backend_from_the_suffix(binary: dict, tmp_path: Path) -> None:
    assert engines.backend_for("m.safetensors") == engines.backend_for("m.pt") == engines.backend_for("m.pth") == "torch"
    assert engines.backend_for("m.onnx") == "onnxruntime" and engines.backend_for("m.xml") == "openvino"
    assert engines.backend_for("m.engine") == engines.backend_for("m.plan") == "tensorrt"
    assert type(engines.open(binary["torch"])).__name__ == "TorchEngine"
    (tmp_path / "model.xyz").write_text("x")
    with pytest.raises(InputFileError, match="unsupported model file type '.xyz'"):
        engines.open(tmp_path / "model.xyz")
    with pytest.raises(InputFileError, match="model file not found"):
        engines.open(tmp_path / "absent.onnx")
    with pytest.raises(InputFileError, match="is a folder"):
        engines.open(tmp_path)
    with pytest.raises(InputFileError, match="the onnxruntime backend cannot run a .safetensors file"):
        engines.open(binary["torch"], backend="onnxruntime")
    with pytest.raises(ResUNetError, match="unknown backend 'tflite'"):
        engines.open(binary["torch"], backend="tflite")
    if "openvino" in binary:  # OpenVINO reads ONNX directly
        assert type(engines.open(binary["onnxruntime"], backend="openvino")).__name__ == "OpenVINOEngine"


def test_missing_or_broken_metadata(binary: dict, tmp_path: Path) -> None:
    require("onnxruntime", binary)
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(binary["onnxruntime"].read_bytes())  # no sidecar, no embedded record
    with pytest.raises(InputFileError, match="no resunetpp metadata"):
        engines.open(bare)
    (tmp_path / "bare.onnx.json").write_text('{"model": {}}')
    with pytest.raises(InputFileError, match="metadata record has no 'preprocessing'"):
        engines.open(bare)


def test_available_backends_and_lazy_imports() -> None:
    available = engines.available_backends()
    assert list(available) == list(BACKENDS) and available["torch"] is None
    assert {"torch", "onnxruntime", "openvino", "tensorrt"} <= set(BACKENDS)
    code = ("import sys\n"
            "from resunetpp import engines\n"
            "assert not [m for m in sys.modules if m.startswith('resunetpp.engines.') and m.endswith('_engine')]\n"
            "names = engines.backends()\n"  # discovery imports every engine module ...
            "import resunetpp.engines.torch_engine, resunetpp.engines.onnxrt_engine, resunetpp.engines.openvino_engine\n"
            "import resunetpp.engines.tensorrt_engine, torch\n"
            "engines.available_backends()\n"
            "heavy = [m for m in ('onnxruntime', 'openvino', 'tensorrt') if m in sys.modules]\n"
            "assert not heavy, heavy\n"  # ... but none of their runtimes
            "assert hasattr(torch, 'nn') and torch.__name__ == 'torch'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---- TensorRT: the parts that need no GPU ----------------------------------------------------------------
def _trt_record(**build) -> dict:
    return {"artifact": {"format": "tensorrt", "precision": "fp16", "tensorrt": build}}


def test_tensorrt_refuses_another_version_or_gpu() -> None:
    record = _trt_record(version="10.3.0.26", gpu={"name": "NVIDIA A10", "compute_capability": "8.6"})
    check_compatibility(record, "10.3.0", "8.6", "m.engine")  # same build: accepted
    with pytest.raises(InputFileError, match=r"m.engine: engine built with TensorRT 10.3.0.26, this machine has "
                                             r"TensorRT 10.8.0 .*re-export it here"):
        check_compatibility(record, "10.8.0", "8.6", "m.engine")
    with pytest.raises(InputFileError, match=r"compute capability 8.6 \(NVIDIA A10\), this GPU is 9.0 \(NVIDIA H100\)"):
        check_compatibility(record, "10.3.0", "9.0", "m.engine", "NVIDIA H100")
    portable = _trt_record(version="10.3.0", version_compatible=True, hardware_compatibility="ampere_plus",
                           gpu={"compute_capability": "8.6"})
    check_compatibility(portable, "10.8.0", "9.0", "m.engine")  # newer 10.x, Ampere or newer: accepted
    with pytest.raises(InputFileError, match="same major version"):
        check_compatibility(portable, "11.0.0", "9.0", "m.engine")
    with pytest.raises(InputFileError, match=r"needs compute capability 8.0\+"):
        check_compatibility(portable, "10.8.0", "7.5", "m.engine")
    check_compatibility({"artifact": {}}, "10.8.0", "9.0", "m.engine")  # nothing recorded: TensorRT decides
    assert recorded_build({"artifact": {"tools": {"tensorrt": "10.1"}, "gpu": {"compute_capability": "8.9"}}}) == {
        "version": "10.1", "gpu_name": None, "compute_capability": "8.9", "hardware_compatibility": None,
        "version_compatible": False}


def test_tensorrt_backend_selection_without_tensorrt(binary: dict, tmp_path: Path) -> None:
    engine_file = tmp_path / "model.engine"
    engine_file.write_bytes(b"not an engine")
    write_sidecar(engine_file, {**load_checkpoint(binary["torch"]).metadata(),
                                "artifact": {"format": "tensorrt", "precision": "fp16"}})
    reason = engines.available_backends()["tensorrt"]
    if reason is None:
        pytest.skip("TensorRT is usable here; the refusal path is not reachable")
    with pytest.raises(engines.BackendUnavailableError, match=r"engine: tensorrt \| unavailable: "):
        engines.open(engine_file)
    cls = engines.engine_class("tensorrt")
    with pytest.raises(ResUNetError, match="expected cuda or cuda:N"):
        cls.from_path(engine_file, device="cpu")
    engine = cls.from_path(engine_file, device="cuda:0")  # metadata only; the runtime loads lazily
    assert engine.precision == "fp16" and engine.num_classes == 1 and not engine.loaded


# ---- evaluate through every engine ----------------------------------------------------------------------
def test_evaluate_accepts_every_artifact(binary: dict, tmp_path: Path) -> None:
    from conftest import make_dataset

    from resunetpp.engines.evaluate import evaluate_path

    data = make_dataset(tmp_path / "blobs", 3, 40)
    reference = evaluate_path(binary["torch"], data, device="cpu").as_dict()
    for backend, artifact in binary.items():
        if backend in ("torch", "tensorrt"):
            continue
        with engines.open(artifact, device="cpu", **FP32_OPTIONS.get(backend, {})) as engine:
            assert (engine.name, engine.num_classes, engine.class_names) == (backend, 1, ["polyp"])
        if backend == "openvino":
            continue  # evaluate_path passes no backend options; bf16 CPUs may differ slightly
        result = evaluate_path(artifact, data, device="cpu").as_dict()
        for key in ("dice", "iou", "precision", "recall"):
            assert result[key] == pytest.approx(reference[key], abs=1e-3)
