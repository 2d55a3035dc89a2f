"""The options of one export (frozen dataclasses): what ``resunetpp export`` is asked to build and how."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resunetpp.export import calibration as cal
from resunetpp.export.fp16 import FP16Recipe
from resunetpp.export.onnx_graph import DEFAULT_OPSET
from resunetpp.export.quantize import NNCFRecipe, QDQRecipe
from resunetpp.export.tensorrt_plan import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_MIB
from resunetpp.errors import ResUNetError

#: Where the INT8 OpenVINO IR comes from (:attr:`ExportOptions.openvino_int8`).
OPENVINO_INT8_SOURCES = ("qdq", "nncf")


@dataclass(frozen=True)
class TensorRTOptions:
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    dla_core: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int = 1
    calibrator: str | None = None  # "entropy": TensorRT 10 implicit INT8 (legacy)
    fp16_mode: str = "onnx"  # "flag": TensorRT 10 BuilderFlag.FP16 on the FP32 ONNX


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    out: Path
    formats: tuple[str, ...] | None = None  # None: every format this machine can build
    precisions: tuple[str, ...] | None = None  # None: every precision the inputs allow
    calib: Path | None = None
    calib_split: str | None = None
    calib_count: int = cal.DEFAULT_CALIB_COUNT
    eval: Path | None = None
    eval_split: str | None = None
    eval_count: int = cal.DEFAULT_EVAL_COUNT
    batch: int | None = None  # None: dynamic
    image_size: tuple[int, int] | None = None  # None: the checkpoint's preprocessing size
    dynamic_size: bool = True
    opset: int = DEFAULT_OPSET
    simplify: bool = True
    allow_accuracy_drop: bool = False
    #: INT8 gate: the largest share (0-1) of any held-out image's pixels on which the INT8 and FP32
    #: masks may differ; ``None``: :data:`resunetpp.export.verify.INT8_MAX_DISAGREEMENT`.
    int8_max_disagreement: float | None = None
    #: INT8 gate: no held-out image's Dice vs the FP32 mask below this (0-1); ``None``:
    #: :data:`resunetpp.export.verify.INT8_MIN_IMAGE_DICE`. Dice explodes on small masks: a deployment
    #: that judges by the share of the image (``int8_max_disagreement``) may lower it.
    int8_min_image_dice: float | None = None
    qdq: QDQRecipe = QDQRecipe()
    nncf: NNCFRecipe = NNCFRecipe()
    fp16: FP16Recipe = FP16Recipe()
    tensorrt: TensorRTOptions = TensorRTOptions()
    #: The FP32 model INT8 artifacts must agree with, when it is not ``checkpoint`` itself: a
    #: quantization-aware fine-tune (``resunetpp quantize --qat-epochs``) is judged against the
    #: model it was fine-tuned from. FP32/FP16 artifacts are still compared with ``checkpoint``.
    reference: Path | None = None
    #: How the INT8 OpenVINO IR is quantized: ``"qdq"`` converts the INT8 Q/DQ ONNX (the same
    #: scales ONNX Runtime and TensorRT run, so one quantization is verified on two runtimes, with
    #: the placement a QAT fine-tune was simulated with); ``"nncf"`` quantizes the IR with NNCF.
    openvino_int8: str = "qdq"
    #: Reuse (and keep) calibration statistics and reference outputs in the cache of
    #: :mod:`resunetpp.cache` (``~/.cache/resunetpp``), keyed by the checkpoint's hash, the image sets and
    #: the recipe; ``False`` (``--no-cache``) computes everything and writes nothing there.
    cache: bool = True

    def __post_init__(self) -> None:
        d = self.int8_max_disagreement
        if d is not None and not (isinstance(d, int | float) and 0.0 <= d <= 1.0):
            raise ResUNetError(f"the INT8 disagreement limit must be a share of the image in [0, 1], got {d!r}")
        f = self.int8_min_image_dice
        if f is not None and not (isinstance(f, int | float) and 0.0 <= f <= 1.0):
            raise ResUNetError(f"the INT8 per-image Dice floor must be in [0, 1], got {f!r}")
        if self.openvino_int8 not in OPENVINO_INT8_SOURCES:
            raise ResUNetError(f"OpenVINO INT8 source must be one of {', '.join(OPENVINO_INT8_SOURCES)}, "
                               f"got {self.openvino_int8!r}")


__all__ = ["OPENVINO_INT8_SOURCES", "ExportOptions", "TensorRTOptions"]
