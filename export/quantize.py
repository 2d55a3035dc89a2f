"""INT8 post-training quantization: Q/DQ ONNX (ONNX Runtime) and OpenVINO IR (NNCF).

Composable steps, so that sensitivity analysis can calibrate once and quantize many times with
different node groups kept in float:

1. :func:`calibrate_ranges` -- run the FP32 ONNX over calibration batches, store the activation
   ranges (min-max, percentile or entropy histogram) in an ONNX Runtime calibration cache file;
2. :func:`quantize_qdq` -- Q/DQ ONNX from the FP32 ONNX + that cache + a :class:`QDQRecipe`
   (nodes, modules and op types kept in float; per-channel weights; symmetric activations);
3. :func:`resunetpp.export.verify.compare_to_reference` on held-out images -- the accuracy report.

The Q/DQ ONNX uses signed INT8 with zero points of 0 for weights (per output channel) and, by
default, activations: TensorRT's explicit quantization takes exactly that; ONNX Runtime runs it
on the CPU, and OpenVINO converts it into an INT8 IR (``export --openvino-int8 qdq``, the
default), so one set of scales is verified on two runtimes. By default only each quantized
convolution's *inputs* and weights get Q/DQ pairs (as NNCF and TensorRT place them): a second
pair on every convolution's output, ONNX Runtime's own default, only adds rounding -- on the
shipped Kvasir-SEG model it cost 0.007 mean Dice vs FP32 and more on the worst image
(benchmarks/INT8.md, section 7). Nothing else is changed in the graph (no ORT pre-processing
pass), so node names stay those of the FP32 export and :func:`resunetpp.export.onnx_graph.node_scopes` maps them
to modules.

:func:`quantize_openvino` (``export --openvino-int8 nncf``) quantizes the OpenVINO IR with NNCF
instead (``nncf.quantize``), translating the exclusions to ``nncf.IgnoredScope`` names of the IR
(OpenVINO keeps ONNX node names as friendly names, ``/WithoutBiases`` suffixes added for split
convolutions).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from resunetpp.export.onnx_graph import node_scopes, nodes_in_modules
from resunetpp.artifact import INPUT_NAME, OUTPUT_NAME
from resunetpp.errors import ResUNetError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
NNCF_PRESETS = ("performance", "mixed")
#: Which ops INT8 quantizes: ``conv`` the convolutions only (the default), ``all`` every quantizable op.
INT8_OPS = ("conv", "all")
NNCF_RANGE_ESTIMATORS = ("default", "minmax", "mean_minmax", "median_minmax", "histogram")
DEFAULT_PERCENTILE = 99.99
#: Cross-layer equalization strength of the default recipe (``resunetpp.export.equalize``, SmoothQuant's
#: alpha): the lowest INT8 logit error of 0.65 / 0.8 / 1 on the shipped model (benchmarks/INT8.md, section 8).
DEFAULT_EQUALIZE_ALPHA = 0.8
#: Calibration images the default recipe's bias correction (``resunetpp.export.bias_correction``) averages over (0: off).
DEFAULT_BIAS_CORRECTION_IMAGES = 32
#: Modules the default INT8 recipe keeps in float: the convolutions that buy the most accuracy per
#: unit of float work, 7.7% of the FLOPs in all (``resunetpp.flops``). Ranked on held-out *training*
#: images by a leave-one-out of the near-threshold logit error per % of the FLOPs, then the largest
#: nested set keeping OpenVINO INT8 >= 3.3x FP32 on the 2-core box, a rule fixed before any
#: validation image was scored (benchmarks/INT8.md, section 11; the two image-reading
#: convolutions came first, from NNCF accuracy control, section 10). On the 120 validation images:
#: mean Dice vs FP32 0.9931 -> 0.9957, worst image 0.88 -> 0.945, mean |dp| 1.52e-3 -> 1.02e-3, at
#: 3.3x FP32 instead of 3.5x. ``--keep-float`` overrides, ``none`` quantizes every convolution.
DEFAULT_INT8_KEEP_MODULES: tuple[str, ...] = (
    "stem.body.0", "stem.shortcut.0",  # read the image (section 10)
    "stem.body.3", "encoder1.shortcut.0", "encoder2.body.2", "encoder3.body.5",
    "decoder1.attention.out_conv.2", "decoder3.block.shortcut.0",
    "head_aspp.project", "head",  # write the mask
)
#: ONNX op types quantized when ``conv_only`` is set (everything else runs in float between them).
CONV_OP_TYPES = ("Conv", "ConvTranspose")
#: OpenVINO op types NNCF quantizes when ``conv_only`` is set.
OV_CONV_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData")
#: Calibration batches per ``collect_data`` call: ONNX Runtime holds every intermediate tensor of a
#: call in memory (about 250 MB per 256x256 image for the full-width model), so keep it small.
CALIB_CHUNK = 4


@dataclass(frozen=True)
class Exclusions:
    """What stays in floating point: node names, module paths (``decoder1.attention``), op types."""

    keep_modules: tuple[str, ...] = DEFAULT_INT8_KEEP_MODULES
    keep_nodes: tuple[str, ...] = ()
    keep_op_types: tuple[str, ...] = ()
    keep_output_activation: bool = True
    #: Quantize convolutions only: element-wise ops (the attention product, residual adds, SE
    #: gates), pooling, resize and concat stay in float. Keeps nearly all of INT8's speed.
    conv_only: bool = True

    def resolve(self, model) -> list[str]:
        """Sorted ONNX node names of ``model`` that stay in float; unknown names/modules raise."""
        names = {n.name for n in model.graph.node}
        unknown = [n for n in self.keep_nodes if n not in names]
        if unknown:
            raise ResUNetError(f"node {unknown[0]!r} (kept in float) is not in the graph")
        keep = set(self.keep_nodes) | set(nodes_in_modules(node_scopes(model), self.keep_modules))
        outputs = {o.name for o in model.graph.output}
        for node in model.graph.node:
            if node.op_type in self.keep_op_types or (self.conv_only and node.op_type not in CONV_OP_TYPES):
                keep.add(node.name)
            if self.keep_output_activation and outputs & set(node.output):
                keep.add(node.name)
        return sorted(keep)


@dataclass(frozen=True)
class QDQRecipe(Exclusions):
    """ONNX Runtime ``quantize_static`` settings for the Q/DQ ONNX."""

    method: str = "percentile"
    per_channel: bool = True
    percentile: float = DEFAULT_PERCENTILE
    symmetric_activations: bool = True
    #: Also put a Q/DQ pair on each quantized convolution's output (ONNX Runtime's default). Off,
    #: only inputs and weights are quantized -- what NNCF does for OpenVINO and what TensorRT's
    #: explicit quantization needs (it fuses the next op's input Q into the convolution anyway).
    quantize_outputs: bool = False
    #: Cross-layer equalization of activation ranges before calibration (:mod:`resunetpp.export.equalize`):
    #: SmoothQuant's migration strength ``alpha`` in [0, 1], or ``None`` to quantize the model as it is.
    equalize_alpha: float | None = DEFAULT_EQUALIZE_ALPHA
    #: Empirical bias correction (:mod:`resunetpp.export.bias_correction`) over this many calibration
    #: images before calibration; 0: off.
    bias_correction_images: int = DEFAULT_BIAS_CORRECTION_IMAGES

    def __post_init__(self) -> None:
        if self.equalize_alpha is not None and not 0.0 <= self.equalize_alpha <= 1.0:
            raise ResUNetError(f"equalization alpha must be in [0, 1], got {self.equalize_alpha}")
        if self.bias_correction_images < 0:
            raise ResUNetError(f"bias correction images must be >= 0, got {self.bias_correction_images}")
        if self.method not in CALIBRATION_METHODS:
            raise ResUNetError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, "
                               f"got {self.method!r}")
        if not 0 < self.percentile <= 100:
            raise ResUNetError(f"percentile must be in (0, 100], got {self.percentile}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NNCFRecipe(Exclusions):
    """``nncf.quantize`` settings for the INT8 OpenVINO IR."""

    preset: str = "performance"
    subset_size: int = 300
    fast_bias_correction: bool = True
    range_estimator: str = "default"

    def __post_init__(self) -> None:
        if self.preset not in NNCF_PRESETS:
            raise ResUNetError(f"NNCF preset must be one of {', '.join(NNCF_PRESETS)}, got {self.preset!r}")
        if self.range_estimator not in NNCF_RANGE_ESTIMATORS:
            raise ResUNetError(f"NNCF range estimator must be one of {', '.join(NNCF_RANGE_ESTIMATORS)}, "
                               f"got {self.range_estimator!r}")
        if self.subset_size < 1:
            raise ResUNetError(f"NNCF subset size must be positive, got {self.subset_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantResult:
    """A quantized artifact and the record of what was kept in float."""

    backend: str
    recipe: dict
    excluded_nodes: list[str]
    excluded_modules: list[str]
    path: Path | None = None
    model: object = None
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"backend": self.backend, "recipe": self.recipe, "excluded_nodes": self.excluded_nodes,
                "excluded_modules": self.excluded_modules, **self.extra}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger and prints; keep the CLI clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print progress
            yield
    finally:
        root.setLevel(level)


def _modules(scopes: dict[str, str], nodes: Iterable[str]) -> list[str]:
    return sorted({scopes.get(n, "") or "<output>" for n in nodes})


def _method_enum(method: str):
    from onnxruntime.quantization import CalibrationMethod

    # mse: ranges computed from the percentile calibrator's |x| histograms (export.ranges)
    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy, "mse": CalibrationMethod.Percentile}[method]


def _quantizable_op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def _chunks(batches: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for b in batches:
        chunk.append(b)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def calibrate_ranges(fp32_onnx: str | Path, batches: Iterable[np.ndarray], cache_path: str | Path, *,
                     method: str = "minmax", percentile: float = DEFAULT_PERCENTILE,
                     progress: Callable[[int], None] | None = None) -> Path:
    """Activation ranges of ``fp32_onnx`` over ``batches`` ((N,C,H,W) float32), saved to ``cache_path``.

    The cache is ONNX Runtime's calibration cache (JSON), which :func:`quantize_qdq` reads;
    ``progress`` is called with the number of images processed after each chunk. ``mse`` collects
    the same |x| histograms as ``percentile`` and picks each tensor's range by
    :func:`resunetpp.export.ranges.mse_range`.
    """
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator, save_tensors_data

    if method not in CALIBRATION_METHODS:
        raise ResUNetError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")

    class _Reader(CalibrationDataReader):
        def __init__(self, items: list[np.ndarray]) -> None:
            self._it = iter(items)

        def get_next(self) -> dict | None:
            x = next(self._it, None)
            return None if x is None else {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}

    options = {"percentile": percentile} if method == "percentile" else {}
    seen = 0
    with tempfile.TemporaryDirectory(prefix="resunetpp-calib-") as tmp, _quiet():
        calibrator = create_calibrator(Path(fp32_onnx), _quantizable_op_types(),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=_method_enum(method), extra_options=options)
        for chunk in _chunks(batches, CALIB_CHUNK):
            calibrator.collect_data(_Reader(chunk))
            n = sum(int(c.shape[0]) for c in chunk)
            seen += n
            if progress:
                progress(n)
        if not seen:
            raise ResUNetError("calibration set is empty")
        if method == "mse":
            from resunetpp.export.ranges import mse_range

            histograms = calibrator.collector.histogram_dict  # |x| histograms (symmetric percentile)
            # (hist, edges, min, max) per tensor
            amax = {name: np.float32(mse_range(h[0], h[1], max(abs(float(h[2])), abs(float(h[3])))))
                    for name, h in histograms.items()}
            ranges = TensorsData(_method_enum(method),
                                 {name: TensorData(lowest=-a, highest=a) for name, a in amax.items()})
        else:
            ranges = calibrator.compute_data()
    cache_path = Path(cache_path)
    save_tensors_data(ranges, cache_path)
    return cache_path


def quantize_qdq(fp32_onnx: str | Path, ranges_cache: str | Path, out_path: str | Path,
                 recipe: QDQRecipe = QDQRecipe()) -> QuantResult:
    """Q/DQ INT8 ONNX at ``out_path`` from ``fp32_onnx`` and the ranges of :func:`calibrate_ranges`."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32_onnx))
    excluded = recipe.resolve(model)
    scopes = node_scopes(model)
    with _quiet():
        quantize_static(
            str(fp32_onnx), str(out_path), None,
            quant_format=QuantFormat.QDQ, per_channel=recipe.per_channel, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=_method_enum(recipe.method),
            calibration_cache_path=str(ranges_cache),
            extra_options={"ActivationSymmetric": recipe.symmetric_activations, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": [] if recipe.quantize_outputs
                           else list(CONV_OP_TYPES)})
    quantized = onnx.load(str(out_path))
    counts = {"quantize_linear": sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node),
              "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node)}
    if counts["dequantize_linear"] == 0:
        raise ResUNetError("ONNX Runtime quantization inserted no Q/DQ node (is everything excluded?)")
    return QuantResult("onnxruntime.quantize_static (QDQ)", recipe.to_dict(), excluded, _modules(scopes, excluded),
                       path=Path(out_path), extra={"qdq_nodes": counts})


