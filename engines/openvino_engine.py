"""OpenVINO engine: an IR (``.xml`` + ``.bin``, or an ``.onnx`` read directly) on CPU, GPU or NPU.

``device``: ``cpu``, ``gpu``, ``gpu.N``, ``npu`` or ``auto`` (OpenVINO's AUTO plugin when
several devices exist, else CPU). NPUs need static shapes: the model is reshaped to
``(batch or 1, C, *preprocessing.size)`` there unless ``shape`` is given.

Options: ``performance_hint`` (``latency``, default, or ``throughput`` /
``cumulative_throughput``), ``precision`` (the ``INFERENCE_PRECISION_HINT``: ``f32``, ``bf16`` or
``f16``; default ``f32`` for an fp32 artifact -- OpenVINO would otherwise run bf16 on CPUs with
AMX/AVX512-BF16 -- and the plugin's default for fp16/int8 artifacts), ``num_streams`` (int or
``auto``), ``threads`` (``INFERENCE_NUM_THREADS``), ``cache_dir`` (compiled-model cache),
``shape`` (reshape the input to a fixed ``(N, C, H, W)``; ``-1`` leaves a dimension dynamic).

:meth:`OpenVINOEngine.kernels` lists the kernels the plugin compiled (``brgconv_avx512_f32`` for an
FP32 convolution, ``..._bf16`` under the bf16 hint, ``ref_*`` for its slow reference kernels);
:meth:`~resunetpp.engines.base.Engine.describe` reports the convolutions' kernels and any reference kernel.

:meth:`OpenVINOEngine.infer` uses one compiled model and one infer request (sync);
:meth:`OpenVINOEngine.infer_async_many` runs many batches through an ``AsyncInferQueue``
for throughput.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from resunetpp.engines.base import BackendUnavailableError, Engine, EngineError
from resunetpp.engines.registry import BenchPrecision, BenchSpec, register_backend
from resunetpp.artifact import INPUT_NAME, OUTPUT_NAME
from resunetpp.errors import InputFileError

HINTS = ("latency", "throughput", "cumulative_throughput")
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}


def _ov():
    return importlib.import_module("openvino")


def execution_kernels(compiled) -> list[tuple[str, str]]:
    """``(layer type, kernel)`` of every node of a compiled model's execution graph, e.g.
    ``("Convolution", "brgconv_avx512_f32")`` or ``("Concat", "ref_f32")``."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        out.append((info["layerType"].astype(str), info["primitiveType"].astype(str)))
    return out


def devices() -> list[str]:
    """The devices OpenVINO sees (``CPU``, ``GPU.0`` ...)."""
    return list(_ov().Core().available_devices)


def cpu_properties() -> dict | None:
    """OpenVINO's name for the CPU and its default inference precision (bf16 on bf16 CPUs), or
    ``None`` when OpenVINO is absent or broken (property reads only: nothing is compiled)."""
    try:
        core = _ov().Core()
        hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
        return {"device": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
                "default_inference_precision": hint.to_string() if hasattr(hint, "to_string") else str(hint)}
    except Exception:  # noqa: BLE001 - absent or broken OpenVINO: recorded as null
        return None


def _check_onnx(path) -> None:
    """Parse an ``.onnx`` with ``onnx`` before OpenVINO reads it: OpenVINO tries every frontend on
    a file its ONNX frontend rejects, and its TensorFlow frontend logs parse errors to stderr."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and others
        raise InputFileError(path, f"not a valid ONNX model ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") \
            from None


def _check_ir(path) -> None:
    """An OpenVINO IR's ``.xml`` must be XML whose root is ``<net>`` (read before OpenVINO, for the
    reason :func:`_check_onnx` gives)."""
    import xml.etree.ElementTree as ET

    try:
        with open(path, "rb") as f:
            root = next((elem.tag for _, elem in ET.iterparse(f, events=("start",))), None)
    except (ET.ParseError, UnicodeDecodeError, ValueError):
        root = None
    if root != "net":
        raise InputFileError(path, "not an OpenVINO IR (expected an XML file whose root element is <net>)")


def _parse_count(name: str, value: Any) -> int | None:
    """A positive integer option (``threads=4``); ``None``/``0``: the runtime's default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EngineError(f"engine: openvino | {name} {value!r} | expected a positive integer")
    return value or None


def _parse_num_streams(value: Any) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineError(f"engine: openvino | num_streams {value!r} | expected a positive integer or auto")
    return value


def _parse_shape(value: Any) -> tuple[int, int, int, int] | None:
    """``shape``: four dimensions (``-1`` dynamic) as a sequence or text (``1,3,256,256``, ``1x3x256x256``)."""
    if value is None:
        return None
    parts = value
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").strip("()[] ").split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts) if not isinstance(parts, (int, float)) else ()
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 4 or any(isinstance(p, bool) or isinstance(p, float) for p in parts) \
            or any(d < -1 or d == 0 for d in dims):
        raise EngineError(f"engine: openvino | shape {value!r} | expected 4 dimensions N,C,H,W "
                          "(integers, -1 for a dynamic one), e.g. shape=1,3,256,256")
    return dims  # type: ignore[return-value]


