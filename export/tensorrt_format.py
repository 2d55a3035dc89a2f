"""TensorRT engines from the exported ONNX graphs: the plan in plain Python, the build kept thin.

Everything up to the TensorRT calls -- which ONNX to build from, strong typing or precision
flags, the optimization profile, workspace, timing and calibration cache paths, the equivalent
``trtexec`` command line -- is decided by :func:`plan_build`, :func:`profile_shapes` and
:func:`trtexec_command`, which need no TensorRT and are tested everywhere. :func:`build_engine` and
the entropy calibrator import ``tensorrt`` and ``cuda-python`` lazily and follow the TensorRT
10.x / 11.x Python API. A built engine is run (verified) as a :mod:`resunetpp.engines` TensorRT
engine, like any other artifact.

Build paths, by detected version (:func:`plan_build`):

* **TensorRT >= 11** is always strongly typed: there are no precision flags and no calibrators.
  FP32 builds from ``model_fp32.onnx``, FP16 from ``model_fp16.onnx`` (this toolkit's FP16 graph
  with overflow-prone nodes kept FP32, the role ModelOpt AutoCast plays), INT8 from the Q/DQ
  ONNX (explicit quantization).
* **TensorRT 10.x**: the same strongly typed builds by default (``STRONGLY_TYPED`` network flag,
  ``trtexec --stronglyTyped``), and on request the legacy paths: ``fp16_mode="flag"`` (FP32 ONNX
  + ``BuilderFlag.FP16``, TensorRT picks per layer) and ``calibrator="entropy"`` (FP32 ONNX +
  ``BuilderFlag.INT8`` + ``IInt8EntropyCalibrator2`` with a calibration cache file). DLA builds
  on 10.x use the flag paths (DLA takes FP16/INT8 only, with GPU fallback).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from resunetpp.export.onnx_format import ShapeSpec
from resunetpp.artifact import INPUT_NAME
from resunetpp.atomic import write_bytes_atomic
from resunetpp.errors import ResUNetError
from resunetpp.model import SIZE_MULTIPLE

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MIB = 2048
DEFAULT_MAX_BATCH = 8
CALIBRATORS = ("entropy",)
FP16_MODES = ("onnx", "flag")
MIN_MAJOR = 10


def tensorrt_status() -> tuple[bool, str]:
    """``(True, version)`` when ``tensorrt`` imports, else ``(False, reason)``."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return False, f"the tensorrt Python package is not importable ({type(e).__name__}: {e})"
    return True, str(trt.__version__)


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ResUNetError(f"cannot read the TensorRT version {version!r}") from None


# ---- profile --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile for the input ``images``: min / opt / max (N, C, H, W)."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def as_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


