"""TensorRT engine: a serialized ``.engine`` / ``.plan`` run with ``execute_async_v3`` (TensorRT 10+).

An engine only loads on the TensorRT version that built it (unless built version-compatible)
and on a GPU of the same compute capability (unless built with a hardware-compatibility level).
The export records both in the sidecar; :func:`check_compatibility` compares them with this
machine before deserializing and refuses with a message saying what to rebuild, instead of
TensorRT's generic deserialization failure.

``device``: ``cuda`` / ``cuda:N`` (``auto`` and ``cpu`` are not accepted: TensorRT needs a GPU).
Options: ``buffers`` -- ``auto`` (torch CUDA tensors when torch sees the GPU, else cuda-python),
``torch`` or ``cuda-python``; ``profile`` -- the optimization profile index (default 0).

The input shape of each batch is set on the execution context (it must lie inside the
profile's min/max; :attr:`input_shape_constraints` reports the bounds after ``load()``);
device buffers grow to the largest batch seen and are reused.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp.engines.base import BackendUnavailableError, Engine, EngineError, EngineInputError
from resunetpp.engines.registry import BenchPrecision, BenchSpec, register_backend
from resunetpp.errors import InputFileError

#: ``hardware_compatibility`` levels and the lowest compute capability each runs on.
HARDWARE_LEVELS = {"ampere_plus": (8, 0), "ampere+": (8, 0), "same_compute_capability": None}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])


def _cc_tuple(cc: str | tuple | list) -> tuple[int, int]:
    if isinstance(cc, (tuple, list)):
        return int(cc[0]), int(cc[1])
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


class MalformedBuildRecord(ValueError):
    """A sidecar field about the TensorRT build that is not what it should be (see :func:`recorded_build`)."""


def _mapping(value: object, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedBuildRecord(f"field {field}: expected a mapping, got {type(value).__name__}")
    return value


def _text(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedBuildRecord(f"field {field}: expected text, got {value!r}"[:200])
    return value


def recorded_build(record: dict) -> dict:
    """What the sidecar says about the build: TensorRT version, GPU, compatibility flags.

    Read from ``artifact.tensorrt`` (``version``, ``gpu: {name, compute_capability}``,
    ``hardware_compatibility``, ``version_compatible``), falling back to ``artifact.gpu`` and
    ``artifact.tools.tensorrt``. A field of the wrong type raises :class:`MalformedBuildRecord`
    naming it.
    """
    art = _mapping(record.get("artifact") if isinstance(record, dict) else record, "artifact")
    build = _mapping(art.get("tensorrt") or art.get("build"), "artifact.tensorrt")
    gpu = _mapping(build.get("gpu") or art.get("gpu"), "artifact.tensorrt.gpu")
    tools = _mapping(art.get("tools"), "artifact.tools")
    cc = gpu.get("compute_capability")
    if cc is not None and not isinstance(cc, (str, list, tuple)) or isinstance(cc, bool):
        raise MalformedBuildRecord(f"field artifact.tensorrt.gpu.compute_capability: expected 'major.minor', got {cc!r}")
    flag = build.get("version_compatible", art.get("version_compatible"))
    if flag is not None and not isinstance(flag, bool):
        raise MalformedBuildRecord(f"field artifact.tensorrt.version_compatible: expected true or false, got {flag!r}")
    return {
        "version": _text(build.get("version") or tools.get("tensorrt"), "artifact.tensorrt.version"),
        "gpu_name": _text(gpu.get("name"), "artifact.tensorrt.gpu.name"),
        "compute_capability": cc,
        "hardware_compatibility": _text(build.get("hardware_compatibility") or art.get("hardware_compatibility"),
                                        "artifact.tensorrt.hardware_compatibility"),
        "version_compatible": bool(flag),
    }


def check_compatibility(record: dict, runtime_version: str, compute_capability: str | tuple,
                        path: str | Path, gpu_name: str | None = None) -> None:
    """Refuse (:class:`~resunetpp.errors.InputFileError`) an engine built for another TensorRT or GPU.

    Facts the sidecar does not record are not checked (TensorRT's own check still applies); a
    malformed one (``compute_capability: "abc"``, ``gpu: 7``) is refused naming the field.
    """
    try:
        built = recorded_build(record)
        if built["compute_capability"]:
            b_cc = _cc_tuple(built["compute_capability"])
        if built["version"] and not _version_tuple(built["version"]):
            raise MalformedBuildRecord(f"field artifact.tensorrt.version: expected a version such as 10.3.0, "
                                       f"got {built['version']!r}")
    except MalformedBuildRecord as e:
        raise InputFileError(path, f"malformed TensorRT build record: {e}") from None
    except (TypeError, ValueError, IndexError):
        raise InputFileError(path, "malformed TensorRT build record: field artifact.tensorrt.gpu.compute_capability: "
                                   f"expected 'major.minor', got {built['compute_capability']!r}") from None
    if built["version"]:
        b, r = _version_tuple(built["version"]), _version_tuple(runtime_version)
        ok = (b[:1] == r[:1] and r >= b) if built["version_compatible"] else b == r
        if not ok:
            rule = ("a version-compatible engine needs the same major version, same or newer"
                    if built["version_compatible"] else "an engine only loads on the TensorRT that built it")
            raise InputFileError(path, f"engine built with TensorRT {built['version']}, this machine has "
                                       f"TensorRT {runtime_version} ({rule}); re-export it here")
    if built["compute_capability"]:
        r_cc = _cc_tuple(compute_capability)
        level = str(built["hardware_compatibility"] or "").lower() or None
        lowest = HARDWARE_LEVELS.get(level) if level else None
        ok = r_cc >= lowest if lowest else b_cc == r_cc
        if not ok:
            built_gpu = f" ({built['gpu_name']})" if built["gpu_name"] else ""
            this_gpu = f" ({gpu_name})" if gpu_name else ""
            need = f"compute capability {lowest[0]}.{lowest[1]}+" if lowest else "the same compute capability"
            raise InputFileError(path, f"engine built for a GPU of compute capability {b_cc[0]}.{b_cc[1]}{built_gpu}, "
                                       f"this GPU is {r_cc[0]}.{r_cc[1]}{this_gpu} (needs {need}); "
                                       "re-export it on this GPU")


def _device_index(device: str) -> int:
    device = (device or "cuda").lower()
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise EngineError(f"engine: tensorrt | device {device!r} | expected cuda or cuda:N (TensorRT runs on NVIDIA GPUs)")


def _cudart():
    return importlib.import_module("cuda.bindings.runtime")


def _check(result):
    """Unwrap a cuda-python ``(err, *values)`` result, raising :class:`EngineError` on failure."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise EngineError(f"engine: tensorrt | CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class CudaPythonBuffers:
    """Device input/output buffers and a stream through cuda-python; grown on demand, reused."""

    def __init__(self, device: int) -> None:
        cudart = _cudart()
        _check(cudart.cudaSetDevice(device))
        self.stream = _check(cudart.cudaStreamCreate())
        self._ptr: dict[str, int] = {}
        self._size: dict[str, int] = {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def address(self, name: str, nbytes: int) -> int:
        cudart = _cudart()
        if self._size.get(name, -1) < nbytes:
            if self._ptr.get(name):
                _check(cudart.cudaFree(self._ptr[name]))
            self._ptr[name] = int(_check(cudart.cudaMalloc(max(nbytes, 1))))
            self._size[name] = nbytes
        return self._ptr[name]

    def upload(self, name: str, array: np.ndarray) -> int:
        cudart = _cudart()
        ptr = self.address(name, array.nbytes)
        _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        return ptr

    def download(self, name: str, shape: tuple, dtype: type) -> np.ndarray:
        cudart = _cudart()
        out = np.empty(shape, dtype=dtype)
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._ptr[name], out.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        cudart = _cudart()
        for ptr in self._ptr.values():
            if ptr:
                cudart.cudaFree(ptr)
        self._ptr.clear()
        self._size.clear()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class _TorchBuffers:
    """Device buffers as torch CUDA tensors on a dedicated torch stream."""

    def __init__(self, device: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)
        self._tensors: dict[str, Any] = {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def address(self, name: str, nbytes: int) -> int:
        t = self._tensors.get(name)
        if t is None or t.numel() < nbytes:
            t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device=self.device)
            self._tensors[name] = t
        return int(t.data_ptr())

    def upload(self, name: str, array: np.ndarray) -> int:
        ptr = self.address(name, array.nbytes)
        src = self.torch.from_numpy(array.reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self.stream):
            self._tensors[name][: array.nbytes].copy_(src, non_blocking=False)
        return ptr

    def download(self, name: str, shape: tuple, dtype: type) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with self.torch.cuda.stream(self.stream):
            data = self._tensors[name][:nbytes].cpu()  # a blocking copy: waits for this stream
        return data.numpy().view(dtype).reshape(shape)

    def close(self) -> None:
        self._tensors.clear()
        self.torch.cuda.empty_cache()


def cuda_problem() -> str | None:
    """Why no CUDA device can run TensorRT here, or ``None``."""
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install cuda-python)"
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
    except Exception as e:  # noqa: BLE001 - a missing driver raises various errors
        return f"CUDA runtime unusable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA device (TensorRT engines run only on NVIDIA GPUs)"
    return None


def devices() -> list[str]:
    """``cuda`` when the TensorRT bindings import and torch sees a GPU."""
    import tensorrt  # noqa: F401 - importable bindings are the first requirement
    import torch

    return ["cuda"] if torch.cuda.is_available() else []


_BENCH = BenchSpec(
    precisions=tuple(BenchPrecision(p, artifact=("tensorrt", p)) for p in ("fp32", "fp16", "int8")),
    device=lambda requested: "cuda", color="tab:green")


@register_backend(suffixes=(".engine", ".plan"), default_for=(".engine", ".plan"), runtime="tensorrt",
                  distributions=("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
                  install_hint="pip install tensorrt cuda-python; needs an NVIDIA GPU and driver", devices=devices,
                  check=cuda_problem, default_device="cuda", order=30, bench=_BENCH)
class TensorRTEngine(Engine):
    """A deserialized TensorRT engine with one execution context."""

    backend = "tensorrt"
    option_names = ("buffers", "profile")

    def __init__(self, path, record: dict, *, device: str = "cuda", **options: Any) -> None:
        if (device or "").lower() in ("auto", ""):
            device = "cuda"
        super().__init__(path, record, device=device, **options)
        self._index = _device_index(self.device)
        self._buffer_kind = str(options.get("buffers") or "auto").lower()
        if self._buffer_kind not in ("auto", "torch", "cuda-python"):
            raise EngineError(f"engine: tensorrt | buffers {self._buffer_kind!r} | expected auto, torch or cuda-python")
        self._profile = int(options.get("profile") or 0)
        self._engine = self._context = self._buffers = None
        self._input = self._output = ""
        self._in_dtype: type = np.float32
        self._out_dtype: type = np.float32
        self._gpu: dict = {}

    def _make_buffers(self):
        kind = self._buffer_kind
        if kind == "auto":
            try:
                import torch

                kind = "torch" if torch.cuda.is_available() else "cuda-python"
            except ImportError:
                kind = "cuda-python"
        self._buffer_kind = kind
        return _TorchBuffers(self._index) if kind == "torch" else CudaPythonBuffers(self._index)

    def _current_gpu(self) -> dict:
        cudart = _cudart()
        prop = _check(cudart.cudaGetDeviceProperties(self._index))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return {"name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}

    def _load_impl(self) -> None:
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            raise BackendUnavailableError("engine: tensorrt | unavailable: tensorrt is not installed") from None
        count = _check(_cudart().cudaGetDeviceCount())
        if self._index >= count:
            raise BackendUnavailableError(f"engine: tensorrt | device {self.device} | {count} CUDA device(s) here")
        self._gpu = self._current_gpu()
        check_compatibility(self.record, trt.__version__, self._gpu["compute_capability"], self.path, self._gpu["name"])
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise InputFileError(self.path, f"TensorRT {trt.__version__} cannot deserialize this engine (built "
                                            "with another TensorRT or GPU, or not an engine file)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise EngineError(f"{self.path}: expected one input 'images' and an output 'probs', found {names}")
        self._input = inputs[0]
        self._output = "probs" if "probs" in outputs else outputs[0]
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input))).type
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output))).type
        if self._profile >= engine.num_optimization_profiles:
            raise EngineError(f"engine: tensorrt | profile {self._profile} | the engine has "
                              f"{engine.num_optimization_profiles} optimization profile(s)")
        lo, _opt, hi = engine.get_tensor_profile_shape(self._input, self._profile)
        dims = list(engine.get_tensor_shape(self._input))
        self._refine_constraints(dims, min_shape=tuple(int(d) for d in lo), max_shape=tuple(int(d) for d in hi))
        self._buffers = self._make_buffers()
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"engine: tensorrt | cannot create an execution context for {self.path.name} "
                              "(out of GPU memory?)")
        self._context.set_optimization_profile_async(self._profile, self._buffers.stream_handle)
        self._engine = engine

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        x = batch if batch.dtype == self._in_dtype else batch.astype(self._in_dtype)
        x = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        ctx, buffers = self._context, self._buffers
        if not ctx.set_input_shape(self._input, tuple(x.shape)):
            raise EngineInputError(f"engine: tensorrt | input {tuple(x.shape)} | outside the optimization profile "
                                   f"{self.input_shape_constraints.describe()}")
        out_shape = tuple(ctx.get_tensor_shape(self._output))
        out_bytes = int(np.prod(out_shape)) * np.dtype(self._out_dtype).itemsize
        ctx.set_tensor_address(self._input, buffers.upload("input", x))
        ctx.set_tensor_address(self._output, buffers.address("output", out_bytes))
        if not ctx.execute_async_v3(buffers.stream_handle):
            raise EngineError(f"engine: tensorrt | execute_async_v3 failed on input {tuple(x.shape)} "
                              "(see the TensorRT log above)")
        return buffers.download("output", out_shape, self._out_dtype)

    def _close_impl(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None

    def _details(self) -> dict:
        built = recorded_build(self.record)
        return {"gpu": self._gpu.get("name"), "compute_capability": self._gpu.get("compute_capability"),
                "built_with": built["version"], "buffers": self._buffer_kind}