# ---- OpenVINO / NNCF --------------------------------------------------------------------------------
def openvino_op_names(ov_model, onnx_nodes: Iterable[str]) -> list[str]:
    """OpenVINO op names for ONNX node names (exact, or the ``name/...`` parts of a split op)."""
    wanted = set(onnx_nodes)
    out = []
    for op in ov_model.get_ordered_ops():
        name = op.get_friendly_name()
        if name in wanted or name.split("/")[0] in wanted:
            if op.get_type_name() not in ("Constant", "Parameter", "Result"):
                out.append(name)
    return sorted(set(out))


def _range_estimator(name: str):
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as R

    return {"minmax": R.MINMAX, "mean_minmax": R.MEAN_MINMAX, "median_minmax": R.MEDIAN_MINMAX,
            "histogram": R.HISTOGRAM}[name]


def quantize_openvino(ov_model, onnx_model, items: Iterable, transform: Callable[[object], np.ndarray],
                      recipe: NNCFRecipe = NNCFRecipe()) -> QuantResult:
    """INT8 ``ov.Model`` with NNCF; ``transform(item)`` gives one (N,C,H,W) float32 calibration batch.

    ``onnx_model`` is the FP32 ONNX the IR was converted from: exclusions are resolved on it
    (module scopes) and mapped to IR op names.
    """
    import nncf

    nncf.set_log_level(logging.ERROR)
    excluded = recipe.resolve(onnx_model)
    ov_names = openvino_op_names(ov_model, excluded)
    ov_types: list[str] = []
    if recipe.conv_only:
        ov_types = sorted({op.get_type_name() for op in ov_model.get_ordered_ops()}
                          - set(OV_CONV_TYPES) - {"Parameter", "Result", "Constant"})
    advanced = None
    if recipe.range_estimator != "default":
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        advanced = AdvancedQuantizationParameters(
            activations_range_estimator_params=_range_estimator(recipe.range_estimator))
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    try:
        quantized = nncf.quantize(
            ov_model, nncf.Dataset(items, transform), preset=preset[recipe.preset],
            subset_size=recipe.subset_size, fast_bias_correction=recipe.fast_bias_correction,
            ignored_scope=(nncf.IgnoredScope(names=ov_names, types=ov_types, validate=False)
                           if ov_names or ov_types else None),
            advanced_parameters=advanced)
    except nncf.ValidationError as e:
        raise ResUNetError(f"NNCF quantization: {str(e).splitlines()[0]}") from e
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    return QuantResult("nncf.quantize", recipe.to_dict(), excluded, _modules(node_scopes(onnx_model), excluded),
                       model=quantized, extra={"ignored_ir_ops": ov_names, "ignored_ir_types": ov_types, "fake_quantize_ops": fq,
                                               "output": OUTPUT_NAME})
