"""What ``resunetpp export`` runs: checkpoint -> verified ONNX / OpenVINO / TensorRT artifacts.

Order of work: load the checkpoint and the image sets (all argument and file errors surface
before anything heavy runs) -> PyTorch FP32 reference outputs on the verification images ->
ONNX FP32 (verified against PyTorch, dynamic axes exercised; the export stops if it does not
match) -> FP16 ONNX -> INT8 Q/DQ ONNX -> OpenVINO IR FP32/FP16/INT8 -> TensorRT engines.

Every artifact is verified before it is written: FP32 within
:data:`export.verify.FP32_MAX_ABS_ERROR` of PyTorch, FP16 finite and Dice vs reference >=
:data:`export.verify.FP16_MIN_DICE`, INT8 Dice vs reference >= :data:`export.verify.INT8_MIN_DICE`
on held-out images. An artifact that fails its gate is not written (unless
``allow_accuracy_drop``) and :meth:`ExportReport.raise_for_gate` raises after the others are
done. Intermediate graphs live in a hidden work folder inside ``out`` that is always removed;
every final file is written under a temporary name and renamed, its sidecar first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from resunetpp.export import calibration as cal
from resunetpp.export.fp16 import FP16Recipe, FP16Result
from resunetpp.export.onnx_format import DEFAULT_OPSET, ShapeSpec
from resunetpp.export.openvino_format import VERIFY_PRECISION_HINT
from resunetpp.export.quantize import NNCFRecipe, QDQRecipe
from resunetpp.export.report import NullReporter, Reporter
from resunetpp.export.results import AccuracyGateError, ArtifactResult, ExportReport
from resunetpp.export.tensorrt_format import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_MIB
from resunetpp.export.verify import (FP32_MAX_ABS_ERROR, Gate, artifact_predict, compare_outputs, engine_predict,
                                     gate_for, predict_batched)
from resunetpp.artifact import write_sidecar
from resunetpp.atomic import atomic_path, write_json_atomic
from resunetpp.checkpoint import Checkpoint, load_checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.preprocess import Preprocessing

FORMATS = ("onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
REPORT_NAME = "export_report.json"
#: Images the FP16 range probe runs (calibration images when given, else verification images).
RANGE_PROBE_IMAGES = 32
#: Held-out images on which the equalized model must match the original (PyTorch, probabilities).
EQUALIZATION_CHECK_IMAGES = 4
VERIFY_BATCH = 4


#: Where the INT8 OpenVINO IR comes from (:attr:`ExportOptions.openvino_int8`).
OPENVINO_INT8_SOURCES = ("qdq", "nncf")


def artifact_name(fmt: str, precision: str) -> str:
    """Relative path of an artifact inside ``--out``."""
    if fmt == "onnx":
        return {"fp32": "model_fp32.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8_qdq.onnx"}[precision]
    if fmt == "openvino":
        return f"openvino/model_{precision}.xml"
    return f"tensorrt/model_{precision}.engine"


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

    def __post_init__(self) -> None:
        if self.openvino_int8 not in OPENVINO_INT8_SOURCES:
            raise ResUNetError(f"OpenVINO INT8 source must be one of {', '.join(OPENVINO_INT8_SOURCES)}, "
                               f"got {self.openvino_int8!r}")


# ---- inputs ------------------------------------------------------------------------------------------
@dataclass
class VerificationSet:
    """Preprocessed images (and masks) every artifact is compared on, with the reference outputs."""

    source: str
    origin: str | None
    names: list[str]
    inputs: list[np.ndarray]
    sizes: list[tuple[int, int]]
    masks: list[np.ndarray | None]
    reference: list[np.ndarray] = field(default_factory=list)
    int8_reference: list[np.ndarray] | None = None  # ExportOptions.reference's outputs, when given
    int8_reference_record: dict | None = None

    def record(self) -> dict:
        rec = {"source": self.source, "from": self.origin, "images": len(self.inputs),
               "with_masks": any(m is not None for m in self.masks)}
        if self.int8_reference_record:
            rec["int8_reference"] = self.int8_reference_record
        return rec


def _parse_targets(options: ExportOptions, trt_ok: bool, trt_reason: str,
                   has_calib: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    formats = options.formats or FORMATS
    precisions = options.precisions or PRECISIONS
    for f in formats:
        if f not in FORMATS:
            raise ResUNetError(f"unknown format {f!r} (choose from {', '.join(FORMATS)})")
    for p in precisions:
        if p not in PRECISIONS:
            raise ResUNetError(f"unknown precision {p!r} (choose from {', '.join(PRECISIONS)})")
    targets, skipped = [], []
    for f in FORMATS:
        for p in PRECISIONS:
            if f not in formats or p not in precisions:
                continue
            if f == "tensorrt" and not trt_ok:
                if options.formats:
                    raise ResUNetError(f"--format tensorrt: {trt_reason}")
                skipped.append((f, p, trt_reason))
            elif p == "int8" and not has_calib:
                if options.precisions:
                    raise ResUNetError("--precision int8 needs calibration images: pass --calib DIR")
                skipped.append((f, p, "needs calibration images (--calib)"))
            elif f == "tensorrt" and p == "fp32" and options.tensorrt.dla_core is not None:
                skipped.append((f, p, "DLA runs FP16 and INT8 only"))
            else:
                targets.append((f, p))
    if not targets:
        raise ResUNetError("nothing to export: " + "; ".join(f"{f} {p}: {r}" for f, p, r in skipped))
    return targets, skipped


def _image_sets(options: ExportOptions, need_eval: bool) -> tuple[cal.ImageSet | None, cal.ImageSet | None]:
    calib = cal.select_images(options.calib, options.calib_split, options.calib_count, role="calibration",
                              default_split="train") if options.calib else None
    ev = None
    if options.eval is not None:
        ev = cal.select_images(options.eval, options.eval_split, options.eval_count, role="evaluation",
                               default_split="val")
    elif options.calib is not None and (options.eval_split or (options.calib / "val.txt").is_file()) \
            and (options.calib / "images").is_dir():
        ev = cal.select_images(options.calib, options.eval_split or "val", options.eval_count, role="evaluation",
                               default_split=None)
    if need_eval and ev is None:
        raise ResUNetError("INT8 accuracy is measured on held-out images: pass --eval DIR (or a --calib dataset "
                           "root that has val.txt)")
    if calib is not None and ev is not None:
        cal.check_disjoint(calib, ev)
    return calib, ev


def _verification_set(ckpt: Checkpoint, pre: Preprocessing, calib: cal.ImageSet | None,
                      ev: cal.ImageSet | None, limit: int) -> VerificationSet:
    """Held-out images when there are some, else (no INT8 then) the first ``limit`` calibration
    images, else a fixed synthetic sample."""
    chosen = ev or calib
    if chosen is None:
        images = cal.synthetic_images(pre)
        return VerificationSet("synthetic", None, [f"synthetic{i}" for i in range(len(images))],
                               [pre.apply(im) for im in images], [im.shape[:2] for im in images], [None] * len(images))
    names, inputs, sizes, masks = [], [], [], []
    for i, stem in enumerate(chosen.stems[:limit]):
        image, mask = chosen.load(i, pre.channels, ckpt.config.num_classes)
        names.append(stem)
        inputs.append(pre.apply(image))
        sizes.append(image.shape[:2])
        masks.append(mask)
    return VerificationSet(chosen.role, str(chosen.source) + (f" ({chosen.split})" if chosen.split else ""),
                           names, inputs, sizes, masks)


def _batches(inputs: Iterable[np.ndarray], size: int, fixed: bool) -> Iterator[np.ndarray]:
    """Stack consecutive equal-shape inputs into batches (padded to ``size`` when ``fixed``)."""
    pending: list[np.ndarray] = []
    for x in inputs:
        if pending and (len(pending) == size or pending[0].shape != x.shape):
            yield np.stack(pending + [pending[-1]] * (size - len(pending) if fixed else 0))
            pending = []
        pending.append(x)
    if pending:
        yield np.stack(pending + [pending[-1]] * (size - len(pending) if fixed else 0))


# ---- the run -----------------------------------------------------------------------------------------
class _Run:
    """State of one export: checkpoint, geometry, image sets, work folder, results."""

    def __init__(self, options: ExportOptions, reporter: Reporter, work: Path) -> None:
        self.o = options
        self.r = reporter
        self.work = work
        self.ckpt = load_checkpoint(options.checkpoint)
        self.ref_ckpt = load_checkpoint(options.reference) if options.reference else None
        if self.ref_ckpt is not None:
            mine, theirs = self.ckpt, self.ref_ckpt
            if (theirs.config.num_classes, theirs.config.in_channels) != (mine.config.num_classes, mine.config.in_channels) \
                    or theirs.preprocessing != mine.preprocessing:
                raise ResUNetError(f"{options.reference}: the INT8 reference must take the same input and give the "
                                   f"same output as {options.checkpoint} (classes, channels, preprocessing)")
        self.pre = self._preprocessing()
        self.spec = ShapeSpec(self.pre.channels, self.ckpt.config.num_classes, self.pre.size, options.batch,
                              options.dynamic_size)
        self.report = ExportReport(options.out)
        self.onnx_paths: dict[str, Path] = {}
        self.fp32_model = None
        self.fp16_result: FP16Result | None = None
        self.qdq_record: dict | None = None
        self.int8_source_model = None
        self.equalization_record: dict | None = None
        self.bias_correction_record: dict | None = None

    def _preprocessing(self) -> Preprocessing:
        try:
            pre = self.ckpt.preprocessing.with_size(self.o.image_size)
        except ValueError as e:
            raise ResUNetError(f"--image-size: {e}") from None
        if pre.mode == "pad" and not self.o.dynamic_size:
            raise ResUNetError("this checkpoint pads images to any size (preprocessing mode 'pad'): "
                               "it needs dynamic height and width (drop --static-size)")
        if pre.channels != self.ckpt.config.in_channels:
            raise ResUNetError(f"preprocessing gives {pre.channels} channels, the model takes "
                               f"{self.ckpt.config.in_channels}")
        return pre

    # -- helpers --
    def warn(self, message: str) -> None:
        self.report.warnings.append(message)
        self.r.warn(message)

    def record(self, fmt: str, precision: str, path: Path, accuracy: dict, **extra: object) -> dict:
        from resunetpp.export.metadata import artifact_record

        calib = extra.pop("calibration", None)
        return artifact_record(self.ckpt, self.pre, fmt=fmt, precision=precision, file=path,
                               shape=self.spec.record(), calibration=calib, accuracy=accuracy, **extra)

    def staged(self, path: Path, fmt: str, precision: str, **extra: object):
        """``predict`` of an artifact not yet written (no sidecar): opened as an engine of the backend
        that runs ``fmt``, with the record it will have (less its accuracy); a context manager."""
        backend = {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}[fmt]
        options = {"precision": VERIFY_PRECISION_HINT} if backend == "openvino" else {}
        return artifact_predict(path, backend, self.record(fmt, precision, path, None, **extra), **options)

    def measure(self, label: str, predict: Callable[[np.ndarray], np.ndarray], precision: str = "fp32") -> dict:
        v = self.vset
        reference = v.int8_reference if precision == "int8" and v.int8_reference is not None else v.reference
        with self.r.task(f"verify {label}", total=len(v.inputs)) as advance:
            def counted(x: np.ndarray) -> np.ndarray:
                out = predict(x)
                advance(len(x))
                return out

            outputs = predict_batched(counted, v.inputs, VERIFY_BATCH, self.o.batch)
        return compare_outputs(outputs, reference, masks=v.masks, pre=self.pre, sizes=v.sizes, names=v.names,
                               num_classes=self.ckpt.config.num_classes)

    def judge(self, fmt: str, precision: str, metrics: dict) -> tuple[Gate, bool]:
        """The gate's outcome and whether the artifact is written."""
        gate = gate_for(precision, metrics)
        keep = gate.passed or self.o.allow_accuracy_drop
        if not gate.passed:
            (self.warn if keep else self.r.warn)(f"{fmt} {precision}: {gate.reason}"
                                                 + (" (kept: --allow-accuracy-drop)" if keep else " -- not written"))
        return gate, keep

    def add(self, fmt: str, precision: str, path: Path, written: bool, metrics: dict, gate: Gate) -> None:
        size = None
        if not written:
            _remove_stale(path)
        else:
            size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if fmt == "openvino" else 0)
        self.report.artifacts.append(ArtifactResult(fmt, precision, path, written, size, metrics,
                                                    gate.as_dict(self.o.allow_accuracy_drop)))

    def final(self, fmt: str, precision: str) -> Path:
        return self.o.out / artifact_name(fmt, precision)

    # -- steps --
    def reference(self) -> None:
        v = self.vset
        with self.r.task("PyTorch FP32 reference", total=len(v.inputs)) as advance:
            v.reference.extend(self._torch_outputs(self.ckpt, advance))
        if self.ref_ckpt is not None:
            with self.r.task(f"PyTorch FP32 reference for INT8 ({self.o.reference.name})", total=len(v.inputs)) as adv:
                v.int8_reference = self._torch_outputs(self.ref_ckpt, adv)
            v.int8_reference_record = {"path": str(self.o.reference), "sha256": self.ref_ckpt.sha256}

    def _torch_outputs(self, ckpt: Checkpoint, advance) -> list[np.ndarray]:
        """The checkpoint's probabilities on the verification images, as the torch engine gives them
        (NCHW memory format: the eager model exactly as trained)."""
        from resunetpp import engines

        out: list[np.ndarray] = []
        with engines.open(ckpt, device="cpu", channels_last=False) as engine:
            predict = engine_predict(engine)
            for x in _batches(self.vset.inputs, VERIFY_BATCH, fixed=False):
                out.extend(predict(x))
                advance(len(x))
        return out

    def onnx_fp32(self, write: bool) -> None:
        import onnx

        from resunetpp.export.onnx_format import export_onnx, write_onnx_artifact
        from resunetpp.model import WithActivation

        with self.r.task(f"export ONNX (opset {self.o.opset}, torch dynamo exporter)"):
            model = export_onnx(WithActivation(self.ckpt.build_model()), self.spec, opset=self.o.opset,
                                simplify=self.o.simplify)
        self.fp32_model = model
        path = self.work / "fp32.onnx"
        onnx.save_model(model, str(path))
        self.onnx_paths["fp32"] = path
        with self.staged(path, "onnx", "fp32") as predict:
            metrics = self.measure("ONNX FP32 (ONNX Runtime)", predict)
            metrics["dynamic_axes_check"] = self._check_dynamic(predict)
        gate = gate_for("fp32", metrics)
        if not gate.passed:
            raise ResUNetError(f"the exported ONNX graph does not match PyTorch: {gate.reason}")
        if write:
            final = self.final("onnx", "fp32")
            rec = self.record("onnx", "fp32", final, {**metrics, "gate": gate.as_dict()}, onnx=self._onnx_info(model),
                              verification={**self.vset.record(), "runtime": "onnxruntime CPUExecutionProvider"})
            write_onnx_artifact(model, final, rec)
            self.add("onnx", "fp32", final, True, metrics, gate)

    def _onnx_info(self, model) -> dict:
        opset = {o.domain: o.version for o in model.opset_import}.get("", self.o.opset)
        return {"opset": opset, "exporter": "torch.onnx.export(dynamo=True)", "simplified": self.o.simplify,
                "nodes": len(model.graph.node), "ir_version": model.ir_version}

    def _check_dynamic(self, predict) -> dict | None:
        """Run shapes other than the example through the graph and PyTorch (dynamic axes really work)."""
        import torch

        from resunetpp.model import WithActivation

        shapes = []
        _, c, h, w = self.spec.example_shape(1)
        if self.spec.batch is None:
            shapes.append((3, c, h, w))
        if self.spec.dynamic_size:
            shapes.append((self.spec.batch or 1, c, h, w + 2 * 8))
        if not shapes:
            return None
        net = WithActivation(self.ckpt.build_model())
        rng = np.random.default_rng(1)
        worst = 0.0
        for shape in shapes:
            x = rng.standard_normal(shape).astype(np.float32)
            with torch.no_grad():
                ref = net(torch.from_numpy(x)).numpy()
            got = predict(x)
            if got.shape != ref.shape:
                raise ResUNetError(f"exported ONNX graph returns {got.shape} for input {shape}, PyTorch {ref.shape}")
            worst = max(worst, float(np.abs(got - ref).max()))
        if worst > FP32_MAX_ABS_ERROR:
            raise ResUNetError(f"exported ONNX graph differs from PyTorch by {worst:.3g} on inputs {shapes} "
                               "(dynamic axes)")
        return {"shapes": [list(s) for s in shapes], "max_abs_error": worst}

    def onnx_fp16(self, write: bool) -> None:
        import onnx

        from resunetpp.export.fp16 import build_fp16
        from resunetpp.export.onnx_format import write_onnx_artifact

        probe = self._probe_inputs()
        with self.r.task(f"FP16 ONNX (range probe on {len(probe)} images)"):
            result = build_fp16(self.fp32_model, self.o.fp16, probe)
        self.fp16_result = result
        path = self.work / "fp16.onnx"
        onnx.save_model(result.model, str(path))
        self.onnx_paths["fp16"] = path
        if not write:
            return
        with self.staged(path, "onnx", "fp16") as predict:
            metrics = self.measure("ONNX FP16 (ONNX Runtime)", predict)
        gate, keep = self.judge("onnx", "fp16", metrics)
        final = self.final("onnx", "fp16")
        if keep:
            rec = self.record("onnx", "fp16", final, {**metrics, "gate": gate.as_dict(self.o.allow_accuracy_drop)},
                              onnx=self._onnx_info(result.model), fp16=result.record(),
                              verification={**self.vset.record(), "runtime": "onnxruntime CPUExecutionProvider "
                                            "(FP16 ops without a CPU kernel run in FP32 between casts)"})
            write_onnx_artifact(result.model, final, rec)
        self.add("onnx", "fp16", final, keep, metrics, gate)

    def _probe_inputs(self) -> list[np.ndarray]:
        if self.calib is not None:
            out = []
            for x in self.calib.inputs(self.pre):
                out.append(x)
                if len(out) == RANGE_PROBE_IMAGES:
                    break
            return out
        return self.vset.inputs[:RANGE_PROBE_IMAGES]

    def calibration_record(self, method: dict) -> dict:
        assert self.calib is not None and self.eval is not None
        rec = self.calib.record()
        rec["method"] = method
        rec["held_out_evaluation"] = self.eval.record()
        return rec

    def int8_source(self):
        """The FP32 ONNX (path, model) the INT8 artifacts are quantized from: the export's own, or
        the model with equalized activation ranges (``QDQRecipe.equalize_alpha``, same function:
        checked against the original in PyTorch on held-out images) and biases corrected for
        INT8's mean shifts (``QDQRecipe.bias_correction_images``, :mod:`export.bias_correction`)."""
        recipe = self.o.qdq
        if recipe.equalize_alpha is None and not recipe.bias_correction_images:
            return self.onnx_paths["fp32"], self.fp32_model
        if "int8_source" not in self.onnx_paths:
            self._prepare_int8_source(recipe)
        return self.onnx_paths["int8_source"], self.int8_source_model

    def _source_record(self) -> dict:
        """What the INT8 source model went through, for every INT8 artifact's ``quantization``."""
        return {"equalization": self.equalization_record, "bias_correction": self.bias_correction_record}

    def _prepare_int8_source(self, recipe: QDQRecipe) -> None:
        import onnx
        import torch

        from resunetpp.export.onnx_format import export_onnx
        from resunetpp.model import WithActivation

        model = self.ckpt.build_model()
        with self.r.task("load calibration images", total=len(self.calib)) as adv:
            images = []
            for x in self.calib.inputs(self.pre):  # decoded once for both steps
                images.append(x[None])
                adv(1)
        steps = []
        if recipe.equalize_alpha is not None:
            from resunetpp.export.equalize import equalize

            alpha = recipe.equalize_alpha
            with self.r.task(f"equalize activation ranges (alpha {alpha:g}, PyTorch)"):
                result = equalize(model, images, alpha)
            # The same function: compare with the unequalized model on held-out images.
            original = WithActivation(self.ckpt.build_model()).eval()
            equalized = WithActivation(model).eval()
            with torch.no_grad():
                err = max(float((equalized(t) - original(t)).abs().max())
                          for t in (torch.as_tensor(x[None]) for x in self.vset.inputs[:EQUALIZATION_CHECK_IMAGES]))
            if not err <= FP32_MAX_ABS_ERROR:
                raise ResUNetError(f"equalization changed the FP32 model (largest probability difference {err:.3g} > "
                                   f"{FP32_MAX_ABS_ERROR:g}); export with --no-equalize")
            self.equalization_record = {**result.record(), "fp32_max_abs_difference": err,
                                        "checked_on_images": min(EQUALIZATION_CHECK_IMAGES, len(self.vset.inputs))}
            steps.append("equalized")
        if recipe.bias_correction_images:
            from resunetpp.export.bias_correction import bias_correct
            from resunetpp.export.quantsim import sim_ranges

            n = min(recipe.bias_correction_images, len(self.calib))
            with self.r.task(f"correct INT8 biases ({n} images, simulated INT8)", total=n) as adv:
                self.bias_correction_record = bias_correct(
                    model, images, recipe.bias_correction_images, progress=adv, keep_modules=recipe.keep_modules,
                    **sim_ranges(recipe.method, recipe.percentile))
            steps.append("bias-corrected")
        name = " and ".join(steps)
        with self.r.task(f"export the {name} model to ONNX"):
            self.int8_source_model = export_onnx(WithActivation(model), self.spec, opset=self.o.opset,
                                                 simplify=self.o.simplify)
        path = self.work / "fp32_int8_source.onnx"
        onnx.save_model(self.int8_source_model, str(path))
        self.onnx_paths["int8_source"] = path

    def onnx_int8(self, write: bool) -> None:
        import onnx

        from resunetpp.export.onnx_format import write_onnx_artifact
        from resunetpp.export.quantize import calibrate_ranges, quantize_qdq

        recipe = self.o.qdq
        source, _ = self.int8_source()
        cache = self.work / f"ranges_{recipe.method}.json"
        with self.r.task(f"calibrate Q/DQ ranges ({recipe.method}, ONNX Runtime)", total=len(self.calib)) as adv:
            calibrate_ranges(source, _batches(self.calib.inputs(self.pre), self.o.batch or 1,
                                                                fixed=self.o.batch is not None),
                             cache, method=recipe.method, percentile=recipe.percentile, progress=adv)
        with self.r.task("quantize Q/DQ ONNX (ONNX Runtime quantize_static)"):
            result = quantize_qdq(source, cache, self.work / "int8_qdq.onnx", recipe)
        self.onnx_paths["int8_qdq"] = result.path
        self.qdq_record = {**result.record(), **self._source_record()}
        if not write:
            return
        with self.staged(result.path, "onnx", "int8") as predict:
            metrics = self.measure("ONNX INT8 Q/DQ (ONNX Runtime)", predict, "int8")
        gate, keep = self.judge("onnx", "int8", metrics)
        final = self.final("onnx", "int8")
        if keep:
            model = onnx.load(str(result.path))
            rec = self.record("onnx", "int8", final, {**metrics, "gate": gate.as_dict(self.o.allow_accuracy_drop)},
                              calibration=self.calibration_record({"tool": "onnxruntime", "method": recipe.method}),
                              quantization=self.qdq_record, onnx=self._onnx_info(model),
                              verification={**self.vset.record(), "runtime": "onnxruntime CPUExecutionProvider"})
            write_onnx_artifact(model, final, rec)
        self.add("onnx", "int8", final, keep, metrics, gate)

    def openvino(self, precision: str) -> None:
        from resunetpp.export import openvino_format as ovx

        final = self.final("openvino", precision)
        extra: dict = {}
        if precision == "int8" and self.o.openvino_int8 == "qdq":
            ov_model, extra = self._from_qdq()
        else:
            ov_model = ovx.convert_onnx(self.int8_source()[0] if precision == "int8" else self.onnx_paths["fp32"])
            if precision == "int8":
                ov_model, extra = self._nncf(ov_model)
        with ovx.staged_ir(final) as stage:
            ovx.save_ir(ov_model, stage.xml, compress_to_fp16=precision == "fp16")
            with self.staged(stage.xml, "openvino", precision) as predict:
                metrics = self.measure(f"OpenVINO {precision.upper()} IR (CPU, f32 hint)", predict, precision)
            gate, keep = self.judge("openvino", precision, metrics)
            if keep:
                rec = self.record("openvino", precision, final, {**metrics, "gate": gate.as_dict(self.o.allow_accuracy_drop)},
                                  openvino={"weights": "fp16" if precision == "fp16" else ("int8" if precision == "int8"
                                                                                          else "fp32"),
                                            "bin": final.with_suffix(".bin").name, **ovx.cpu_description()},
                                  verification={**self.vset.record(), "runtime": "OpenVINO CPU plugin"}, **extra)
                write_sidecar(final, rec)
            else:
                stage.discard()
        self.add("openvino", precision, final, keep, metrics, gate)

    def _from_qdq(self):
        """The INT8 IR converted from the Q/DQ ONNX: OpenVINO turns each Q/DQ pair into a
        FakeQuantize and runs the convolutions in INT8 (low-precision transformations)."""
        from resunetpp.export import openvino_format as ovx

        self._ensure_source("int8_qdq")
        with self.r.task("convert the INT8 Q/DQ ONNX to OpenVINO IR"):
            ov_model = ovx.convert_onnx(self.onnx_paths["int8_qdq"])
        fq = sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ordered_ops())
        calib = self.calibration_record({"tool": "onnxruntime", "method": self.o.qdq.method})
        return ov_model, {"calibration": calib,
                          "quantization": {**self.qdq_record, "openvino": "converted from the INT8 Q/DQ ONNX",
                                           "fake_quantize_ops": fq}}

    def _nncf(self, ov_model):
        from resunetpp.export.quantize import quantize_openvino
        from resunetpp.imageio import read_image

        pre = self.pre
        n = self.o.batch or 1  # a static-batch graph takes exactly n images per call
        paths = list(self.calib.paths)
        groups = [paths[i:i + n] for i in range(0, len(paths), n)]
        groups[-1] = groups[-1] + [groups[-1][-1]] * (n - len(groups[-1]))

        def load(group: list[Path]) -> np.ndarray:
            return np.stack([pre.apply(read_image(p, pre.channels)) for p in group])

        recipe = replace(self.o.nncf, subset_size=len(groups))
        with self.r.task(f"quantize OpenVINO IR (NNCF, {recipe.preset} preset, {len(paths)} images)"):
            result = quantize_openvino(ov_model, self.int8_source()[1], groups, load, recipe)
        calib = self.calibration_record({"tool": "nncf", "preset": recipe.preset,
                                         "range_estimator": recipe.range_estimator})
        return result.model, {"calibration": calib, "quantization": {**result.record(), **self._source_record()}}

    def tensorrt(self, precisions: list[str], trt_version: str) -> None:
        from resunetpp.export import tensorrt_format as trtx

        t = self.o.tensorrt
        shapes = trtx.profile_shapes(self.spec, max_batch=t.max_batch, opt_batch=t.opt_batch)
        folder = self.o.out / "tensorrt"
        timing = folder / "timing.cache"
        for precision in precisions:
            plan = trtx.plan_build(trt_version, precision, calibrator=t.calibrator, fp16_mode=t.fp16_mode,
                                   dla_core=t.dla_core)
            self._ensure_source(plan.source)
            src = self.onnx_paths[plan.source]
            final = self.final("tensorrt", precision)
            calib_cache = folder / "calibration.cache" if plan.calibrator else None
            line = trtx.trtexec_command(plan, src, final, shapes, workspace_mib=t.workspace_mib,
                                        timing_cache=timing, calibration_cache=calib_cache)
            self.r.info(f"tensorrt {precision}: {plan.description}\n  equivalent: {line}")
            batches = None
            if plan.calibrator:
                batches = list(_batches(self.calib.inputs(self.pre), shapes.opt[0], fixed=True))
            staged = self.work / final.name  # built and verified here, moved into place once its sidecar is written
            try:
                with atomic_path(final) as tmp:
                    with self.r.task(f"build TensorRT {precision} engine"):
                        facts = trtx.build_engine(plan, src, staged, shapes, workspace_mib=t.workspace_mib,
                                                  timing_cache=timing, calibration_batches=batches,
                                                  calibration_cache=calib_cache)
                    with self.staged(staged, "tensorrt", precision, tensorrt=facts) as predict:
                        metrics = self.measure(f"TensorRT {precision} engine", predict, precision)
                    gate, keep = self.judge("tensorrt", precision, metrics)
                    if not keep:
                        raise _Refused
                    rec = self.record("tensorrt", precision, final,
                                      {**metrics, "gate": gate.as_dict(self.o.allow_accuracy_drop)},
                                      tensorrt={**facts, "plan": plan.as_dict(), "profile": shapes.as_dict(),
                                                "source_onnx": src.name, "timing_cache": str(timing),
                                                "calibration_cache": str(calib_cache) if calib_cache else None,
                                                "trtexec": line},
                                      verification={**self.vset.record(), "runtime": "TensorRT"},
                                      **self._trt_int8_extra(precision, plan))
                    os.replace(staged, tmp)
                    write_sidecar(final, rec)
            except _Refused:
                self.add("tensorrt", precision, final, False, metrics, gate)
                continue
            self.add("tensorrt", precision, final, True, metrics, gate)

    def _trt_int8_extra(self, precision: str, plan) -> dict:
        if precision != "int8":
            return {}
        tool = "tensorrt IInt8EntropyCalibrator2" if plan.calibrator else "onnxruntime"
        return {"calibration": self.calibration_record({"tool": tool, "method": "entropy" if plan.calibrator
                                                        else self.o.qdq.method}),
                "quantization": None if plan.calibrator else self.qdq_record}

    def _ensure_source(self, source: str) -> None:
        if source in self.onnx_paths:
            return
        if source == "fp16":
            self.onnx_fp16(write=False)
        elif source == "int8_qdq":
            self.onnx_int8(write=False)

    def trtexec_hints(self, precisions: list[str]) -> None:
        """Without TensorRT here: the trtexec lines that build the engines from the written ONNX files."""
        from resunetpp.export import tensorrt_format as trtx

        t = self.o.tensorrt
        shapes = trtx.profile_shapes(self.spec, max_batch=t.max_batch, opt_batch=t.opt_batch)
        for precision in precisions:
            plan = trtx.plan_build("10", precision, dla_core=t.dla_core if precision != "fp32" else None)
            src = {"fp32": self.final("onnx", "fp32"), "fp16": self.final("onnx", "fp16"),
                   "int8_qdq": self.final("onnx", "int8")}[plan.source]
            if src.is_file():
                engine = Path("tensorrt") / f"model_{precision}.engine"
                self.report.trtexec.append(
                    "# on the target (TensorRT 10; drop --stronglyTyped on 11): "
                    + trtx.trtexec_command(plan, src.name, engine, shapes, workspace_mib=t.workspace_mib,
                                           timing_cache=Path("tensorrt") / "timing.cache"))


