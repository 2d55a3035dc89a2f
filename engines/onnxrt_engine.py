"""ONNX Runtime engine: an ``.onnx`` artifact on the CPU, CUDA or TensorRT execution provider.

``device``: ``cpu``; ``cuda`` / ``cuda:N`` (CUDA EP, CPU fallback for unsupported nodes);
``tensorrt`` / ``tensorrt:N`` (TensorRT EP, then CUDA, then CPU); ``auto`` (CUDA when the
installed ONNX Runtime has it, else CPU). ORT silently falls back to CPU when a GPU provider
fails to initialise; this engine checks the providers the session really got and refuses instead.

Options: ``providers`` (an explicit ORT provider list or comma-separated names, overriding ``device``),
``graph_optimization_level`` (``disable``, ``basic``, ``extended``, ``layout`` or ``all``, the
default), ``intra_op_num_threads`` / ``inter_op_num_threads`` (0: ORT's default),
``io_binding`` (bind the input and a CPU output buffer; default on for GPU providers, where it
saves a copy; plain ``run`` on CPU), ``log_severity_level`` (ORT's 0-4, default 3: errors).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from resunetpp.engines.base import BackendUnavailableError, Engine, EngineError
from resunetpp.engines.registry import BenchPrecision, BenchSpec, register_backend
from resunetpp.artifact import INPUT_NAME, OUTPUT_NAME

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _ort():
    return importlib.import_module("onnxruntime")


def _device_index(device: str) -> int:
    try:
        return int(device.split(":", 1)[1]) if ":" in device else 0
    except ValueError:
        raise EngineError(f"engine: onnxruntime | device {device!r} | expected cpu, cuda[:N], tensorrt[:N] or auto") from None


def providers_for(device: str, available: list[str], precision: str = "fp32") -> list:
    """The ORT provider list for ``device`` (refuses a provider this ORT build lacks)."""
    device = (device or "cpu").lower()
    if device == "auto":
        device = "cuda" if CUDA in available else "cpu"
    if device == "cpu":
        return [CPU]
    kind = device.split(":", 1)[0]
    index = _device_index(device)
    if kind == "cuda":
        chain = [(CUDA, {"device_id": index})]
    elif kind == "tensorrt":
        trt_options = {"device_id": index, "trt_fp16_enable": precision in ("fp16", "mixed")}
        chain = [(TENSORRT, trt_options), (CUDA, {"device_id": index})]
    else:
        raise EngineError(f"engine: onnxruntime | device {device!r} | expected cpu, cuda[:N], tensorrt[:N] or auto")
    first = chain[0][0]
    if first not in available:
        raise BackendUnavailableError(
            f"engine: onnxruntime | device {device} | {first} is not in this onnxruntime build "
            f"(available: {', '.join(available)}; install onnxruntime-gpu for CUDA/TensorRT)")
    return [p for p in chain if p[0] in available] + [CPU]


def cpu_session(model: Any, log_severity_level: int = 3):
    """A bare ``onnxruntime.InferenceSession`` on the CPU provider over a path, serialized bytes or a
    ``ModelProto``, ORT's default optimizations. For tools that read what an engine does not give:
    the FP16 export's range probe runs a copy of the graph with every intermediate tensor made an
    output. To run an artifact, open it as an engine (:func:`resunetpp.engines.open`)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = int(log_severity_level)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=[CPU])


def devices() -> list[str]:
    """The execution providers this onnxruntime build offers."""
    return list(_ort().get_available_providers())


def _arithmetic(precision: str, device: str | None, details: dict) -> str | None:
    """fp32 on the CPU provider runs f32 convolutions; fp16 casts around kernels the CPU lacks."""
    providers = details.get("providers") or []
    return "f32" if precision == "fp32" and providers[:1] == [CPU] else None


_BENCH = BenchSpec(
    precisions=tuple(BenchPrecision(p, artifact=("onnx", p)) for p in ("fp32", "fp16", "int8")),
    threads_option="intra_op_num_threads", arithmetic=_arithmetic, color="tab:blue")


