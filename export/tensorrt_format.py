"""The TensorRT format: engines built from the exported ONNX graphs, the build kept thin.

Everything up to the TensorRT calls -- which ONNX to build from, strong typing or precision
flags, the optimization profile, workspace, timing and calibration cache paths, the equivalent
``trtexec`` command line -- is decided by :mod:`resunetpp.export.tensorrt_plan` (:func:`plan_build`,
:func:`profile_shapes`, :func:`trtexec_command`), which needs no TensorRT and is tested
everywhere. :func:`build_engine` and the entropy calibrator import ``tensorrt`` and ``cuda-python``
lazily and follow the TensorRT 10.x / 11.x Python API. A built engine is verified as a
:mod:`resunetpp.engines` TensorRT engine, like any other artifact, before it is moved into place.
Without TensorRT, the export prints the ``trtexec`` lines that build the engines on the target.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from resunetpp.export import onnx_format
from resunetpp.export.formats import ExportFormat, register_format
from resunetpp.export.inputs import batches as stacked_batches
from resunetpp.export.tensorrt_plan import (DEFAULT_WORKSPACE_MIB, BuildPlan, ProfileShapes, plan_build,
                                            profile_shapes, trt_major, trtexec_command)
from resunetpp.artifact import INPUT_NAME, write_sidecar
from resunetpp.atomic import atomic_path, write_bytes_atomic
from resunetpp.errors import ResUNetError

if TYPE_CHECKING:
    from resunetpp.export.context import ExportRun

def tensorrt_status() -> tuple[bool, str]:
    """``(True, version)`` when ``tensorrt`` imports, else ``(False, reason)``."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return False, f"the tensorrt Python package is not importable ({type(e).__name__}: {e})"
    return True, str(trt.__version__)


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


# ---- the export steps ----------------------------------------------------------------------------------
class _Refused(Exception):
    """Internal: leave an atomic write without renaming (artifact failed its gate)."""


def build(run: ExportRun, precisions: list[str]) -> None:
    """Build, verify and write the engines of ``precisions`` on this machine's GPU."""
    _ok, trt_version = tensorrt_status()
    t = run.o.tensorrt
    shapes = profile_shapes(run.spec, max_batch=t.max_batch, opt_batch=t.opt_batch)
    folder = run.final("tensorrt", precisions[0]).parent
    timing = folder / "timing.cache"
    for precision in precisions:
        plan = plan_build(trt_version, precision, calibrator=t.calibrator, fp16_mode=t.fp16_mode, dla_core=t.dla_core)
        onnx_format.ensure_source(run, plan.source)
        src = run.onnx_paths[plan.source]
        final = run.final("tensorrt", precision)
        calib_cache = folder / "calibration.cache" if plan.calibrator else None
        line = trtexec_command(plan, src, final, shapes, workspace_mib=t.workspace_mib,
                               timing_cache=timing, calibration_cache=calib_cache)
        run.r.info(f"tensorrt {precision}: {plan.description}\n  equivalent: {line}")
        batches = None
        if plan.calibrator:
            batches = list(stacked_batches(run.calib.inputs(run.pre), shapes.opt[0], fixed=True))
        staged = run.work / final.name  # built and verified here, moved into place once its sidecar is written
        try:
            with atomic_path(final) as tmp:
                with run.r.task(f"build TensorRT {precision} engine"):
                    facts = build_engine(plan, src, staged, shapes, workspace_mib=t.workspace_mib,
                                         timing_cache=timing, calibration_batches=batches,
                                         calibration_cache=calib_cache)
                with run.staged(staged, "tensorrt", precision, tensorrt=facts) as predict:
                    metrics = run.measure(f"TensorRT {precision} engine", predict, precision)
                gate, keep = run.judge("tensorrt", precision, metrics)
                if not keep:
                    raise _Refused
                rec = run.record("tensorrt", precision, final,
                                 {**metrics, "gate": gate.as_dict(run.o.allow_accuracy_drop)},
                                 tensorrt={**facts, "plan": plan.as_dict(), "profile": shapes.as_dict(),
                                           "source_onnx": src.name, "timing_cache": str(timing),
                                           "calibration_cache": str(calib_cache) if calib_cache else None,
                                           "trtexec": line},
                                 verification={**run.vset.record(), "runtime": "TensorRT"},
                                 **_int8_extra(run, precision, plan))
                os.replace(staged, tmp)
                write_sidecar(final, rec)
        except _Refused:
            run.add("tensorrt", precision, final, False, metrics, gate)
            continue
        run.add("tensorrt", precision, final, True, metrics, gate)


def _int8_extra(run: ExportRun, precision: str, plan: BuildPlan) -> dict:
    if precision != "int8":
        return {}
    tool = "tensorrt IInt8EntropyCalibrator2" if plan.calibrator else "onnxruntime"
    return {"calibration": run.calibration_record({"tool": tool, "method": "entropy" if plan.calibrator
                                                   else run.o.qdq.method}),
            "quantization": None if plan.calibrator else run.qdq_record}


def trtexec_hints(run: ExportRun, precisions: list[str]) -> None:
    """Without TensorRT here: the trtexec lines that build the engines from the written ONNX files."""
    t = run.o.tensorrt
    shapes = profile_shapes(run.spec, max_batch=t.max_batch, opt_batch=t.opt_batch)
    for precision in precisions:
        plan = plan_build("10", precision, dla_core=t.dla_core if precision != "fp32" else None)
        src = {"fp32": run.final("onnx", "fp32"), "fp16": run.final("onnx", "fp16"),
               "int8_qdq": run.final("onnx", "int8")}[plan.source]
        if src.is_file():
            engine = FORMAT.artifact_name(precision)
            run.report.trtexec.append(
                "# on the target (TensorRT 10; drop --stronglyTyped on 11): "
                + trtexec_command(plan, src.name, engine, shapes, workspace_mib=t.workspace_mib,
                                  timing_cache=Path(engine).parent / "timing.cache"))


def _unavailable() -> str | None:
    ok, info = tensorrt_status()
    return None if ok else info


def _skip(options, precision: str) -> str | None:
    return "DLA runs FP16 and INT8 only" if precision == "fp32" and options.tensorrt.dla_core is not None else None


FORMAT = register_format(ExportFormat(
    name="tensorrt", order=20, build=build, backend="tensorrt", availability=_unavailable, skip=_skip,
    skipped=trtexec_hints,
    description="TensorRT engines for this machine's GPU, verified on it (needs tensorrt and cuda-python); "
                "elsewhere the trtexec lines that build them",
    files={p: f"tensorrt/model_{p}.engine" for p in ("fp32", "fp16", "int8")}))
