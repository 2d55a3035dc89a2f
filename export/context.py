"""One export in progress: its options, checkpoint, geometry, image sets, work folder and report,
and what every format's steps share -- the metadata record, verification through an engine, the
gate's verdict, the report entry. The steps themselves live with their format
(:mod:`resunetpp.export.onnx_format`, :mod:`resunetpp.export.openvino_format`, :mod:`resunetpp.export.tensorrt_format`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from resunetpp.export import calibration as cal
from resunetpp.export.fp16 import FP16Result
from resunetpp.export.formats import get_format
from resunetpp.export.inputs import VERIFY_BATCH, VerificationSet, batches
from resunetpp.export.onnx_graph import ShapeSpec
from resunetpp.export.options import ExportOptions
from resunetpp.export.outdir import remove_stale
from resunetpp.export.report import Reporter
from resunetpp.export.results import ArtifactResult, ExportReport
from resunetpp.export.verify import (Gate, PredictFn, artifact_predict, compare_outputs, engine_predict, gate_for,
                                     predict_batched)
from resunetpp.checkpoint import Checkpoint, load_checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.preprocess import Preprocessing


class ExportRun:
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
        self.source_cache_key: dict | None = None  # what int8_source_model depends on (calibration cache)
        self.calib_arrays: list | None = None  # the preprocessed calibration images, once decoded
        self.equalization_record: dict | None = None
        #: ({convolution: input range}, {convolution: per-image ranges}) from the one calibration pass
        self.conv_ranges: tuple[dict, dict] | None = None
        self.bias_correction_record: dict | None = None
        self.calib: cal.ImageSet | None = None  # set by the pipeline once the options are checked
        self.eval: cal.ImageSet | None = None
        self.vset: VerificationSet | None = None

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

    def staged(self, path: Path, fmt: str, precision: str, options: dict | None = None,
               **extra: object) -> contextlib.AbstractContextManager[PredictFn]:
        """``predict`` of an artifact not yet written (no sidecar): opened as an engine of the backend
        that verifies ``fmt`` (with its verification options, ``options`` over them), on the record the
        artifact will have, less its accuracy; a context manager."""
        f = get_format(fmt)
        record = self.record(fmt, precision, path, None, **extra)
        return artifact_predict(path, f.backend, record, **{**f.verify_options, **(options or {})})

    def measure(self, label: str, predict: Callable[[np.ndarray], np.ndarray], precision: str = "fp32",
                images: int | None = None) -> dict:
        """Metrics of ``predict`` against the reference on the verification images (the first
        ``images`` of them when given)."""
        v = self.vset
        reference = v.int8_reference if precision == "int8" and v.int8_reference is not None else v.reference
        n = len(v.inputs) if images is None else min(images, len(v.inputs))
        with self.r.task(f"verify {label}", total=n) as advance:
            outputs = self._predict_all(predict, v.inputs[:n], advance)
        return compare_outputs(outputs, reference[:n], masks=v.masks[:n], pre=self.pre, sizes=v.sizes[:n],
                               names=v.names[:n], num_classes=self.ckpt.config.num_classes)

    def _predict_all(self, predict: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray],
                     advance: Callable[[int], None]) -> list[np.ndarray]:
        """``predict`` over ``inputs`` in this export's verification batches, ``advance`` after each."""
        def counted(x: np.ndarray) -> np.ndarray:
            out = predict(x)
            advance(len(x))
            return out

        return predict_batched(counted, inputs, VERIFY_BATCH, self.o.batch)

    def judge(self, fmt: str, precision: str, metrics: dict) -> tuple[Gate, bool]:
        """The gate's outcome and whether the artifact is written."""
        gate = gate_for(precision, metrics, self.o.int8_max_disagreement, self.o.int8_min_image_dice)
        keep = gate.passed or self.o.allow_accuracy_drop
        if not gate.passed:
            (self.warn if keep else self.r.warn)(f"{fmt} {precision}: {gate.reason}"
                                                 + (" (kept: --allow-accuracy-drop)" if keep else " -- not written"))
        return gate, keep

    def add(self, fmt: str, precision: str, path: Path, written: bool, metrics: dict, gate: Gate) -> None:
        files = get_format(fmt).artifact_files(path)
        size = None
        if not written:
            remove_stale(files)
        else:
            size = sum(f.stat().st_size for f in files)
        self.report.artifacts.append(ArtifactResult(fmt, precision, path, written, size, metrics,
                                                    gate.as_dict(self.o.allow_accuracy_drop)))

    def final(self, fmt: str, precision: str) -> Path:
        return self.o.out / get_format(fmt).artifact_name(precision)

    # -- the FP32 reference every artifact is compared with --
    def reference(self, images: int | None = None) -> None:
        """PyTorch's FP32 outputs on the verification images -- only the first ``images`` of them when
        given: the FP32 graph is checked on those and then gives the rest (:meth:`graph_reference`)."""
        v = self.vset
        inputs = v.inputs if images is None else v.inputs[:images]
        v.reference[:] = self._reference(self.ckpt, "PyTorch FP32 reference", inputs)
        if self.ref_ckpt is not None:
            v.int8_reference = self._reference(self.ref_ckpt,
                                               f"PyTorch FP32 reference for INT8 ({self.o.reference.name})", v.inputs)
            v.int8_reference_record = {"path": str(self.o.reference), "sha256": self.ref_ckpt.sha256}

    def graph_reference(self, predict: PredictFn, graph_sha256: str, checked: int) -> None:
        """The FP32 reference on every verification image from the FP32 ONNX graph on ONNX Runtime (its
        ``predict``), once that graph matched PyTorch on the first ``checked`` images: ONNX Runtime runs
        the graph in 0.2 s an image on the 2-core box, PyTorch the model in 0.32. Cached like PyTorch's."""
        import onnxruntime as ort

        v = self.vset
        key = {"graph": graph_sha256, "inputs": _digest(v.inputs), "onnxruntime": ort.__version__}
        label = "FP32 reference: the FP32 ONNX graph (ONNX Runtime)"

        v.reference[:] = self._cached_outputs("graph-reference-outputs", key, v.inputs, label,
                                              lambda advance: self._predict_all(predict, v.inputs, advance))
        v.reference_record = {"reference": "the FP32 ONNX graph on ONNX Runtime", "graph_sha256": graph_sha256,
                              "checked_against_pytorch": checked}

    def _reference(self, ckpt: Checkpoint, label: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """:meth:`_torch_outputs` on ``inputs``, from the cache of :mod:`resunetpp.cache` when it has them
        for this checkpoint and these exact inputs (and this torch)."""
        import torch

        key = {"model": ckpt.sha256, "inputs": _digest(inputs), "torch": torch.__version__, "layout": "channels_last"}
        return self._cached_outputs("reference-outputs", key, inputs, label,
                                    lambda advance: self._torch_outputs(ckpt, inputs, advance))

    def _cached_outputs(self, kind: str, key: dict, inputs: list[np.ndarray], label: str,
                        compute: Callable) -> list[np.ndarray]:
        """``compute(advance)``'s outputs on ``inputs``, or the cache's entry ``kind`` / ``key`` when it
        holds one float32 output of the right size for each input (checked when read)."""
        names = {str(i) for i in range(len(inputs))}
        if self.o.cache:
            from resunetpp import cache

            def expect(arrays: dict) -> str | None:
                if set(arrays) != names:
                    return "not these images"
                if any(arrays[str(i)].shape[-2:] != x.shape[-2:] or arrays[str(i)].dtype != np.float32
                       for i, x in enumerate(inputs)):
                    return "outputs of another shape"
                return None

            arrays = cache.load(kind, key, warn=self.warn, expect=expect)
            if arrays is not None:
                with self.r.task(f"{label} (cached)"):
                    return [arrays[str(i)] for i in range(len(inputs))]
        with self.r.task(label, total=len(inputs)) as advance:
            out = compute(advance)
        if self.o.cache:
            from resunetpp import cache

            cache.store(kind, key, {str(i): np.asarray(o, dtype=np.float32) for i, o in enumerate(out)})
        return out

    def _torch_outputs(self, ckpt: Checkpoint, inputs: list[np.ndarray], advance) -> list[np.ndarray]:
        """The checkpoint's probabilities on ``inputs``, as the torch engine gives them (channels-last
        memory format: about 1.7x faster than NCHW on the 2-core box, 0.32 against 0.53 s an image, with
        probabilities within 3e-6 of NCHW's)."""
        from resunetpp import engines

        out: list[np.ndarray] = []
        with engines.open(ckpt, device="cpu", channels_last=True) as engine:
            predict = engine_predict(engine)
            for x in batches(inputs, VERIFY_BATCH, fixed=False):
                out.extend(predict(x))
                advance(len(x))
        return out

    def export_onnx(self, module, label: str, key: dict | None):
        """:func:`resunetpp.export.onnx_graph.export_onnx` of ``module`` with this export's geometry and
        graph options, from the cache of :mod:`resunetpp.cache` when ``key`` (what ``module``'s weights
        depend on) names a graph exported before with the same torch/onnx versions; a cached graph is
        parsed and run through ``onnx.checker`` before use, and verified like a fresh one after."""
        import onnx
        import torch

        from resunetpp.export import onnx_graph

        full = None
        if key is not None and self.o.cache:
            from resunetpp import cache

            full = {**key, "opset": self.o.opset, "simplify": self.o.simplify, "spec": self.spec.record(),
                    "torch": torch.__version__, "onnx": onnx.__version__}
            arrays = cache.load("onnx-graph", full, warn=self.warn,
                                expect=lambda a: None if set(a) == {"model"} and a["model"].dtype == np.uint8
                                else "not an ONNX graph")
            if arrays is not None:
                try:
                    model = onnx.load_from_string(arrays["model"].tobytes())
                    onnx.checker.check_model(model)
                except Exception as e:  # noqa: BLE001 -- any parse/check failure: recompute
                    self.warn(f"ignoring a cached ONNX graph ({type(e).__name__}); exporting again")
                else:
                    with self.r.task(f"{label} (cached graph)"):
                        return model
        with self.r.task(label):
            model = onnx_graph.export_onnx(module, self.spec, opset=self.o.opset, simplify=self.o.simplify)
        if full is not None:
            from resunetpp import cache

            cache.store("onnx-graph", full, {"model": np.frombuffer(model.SerializeToString(), dtype=np.uint8)})
        return model

    def calibration_record(self, method: dict) -> dict:
        assert self.calib is not None and self.eval is not None
        rec = self.calib.record()
        rec["method"] = method
        rec["held_out_evaluation"] = self.eval.record()
        return rec


def _digest(inputs: list[np.ndarray]) -> str:
    """sha256 over the inputs' shapes and float32 bytes (what a cached output is keyed by)."""
    import hashlib

    digest = hashlib.sha256()
    for x in inputs:
        digest.update(str(x.shape).encode())
        digest.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return digest.hexdigest()


__all__ = ["ExportRun"]