@dataclass(frozen=True)
class CompiledConv:
    """A single convolution compiled by the CPU plugin (:func:`compile_conv`), ready to time."""

    #: The infer request's own call on one input (what is timed).
    infer: Callable[[np.ndarray], Any]
    input_shape: tuple[int, ...]
    #: The kernel the plugin picked for the convolution (``brgconv_avx512_f32``, ``jit_avx2_I8`` ...).
    kernel: str | None
    threads: int
    #: The precision the convolution computes in (its ``runtimePrecision``: ``f32``, ``bf16``, ``u8`` ...).
    runtime_precision: str | None = None


#: What :func:`compile_conv` accepts: ``INFERENCE_PRECISION_HINT`` values, and ``int8``.
CONV_PRECISIONS = ("f32", "bf16", "f16", "int8")
#: Runtime precisions of an integer convolution (u8 activations x i8 weights on x86).
INT8_RUNTIME_PRECISIONS = ("u8", "i8")


def _int8_conv_graph(ops, ov, x, weights: np.ndarray, pad: int):
    """``x`` quantized to u8 by a FakeQuantize (range [0, 4], as after a ReLU) convolved with int8
    weights dequantized per output channel (``Convert`` x scale) -- the form NNCF writes for the
    OpenVINO IR; the CPU plugin's low-precision transformations fold it into an integer convolution."""
    cout = weights.shape[0]
    scale = (np.abs(weights).reshape(cout, -1).max(axis=1) / 127.0).reshape(cout, 1, 1, 1).astype(np.float32)
    q = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
    lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(4.0))
    xq = ops.fake_quantize(x, lo, hi, lo, hi, 256)
    w = ops.multiply(ops.convert(ops.constant(q), ov.Type.f32), ops.constant(scale))
    return ops.convolution(xq, w, [1, 1], [pad, pad], [pad, pad], [1, 1])


def compile_conv(shape: tuple[int, int, int, int, int], precision: str = "f32",
                 threads: int | None = None) -> CompiledConv:
    """A ``(batch, channels in, channels out, side, kernel)`` 3x3-style 'same' convolution (fixed
    random weights) compiled on the CPU plugin with the LATENCY hint at ``precision`` and ``threads``
    (``None``: the plugin's default): the measuring stick of :mod:`resunetpp.bench.peak`.

    ``precision`` is an ``INFERENCE_PRECISION_HINT`` (``f32``, ``bf16``, ``f16``) or ``int8``: the
    input quantized to u8 and the weights to int8 as NNCF quantizes a model (:func:`_int8_conv_graph`),
    under the f32 hint. The result names the kernel the plugin picked and the precision it computes
    in, read from the compiled model's runtime info -- an INT8 convolution reads ``u8`` there
    (``jit_avx2_I8``, ``brgconv_avx512_core_vnni`` ...); one the plugin left in float does not."""
    ov = _ov()
    import openvino.opset13 as ops

    if precision not in CONV_PRECISIONS:
        raise EngineError(f"engine: openvino | peak convolution precision {precision!r} | expected one of "
                          f"{', '.join(CONV_PRECISIONS)}")
    n, cin, cout, side, k = shape
    x = ops.parameter([n, cin, side, side], ov.Type.f32, name="x")
    weights = np.random.default_rng(0).normal(0, 0.05, (cout, cin, k, k)).astype(np.float32)
    pad = k // 2
    if precision == "int8":
        y = _int8_conv_graph(ops, ov, x, weights, pad)
    else:
        y = ops.convolution(x, ops.constant(weights), [1, 1], [pad, pad], [pad, pad], [1, 1])
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(ov.Model([y], [x], "peak_conv"), "CPU", config)
    conv = next((info for info in _runtime_infos(compiled) if info["layerType"] == "Convolution"), {})
    request = compiled.create_infer_request()
    return CompiledConv(infer=lambda batch: request.infer({0: batch}),
                        input_shape=tuple(int(d) for d in compiled.input(0).get_shape()),
                        kernel=conv.get("primitiveType"),
                        threads=int(compiled.get_property("INFERENCE_NUM_THREADS")),
                        runtime_precision=conv.get("runtimePrecision"))