def _remove_stale(path: Path) -> None:
    """A refused artifact must not leave an earlier export's file under its name."""
    from resunetpp.artifact import sidecar_path

    for p in (path, path.with_suffix(".bin") if path.suffix == ".xml" else None, sidecar_path(path)):
        if p is not None and p.is_file():
            p.unlink()


def _remove_empty_folders(out: Path) -> None:
    for sub in ("openvino", "tensorrt"):
        with contextlib.suppress(OSError):
            (out / sub).rmdir()  # only succeeds when empty


LOCK_NAME = ".export.lock"


class _OutLock:
    """An exclusive ``flock`` on ``out/.export.lock`` for one export; the file is removed on release.

    A second export into the same folder waits for the first, so an artifact and its sidecar (an
    IR's ``.xml`` and ``.bin``) always come from the same export and no export removes a folder
    another is writing into. The lock dies with its process (a killed export blocks nothing); a
    waiter that wakes on a lock file already removed takes the new one instead.
    """

    def __init__(self, out: Path, reporter: Reporter) -> None:
        self.path = out / LOCK_NAME
        self.handle = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, exports are not serialized
            return
        waited = False
        while self.handle is None:
            handle = open(self.path, "a+b")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    reporter.info(f"waiting for another export into {out} to finish")
                    waited = True
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.handle = handle
            else:
                handle.close()

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.handle.close()
            self.handle = None