def _round8(v: float) -> int:
    return max(SIZE_MULTIPLE, int(-(-v // SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def profile_shapes(spec: ShapeSpec, *, max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int = 1,
                   min_size: tuple[int, int] | None = None, max_size: tuple[int, int] | None = None) -> ProfileShapes:
    """Profile from the export geometry: batch 1..``max_batch`` (opt ``opt_batch``) when dynamic;
    height/width ``size/2 .. 2*size`` (multiples of 8, opt = ``size``) when dynamic."""
    c = spec.channels
    h, w = spec.size
    if spec.batch is None:
        if not 1 <= opt_batch <= max_batch:
            raise ResUNetError(f"TensorRT profile: need 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
        b = (1, opt_batch, max_batch)
    else:
        b = (spec.batch,) * 3
    if spec.dynamic_size:
        lo = min_size or (_round8(h / 2), _round8(w / 2))
        hi = max_size or (2 * h, 2 * w)
        if not (lo[0] <= h <= hi[0] and lo[1] <= w <= hi[1]):
            raise ResUNetError(f"TensorRT profile: size {h}x{w} is outside {lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}")
        hs, ws = (lo[0], h, hi[0]), (lo[1], w, hi[1])
    else:
        hs, ws = (h,) * 3, (w,) * 3
    return ProfileShapes(*((b[i], c, hs[i], ws[i]) for i in range(3)))


# ---- plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built: from which ONNX, strongly typed or with which builder flags."""

    precision: str
    source: str  # "fp32" | "fp16" | "int8_qdq": which exported ONNX the engine is parsed from
    strongly_typed: bool
    flags: tuple[str, ...]
    calibrator: str | None
    dla_core: int | None
    trt_version: str
    description: str

    def as_dict(self) -> dict:
        return asdict(self)


def plan_build(trt_version: str, precision: str, *, calibrator: str | None = None, fp16_mode: str = "onnx",
               dla_core: int | None = None) -> BuildPlan:
    """Choose the build path for ``precision`` on TensorRT ``trt_version`` (see module docstring)."""
    if precision not in PRECISIONS:
        raise ResUNetError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if calibrator is not None and calibrator not in CALIBRATORS:
        raise ResUNetError(f"TensorRT calibrator must be one of {', '.join(CALIBRATORS)}, got {calibrator!r}")
    if fp16_mode not in FP16_MODES:
        raise ResUNetError(f"TensorRT FP16 mode must be one of {', '.join(FP16_MODES)}, got {fp16_mode!r}")
    major = trt_major(trt_version)
    if major < MIN_MAJOR:
        raise ResUNetError(f"TensorRT {trt_version} is too old: {MIN_MAJOR}.x or newer is needed")
    if dla_core is not None and precision == "fp32":
        raise ResUNetError("DLA cores run FP16 and INT8 only: use --precision fp16 or int8 with --dla-core")
    dla = ("GPU_FALLBACK",) if dla_core is not None else ()
    mk = lambda src, typed, flags, cal, why: BuildPlan(precision, src, typed, tuple(flags) + dla, cal,  # noqa: E731
                                                      dla_core, str(trt_version), why)
    if major >= 11:
        if calibrator:
            raise ResUNetError(f"TensorRT {trt_version} has no INT8 calibrators (removed in 11): INT8 engines "
                               "build from the Q/DQ ONNX; drop --calibrator")
        if fp16_mode == "flag":
            raise ResUNetError(f"TensorRT {trt_version} has no FP16 builder flag (removed in 11): FP16 engines "
                               "build from the FP16 ONNX")
        src = {"fp32": "fp32", "fp16": "fp16", "int8": "int8_qdq"}[precision]
        return mk(src, True, (), None, f"TensorRT {major}: strongly typed network from the {src} ONNX")
    if precision == "fp32":
        return mk("fp32", False, (), None, "TensorRT 10: FP32 network, no precision flags")
    if precision == "fp16":
        if fp16_mode == "flag" or dla_core is not None:
            return mk("fp32", False, ("FP16",), None, "TensorRT 10: FP32 ONNX with BuilderFlag.FP16 (weak typing)")
        return mk("fp16", True, (), None, "TensorRT 10: strongly typed network from the FP16 ONNX")
    if calibrator == "entropy":
        return mk("fp32", False, ("INT8",), "entropy",
                  "TensorRT 10: implicit INT8 with IInt8EntropyCalibrator2 and a calibration cache (legacy)")
    if dla_core is not None:
        return mk("int8_qdq", False, ("INT8", "FP16"), None,
                  "TensorRT 10: Q/DQ ONNX with BuilderFlag.INT8 + FP16 (weak typing, for DLA)")
    return mk("int8_qdq", True, (), None, "TensorRT 10: strongly typed network from the Q/DQ ONNX (explicit INT8)")


def _shape_arg(shape: Sequence[int]) -> str:
    return f"{INPUT_NAME}:" + "x".join(str(int(d)) for d in shape)


def trtexec_command(plan: BuildPlan, onnx_path: str | Path, engine_path: str | Path, shapes: ProfileShapes, *,
                    workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: str | Path | None = None,
                    calibration_cache: str | Path | None = None) -> str:
    """The ``trtexec`` line that builds the same engine (for reproducing it on a Jetson)."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if shapes.static:
        args.append(f"--shapes={_shape_arg(shapes.opt)}")
    else:
        args += [f"--minShapes={_shape_arg(shapes.min)}", f"--optShapes={_shape_arg(shapes.opt)}",
                 f"--maxShapes={_shape_arg(shapes.max)}"]
    if plan.strongly_typed and trt_major(plan.trt_version) < 11:
        args.append("--stronglyTyped")
    args += [f"--{flag.lower()}" for flag in plan.flags if flag in ("FP16", "INT8")]
    if plan.calibrator and calibration_cache:
        args.append(f"--calib={calibration_cache}")
    args.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if plan.dla_core is not None:
        args += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback"]
    return shlex.join(args)


# ---- CUDA helpers (cuda-python) ----------------------------------------------------------------------
def _cuda(result):
    """Unwrap a ``cuda.bindings.runtime`` call's ``(err, *values)`` tuple, raising on errors."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise ResUNetError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def gpu_info(device: int | None = None) -> dict:
    """Name and compute capability of the current (or given) CUDA device."""
    from cuda.bindings import runtime as cudart

    dev = _cuda(cudart.cudaGetDevice()) if device is None else device
    prop = _cuda(cudart.cudaGetDeviceProperties(dev))
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {"device": int(dev), "name": name, "compute_capability": f"{prop.major}.{prop.minor}"}


def make_entropy_calibrator(batches: Sequence[np.ndarray], cache_path: str | Path):
    """An ``IInt8EntropyCalibrator2`` (TensorRT 10.x) over (N,C,H,W) float32 ``batches``; its device
    memory is :class:`resunetpp.engines.tensorrt_engine.CudaPythonBuffers`. Call its ``close()``
    after the build."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    from resunetpp.engines.tensorrt_engine import CudaPythonBuffers

    cache_path = Path(cache_path)
    data = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
    if not data or any(b.shape != data[0].shape for b in data):
        raise ResUNetError("TensorRT calibration needs batches of one shape")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._next = 0
            self._buffers = CudaPythonBuffers(_cuda(cudart.cudaGetDevice()))  # the engines' device buffers

        def get_batch_size(self) -> int:
            return int(data[0].shape[0])

        def get_batch(self, names):  # noqa: ARG002 - one input
            if self._next >= len(data):
                return None
            ptr = self._buffers.upload("images", data[self._next])
            _cuda(cudart.cudaStreamSynchronize(self._buffers.stream))  # the copy is done before TensorRT reads
            self._next += 1
            return [int(ptr)]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            write_bytes_atomic(cache_path, bytes(cache))

        def close(self) -> None:
            """Free the device buffer and the stream (after the build)."""
            self._buffers.close()

    return EntropyCalibrator()


# ---- build --------------------------------------------------------------------------------------------
def build_engine(plan: BuildPlan, onnx_path: str | Path, engine_path: str | Path, shapes: ProfileShapes, *,
                 workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: str | Path | None = None,
                 calibration_batches: Sequence[np.ndarray] | None = None,
                 calibration_cache: str | Path | None = None) -> dict:
    """Build ``plan`` into ``engine_path`` (write it under a temporary name: the caller renames).

    Returns build facts for the metadata (TensorRT version, GPU, seconds, path taken).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = trt_major(trt.__version__)
    flags = 0
    if plan.strongly_typed and major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ResUNetError(f"{onnx_path}: TensorRT cannot parse the ONNX graph ({errors[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    if plan.dla_core is not None:
        if plan.dla_core >= builder.num_DLA_cores:
            raise ResUNetError(f"--dla-core {plan.dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    calibrator = None
    if plan.calibrator == "entropy":
        if not calibration_batches or calibration_cache is None:
            raise ResUNetError("the entropy calibrator needs calibration batches and a cache path")
        calibrator = make_entropy_calibrator(calibration_batches, calibration_cache)
        config.int8_calibrator = calibrator
        calib_profile = builder.create_optimization_profile()
        shape = tuple(calibration_batches[0].shape)
        calib_profile.set_shape(INPUT_NAME, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
    start = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.close()
    if serialized is None:
        raise ResUNetError(f"TensorRT failed to build the {plan.precision} engine from {onnx_path} "
                           "(see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    if cache is not None:
        write_bytes_atomic(timing_cache, bytes(cache.serialize()))
    return {"version": trt.__version__, "gpu": gpu_info(), "build_seconds": round(time.perf_counter() - start, 2),
            "dla_core": plan.dla_core, "workspace_mib": int(workspace_mib)}
