"""TensorRT build plans in plain Python: which ONNX an engine is built from, strong typing or precision
flags, the optimization profile, and the equivalent ``trtexec`` command line. Needs no TensorRT
(tested everywhere); :mod:`resunetpp.export.tensorrt_format` builds what a plan says.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from resunetpp.export.onnx_graph import ShapeSpec
from resunetpp.artifact import INPUT_NAME
from resunetpp.errors import ResUNetError
from resunetpp.model_config import SIZE_MULTIPLE

PRECISIONS = ("fp32", "fp16", "int8")
#: Builder workspace (MiB) and the profile's largest batch, by default.
DEFAULT_WORKSPACE_MIB = 2048
DEFAULT_MAX_BATCH = 8
CALIBRATORS = ("entropy",)
FP16_MODES = ("onnx", "flag")
MIN_MAJOR = 10


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


__all__ = ["CALIBRATORS", "DEFAULT_MAX_BATCH", "DEFAULT_WORKSPACE_MIB", "FP16_MODES", "MIN_MAJOR", "PRECISIONS", "BuildPlan", "ProfileShapes", "plan_build",
           "profile_shapes", "trt_major", "trtexec_command"]