class _Refused(Exception):
    """Internal: leave an atomic write without renaming (artifact failed its gate)."""


def run_export(options: ExportOptions, reporter: Reporter | None = None) -> ExportReport:
    """Export ``options.checkpoint`` to ``options.out``; see the module docstring.

    Returns the report; call :meth:`ExportReport.raise_for_gate` to turn refused artifacts into an
    error (the CLI does, after printing the summary).
    """
    from resunetpp.export.tensorrt_format import tensorrt_status

    reporter = reporter or NullReporter()
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ResUNetError(f"{out}: --out exists and is not a folder")
    trt_ok, trt_info = tensorrt_status()
    targets, skipped = _parse_targets(options, trt_ok, trt_info, options.calib is not None)
    need_eval = any(p == "int8" for _, p in targets)
    out.mkdir(parents=True, exist_ok=True)
    lock = _OutLock(out, reporter)
    if lock.handle is not None:  # holding the lock, any work folder here was left by a killed export
        for stale in out.glob(".export-work-*"):
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".export-work-", dir=out))
    try:
        run = _Run(replace(options, out=out), reporter, work)
        run.report.skipped = skipped
        run.calib, run.eval = _image_sets(options, need_eval)
        if run.calib is not None and len(run.calib) < cal.MIN_CALIB_COUNT:
            run.warn(f"calibration set has {len(run.calib)} images; at least {cal.MIN_CALIB_COUNT} are recommended "
                     f"({cal.DEFAULT_CALIB_COUNT} by default)")
        run.vset = _verification_set(run.ckpt, run.pre, run.calib, run.eval, options.eval_count)
        run.report.verification = run.vset.record()
        _execute(run, targets, trt_info)
        run.report.verification = run.vset.record()  # now with the INT8 reference, when there is one
        write_json_atomic(out / REPORT_NAME, run.report.as_dict())
        return run.report
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _remove_empty_folders(out)
        lock.close()


def _execute(run: _Run, targets: list[tuple[str, str]], trt_info: str) -> None:
    want = set(targets)
    run.reference()
    run.onnx_fp32(write=("onnx", "fp32") in want)
    if ("onnx", "fp16") in want:
        run.onnx_fp16(write=True)
    if ("onnx", "int8") in want:
        run.onnx_int8(write=True)
    for precision in PRECISIONS:
        if ("openvino", precision) in want:
            run.openvino(precision)
    trt = [p for p in PRECISIONS if ("tensorrt", p) in want]
    if trt:
        run.tensorrt(trt, trt_info)
    skipped_trt = [p for f, p, _ in run.report.skipped if f == "tensorrt"]
    if skipped_trt:
        run.trtexec_hints(skipped_trt)


__all__ = ["AccuracyGateError", "ArtifactResult", "ExportOptions", "ExportReport", "FORMATS", "PRECISIONS",
           "TensorRTOptions", "artifact_name", "run_export"]