def _runtime_infos(compiled) -> list[dict[str, str]]:
    """``layerType``, ``primitiveType`` and ``runtimePrecision`` of every node of a compiled model's
    execution graph (absent keys left out)."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        out.append({key: info[key].astype(str) for key in ("layerType", "primitiveType", "runtimePrecision")
                    if key in info})
    return out


def _arithmetic(precision: str, device: str | None, details: dict) -> str | None:
    """An fp32 / bf16 / fp16 IR computes in its precision hint; an INT8 IR's convolutions run in
    int8 (the recipe keeps a few in float: 7.7% of the default model's FLOPs), read against the int8 peak."""
    if precision == "int8":
        return "int8"
    return {"f32": "f32", "bf16": "bf16"}.get(str(details.get("precision_hint")))


_BENCH = BenchSpec(
    precisions=(
        BenchPrecision("fp32", artifact=("openvino", "fp32"), options={"precision": "f32"}),
        BenchPrecision("bf16", artifact=("openvino", "fp32"), options={"precision": "bf16"}, cpu_bf16=True),
        BenchPrecision("fp16", artifact=("openvino", "fp16")),  # fp16 / int8 IR: the plugin's default hint
        BenchPrecision("int8", artifact=("openvino", "int8"), requires=(
            ("nncf", "the OpenVINO INT8 IR is quantized with NNCF, which is not installed (pip install nncf)"),)),
    ),
    device=lambda requested: "cpu", threads_option="threads", throughput_options={"performance_hint": "throughput"},
    arithmetic=_arithmetic, color="tab:purple")


@register_backend(suffixes=(".xml", ".onnx"), default_for=(".xml",), runtime="openvino",
                  install_hint="pip install openvino", devices=devices, order=20, bench=_BENCH)
class OpenVINOEngine(Engine):
    """An OpenVINO model compiled for one device."""

    backend = "openvino"
    option_names = ("performance_hint", "precision", "num_streams", "threads", "cache_dir", "shape")

    def __init__(self, path, record: dict, *, device: str = "cpu", **options: Any) -> None:
        super().__init__(path, record, device=device, **options)
        hint = str(options.get("performance_hint") or "latency").lower()
        if hint not in HINTS:
            raise EngineError(f"engine: openvino | performance_hint {hint!r} | expected one of {', '.join(HINTS)}")
        self._hint = hint
        precision = options.get("precision")
        if precision is None and super().precision == "fp32":
            precision = "f32"
        elif precision is None:  # run the IR the way the export verified it (not the CPU's default: bf16 on bf16 CPUs)
            precision = ((record.get("artifact") or {}).get("openvino") or {}).get("verified_with_precision_hint")
        if precision is not None and str(precision).lower() not in PRECISIONS:
            raise EngineError(f"engine: openvino | precision {precision!r} | expected f32, bf16 or f16")
        self._precision_hint = PRECISIONS[str(precision).lower()] if precision is not None else None
        self._num_streams = _parse_num_streams(options.get("num_streams"))
        self._threads = _parse_count("threads", options.get("threads"))
        self._shape = _parse_shape(options.get("shape"))
        self._compiled = None
        self._request = None
        self._ov_device = ""
        self._output = None

    # ---- load ----------------------------------------------------------------------------------
    def _resolve_device(self, core) -> str:
        device = (self.device or "cpu").upper()
        available = list(core.available_devices)
        if device == "AUTO":
            return "CPU" if available == ["CPU"] else "AUTO"
        family = device.split(".", 1)[0]
        if not any(d == device or d.split(".", 1)[0] == family for d in available):
            raise BackendUnavailableError(f"engine: openvino | device {self.device} | not available "
                                          f"(OpenVINO sees {', '.join(available) or 'no device'})")
        return device

    def _config(self) -> dict:
        ov = _ov()
        import openvino.properties as props
        import openvino.properties.hint as hints
        import openvino.properties.streams as streams

        config: dict = {hints.performance_mode: getattr(hints.PerformanceMode, self._hint.upper())}
        if self._precision_hint is not None:
            config[hints.inference_precision] = getattr(ov.Type, self._precision_hint)
        if self._num_streams is not None:
            config[streams.num] = streams.Num.AUTO if self._num_streams == "auto" else self._num_streams
        if self._threads:
            config[props.inference_num_threads] = self._threads
        if self.options.get("cache_dir"):
            config[props.cache_dir] = str(self.options["cache_dir"])
        return config

    def _reshape(self, model, device: str) -> None:
        ov = _ov()
        shape = self._shape
        if shape is None and device.startswith("NPU") and model.input(0).get_partial_shape().is_dynamic:
            pre = self.preprocessing
            size = pre.size if pre.mode == "resize" else None
            if size is None:
                raise EngineError("engine: openvino | device NPU needs static shapes | pass shape=(N, C, H, W) "
                                  "or export with resize preprocessing")
            shape = (self.input_shape_constraints.batch or 1, pre.channels, *size)
        if shape is not None:
            try:
                model.reshape({model.input(0).get_any_name(): ov.PartialShape([int(d) for d in shape])})
            except RuntimeError as e:
                raise EngineError(f"engine: openvino | reshape to {tuple(shape)} | {str(e).splitlines()[0][:160]}") from None

    def _load_impl(self) -> None:
        ov = _ov()
        core = ov.Core()
        device = self._resolve_device(core)
        weights = self.path.with_suffix(".bin")
        if self.path.suffix.lower() == ".xml" and not weights.is_file():
            raise InputFileError(self.path, f"its weights file {weights.name} is missing (an OpenVINO IR is "
                                            "the .xml and the .bin beside it)")
        suffixes = [x.lower() for x in self.path.suffixes]
        if suffixes[-1:] == [".onnx"] or suffixes[-2:] == [".onnx", ".partial"]:  # also a staged ONNX
            _check_onnx(self.path)
        elif suffixes[-1:] == [".xml"] or suffixes[-2:] == [".xml", ".partial"]:
            _check_ir(self.path)
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
            reason = (lines[-1] if lines else type(e).__name__)[:200]
            raise EngineError(f"{self.path}: OpenVINO cannot read the model ({reason})") from None
        if len(model.inputs) != 1:
            raise EngineError(f"{self.path}: expected one model input 'images', found {len(model.inputs)}")
        names = [sorted(o.get_names()) for o in model.outputs]
        if INPUT_NAME not in model.input(0).get_names() or not any(OUTPUT_NAME in n for n in names):
            raise EngineError(f"{self.path}: not a resunetpp graph (input {sorted(model.input(0).get_names())}, "
                              f"outputs {names}; expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r})")
        self._reshape(model, device)
        pshape = model.input(0).get_partial_shape()
        self._refine_constraints([d.get_length() if d.is_static else None for d in pshape])
        try:
            compiled = core.compile_model(model, device, self._config())
        except RuntimeError as e:
            raise EngineError(f"engine: openvino | compiling for {device} failed | "
                              f"{str(e).strip().splitlines()[0][:200]}") from None
        outputs = compiled.outputs
        self._output = next(o for o in outputs if OUTPUT_NAME in o.get_names())
        self._compiled, self._ov_device = compiled, device
        self._request = compiled.create_infer_request()

    # ---- run -----------------------------------------------------------------------------------
    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        x = batch if batch.flags.c_contiguous else np.ascontiguousarray(batch)
        result = self._request.infer({0: x}, share_inputs=True, share_outputs=False)
        return result[self._output]

    def infer_async_many(self, batches: Iterable[np.ndarray], jobs: int = 0) -> list[np.ndarray]:
        """Run every batch through an ``AsyncInferQueue`` of ``jobs`` requests (0: the device's
        optimal number); returns the outputs in input order, each checked like :meth:`infer`."""
        ov = _ov()
        self.load()
        inputs = [b if b.flags.c_contiguous else np.ascontiguousarray(b) for b in batches]
        for b in inputs:
            self.check_input(b)
        results: list[np.ndarray | None] = [None] * len(inputs)
        queue = ov.AsyncInferQueue(self._compiled, int(jobs))
        output = self._output

        def done(request, index: int) -> None:
            results[index] = np.array(request.get_tensor(output).data, copy=True)

        queue.set_callback(done)
        for i, b in enumerate(inputs):  # ``inputs`` keeps every array alive until wait_all
            queue.start_async({0: b}, i, share_inputs=True)
        queue.wait_all()
        return [self.check_output(r, b.shape) for r, b in zip(results, inputs)]

    def optimal_requests(self) -> int:
        """The device's optimal number of parallel infer requests (loads the engine; at least 1)."""
        self.load()
        try:
            return max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        except Exception:  # noqa: BLE001 - older plugins: let OpenVINO choose
            return 1

    def kernels(self) -> list[tuple[str, str]]:
        """``(layer type, kernel)`` of each node the plugin compiled (loads the engine);
        see :func:`execution_kernels`."""
        self.load()
        return execution_kernels(self._compiled)

    def _runtime_call_impl(self):
        request = self._request
        return lambda x: request.infer({0: x}, share_inputs=True)

    def _close_impl(self) -> None:
        self._request = None
        self._compiled = None

    def _details(self) -> dict:
        details = {"ov_device": self._ov_device, "performance_hint": self._hint,
                   "precision_hint": self._precision_hint, "openvino": _ov().__version__.split("-")[0]}
        if self._compiled is not None:
            import openvino.properties.hint as hints

            try:
                details["precision_hint"] = self._compiled.get_property(hints.inference_precision).get_type_name()
            except RuntimeError:
                pass
            kernels = execution_kernels(self._compiled)
            details["conv_kernels"] = dict(Counter(k for layer, k in kernels if layer == "Convolution"))
            details["reference_kernels"] = dict(Counter(f"{layer} {k}" for layer, k in kernels if k.startswith("ref")))
        return details