@register_backend(suffixes=(".onnx",), default_for=(".onnx",), runtime="onnxruntime",
                  distributions=("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
                  install_hint="pip install onnxruntime (or onnxruntime-gpu)", devices=devices, order=10,
                  bench=_BENCH)
class OnnxRuntimeEngine(Engine):
    """An ONNX model in an ``onnxruntime.InferenceSession``."""

    backend = "onnxruntime"
    option_names = ("providers", "graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads",
                    "io_binding", "log_severity_level")

    def __init__(self, path, record: dict, *, device: str = "cpu", **options: Any) -> None:
        super().__init__(path, record, device=device, **options)
        level = str(options.get("graph_optimization_level") or "all").lower()
        if level not in OPT_LEVELS:
            raise EngineError(f"engine: onnxruntime | graph_optimization_level {level!r} | expected one of "
                              f"{', '.join(OPT_LEVELS)}")
        self._level = level
        self._session = None
        self._binding = None
        self._input_name = self._output_name = ""
        self._input_dtype: type = np.float32
        self._providers: list[str] = []

    def _session_options(self):
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[self._level])
        so.intra_op_num_threads = int(self.options.get("intra_op_num_threads") or 0)
        so.inter_op_num_threads = int(self.options.get("inter_op_num_threads") or 0)
        so.log_severity_level = int(self.options.get("log_severity_level", 3))
        return so

    def _load_impl(self) -> None:
        ort = _ort()
        providers = self.options.get("providers") or providers_for(self.device, ort.get_available_providers(),
                                                                   self.precision)
        if isinstance(providers, str):  # from the command line: "TensorrtExecutionProvider,CPUExecutionProvider"
            providers = [p.strip() for p in providers.split(",") if p.strip()]
        wanted = [p[0] if isinstance(p, tuple) else p for p in providers]
        try:
            session = ort.InferenceSession(str(self.path), sess_options=self._session_options(), providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types (Fail, InvalidGraph ...)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise EngineError(f"{self.path}: onnxruntime cannot load the model ({first})") from None
        active = session.get_providers()
        if wanted and wanted[0] not in active:
            raise BackendUnavailableError(f"engine: onnxruntime | device {self.device} | {wanted[0]} failed to "
                                          f"initialise (session runs on {', '.join(active)})")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise EngineError(f"{self.path}: expected one graph input 'images', found {[i.name for i in inputs]}")
        inp = inputs[0]
        out = next((o for o in outputs if o.name == OUTPUT_NAME), None)
        if inp.name != INPUT_NAME or out is None:
            raise EngineError(f"{self.path}: not a resunetpp graph (input {inp.name!r}, outputs "
                              f"{[o.name for o in outputs]}; expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r})")
        if inp.type not in _NUMPY_TYPES:
            raise EngineError(f"{self.path}: graph input {inp.name!r} is {inp.type}, expected a float tensor")
        self._refine_constraints(inp.shape)
        self._session, self._providers = session, active
        self._input_name, self._output_name = inp.name, out.name
        self._input_dtype = _NUMPY_TYPES[inp.type]
        use_binding = self.options.get("io_binding")
        if use_binding is None:
            use_binding = active[0] != CPU
        self._binding = session.io_binding() if use_binding else None

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        x = batch if batch.flags.c_contiguous else np.ascontiguousarray(batch)
        if self._input_dtype is not np.float32:
            x = x.astype(self._input_dtype)
        if self._binding is None:
            return self._session.run([self._output_name], {self._input_name: x})[0]
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input(self._input_name, x)
        b.bind_output(self._output_name, "cpu")
        self._session.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()[0]

    def _runtime_call_impl(self):
        if self._binding is not None:
            return None  # with I/O binding the hook is the runtime call (bind, run, copy out)
        session, feed, fetch = self._session, self._input_name, [self._output_name]
        return lambda x: session.run(fetch, {feed: x})

    def _close_impl(self) -> None:
        self._binding = None
        self._session = None

    def _details(self) -> dict:
        return {"providers": list(self._providers), "graph_optimization_level": self._level,
                "onnxruntime": _ort().__version__}
