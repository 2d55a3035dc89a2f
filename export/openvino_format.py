"""OpenVINO IR (FP32, FP16-compressed; INT8 converted from the Q/DQ ONNX or quantized by NNCF).

The IR is converted from the verified ONNX graph (``ov.convert_model``), so all formats share one
graph and its dynamic axes. ``ov.save_model`` writes ``.xml`` + ``.bin``; :func:`staged_ir` saves
them into a hidden temporary folder beside the target, and after verification moves the
``.bin`` and then the ``.xml`` into place, the sidecar written before either -- an interrupted
export leaves no IR under a final name.

Verification runs the IR as an OpenVINO engine (:mod:`resunetpp.engines.openvino_engine`) on the
CPU plugin with ``INFERENCE_PRECISION_HINT=f32`` (the engine's ``precision="f32"``): the plugin's
default on CPUs with bf16 support (this AMD EPYC) is bf16, which would blur the comparison with
PyTorch FP32. FP16 IR weights are decompressed to FP32 at load time on CPU, so its check measures
the weight rounding; the INT8 IR's non-quantized parts also run in FP32 under the same hint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from resunetpp.export import onnx_format
from resunetpp.export.formats import ExportFormat, register_format
from resunetpp.export.int8_source import calibration_method, int8_source, source_record
from resunetpp.artifact import write_sidecar

if TYPE_CHECKING:
    from resunetpp.export.context import ExportRun

#: The FP32 IR is verified, and run by the engine, with this hint (FP32 is FP32: never bf16).
VERIFY_PRECISION_HINT = "f32"


def verify_hint(precision: str) -> str:
    """The ``INFERENCE_PRECISION_HINT`` an IR of ``precision`` is verified with, and which the engine
    then runs it with (its record names it): f32 for FP32 and FP16 (FP16 weights, f32 arithmetic: the
    FP16 artifact's tolerance; bf16 arithmetic is the ``bf16`` hint's row on an FP32 IR), and for INT8
    the CPU plugin's default on this machine -- bf16 on CPUs with AVX-512 BF16 or AMX, f32 elsewhere:
    the INT8 IR's float layers at the speed a deployment gets by default, certified by its gate."""
    if precision != "int8":
        return VERIFY_PRECISION_HINT
    from resunetpp.engines.openvino_engine import cpu_properties

    default = str((cpu_properties() or {}).get("default_inference_precision") or "f32").lower()
    return {"bf16": "bf16", "f16": "f16"}.get(default, "f32")


def convert_onnx(onnx_path: str | Path):
    """``ov.Model`` from an ONNX file (dynamic axes kept)."""
    import openvino as ov

    return ov.convert_model(str(onnx_path))


@dataclass
class Stage:
    """A temporary IR location; :meth:`discard` keeps it from being moved into place."""

    xml: Path
    keep: bool = True

    def discard(self) -> None:
        self.keep = False


@contextlib.contextmanager
def staged_ir(xml_path: str | Path) -> Iterator[Stage]:
    """Yield a :class:`Stage` in a hidden temporary folder beside ``xml_path``; on success (unless
    discarded) move its ``.bin`` and then its ``.xml`` onto ``xml_path``. The folder is removed
    in every case, an interruption included."""
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{xml_path.stem}.{os.getpid()}-", suffix=".partial", dir=xml_path.parent))
    stage = Stage(tmp_dir / xml_path.name)
    try:
        yield stage
        if stage.keep:
            os.replace(stage.xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
            os.replace(stage.xml, xml_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_ir(ov_model, xml_path: str | Path, *, compress_to_fp16: bool) -> Path:
    import openvino as ov

    ov.save_model(ov_model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return Path(xml_path)


def cpu_description(hint: str) -> dict:
    """The CPU the IR was verified on, the plugin's default inference precision there and the hint
    the IR was verified with (``hint``; the engine runs it with that one)."""
    from resunetpp.engines.openvino_engine import cpu_properties

    props = cpu_properties() or {}
    return {"device": props.get("device"), "default_inference_precision": props.get("default_inference_precision"),
            "verified_with_precision_hint": hint}


# ---- the export steps ----------------------------------------------------------------------------------
def build(run: ExportRun, precisions: list[str]) -> None:
    """Convert, verify and write the IRs of ``precisions``."""
    for precision in precisions:
        _ir(run, precision)


def _ir(run: ExportRun, precision: str) -> None:
    final = run.final("openvino", precision)
    extra: dict = {}
    if precision == "int8" and run.o.openvino_int8 == "qdq":
        ov_model, extra = _from_qdq(run)
    else:
        ov_model = convert_onnx(int8_source(run)[0] if precision == "int8" else run.onnx_paths["fp32"])
        if precision == "int8":
            ov_model, extra = _nncf(run, ov_model)
    hint = verify_hint(precision)
    with staged_ir(final) as stage:
        save_ir(ov_model, stage.xml, compress_to_fp16=precision == "fp16")
        with run.staged(stage.xml, "openvino", precision, options={"precision": hint}) as predict:
            metrics = run.measure(f"OpenVINO {precision.upper()} IR (CPU, {hint} hint)", predict, precision)
        gate, keep = run.judge("openvino", precision, metrics)
        if keep:
            rec = run.record("openvino", precision, final, {**metrics, "gate": gate.as_dict(run.o.allow_accuracy_drop)},
                             openvino={"weights": "fp16" if precision == "fp16" else ("int8" if precision == "int8"
                                                                                     else "fp32"),
                                       "bin": final.with_suffix(".bin").name, **cpu_description(hint)},
                             verification={**run.vset.record(), "runtime": "OpenVINO CPU plugin"}, **extra)
            write_sidecar(final, rec)
        else:
            stage.discard()
    run.add("openvino", precision, final, keep, metrics, gate)


def _from_qdq(run: ExportRun):
    """The INT8 IR converted from the Q/DQ ONNX: OpenVINO turns each Q/DQ pair into a
    FakeQuantize and runs the convolutions in INT8 (low-precision transformations)."""
    import onnx

    from resunetpp.export.unsigned import unsigned_nonnegative

    onnx_format.ensure_source(run, "int8_qdq")
    with run.r.task("convert the INT8 Q/DQ ONNX to OpenVINO IR (non-negative inputs unsigned)"):
        graph = onnx.load(str(run.onnx_paths["int8_qdq"]))
        unsigned = unsigned_nonnegative(graph)
        path = run.work / "int8_qdq_openvino.onnx"
        onnx.save_model(graph, str(path))
        ov_model = convert_onnx(path)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ordered_ops())
    calib = run.calibration_record(calibration_method(run))
    return ov_model, {"calibration": calib,
                      "quantization": {**run.qdq_record, "openvino": "converted from the INT8 Q/DQ ONNX",
                                       "fake_quantize_ops": fq,
                                       "unsigned_inputs": {
                                           "tensors": len(unsigned),
                                           "why": "non-negative by construction: unsigned INT8, same step, zero "
                                                  "point 0 (no +128 shift, no 16-bit saturation on CPUs without "
                                                  "VNNI); resunetpp.export.unsigned"}}}


def _nncf(run: ExportRun, ov_model):
    from resunetpp.export.quantize import quantize_openvino
    from resunetpp.imageio import read_image

    pre = run.pre
    n = run.o.batch or 1  # a static-batch graph takes exactly n images per call
    paths = list(run.calib.paths)
    groups = [paths[i:i + n] for i in range(0, len(paths), n)]
    groups[-1] = groups[-1] + [groups[-1][-1]] * (n - len(groups[-1]))

    def load(group: list[Path]) -> np.ndarray:
        return np.stack([pre.apply(read_image(p, pre.channels)) for p in group])

    recipe = replace(run.o.nncf, subset_size=len(groups))
    with run.r.task(f"quantize OpenVINO IR (NNCF, {recipe.preset} preset, {len(paths)} images)"):
        result = quantize_openvino(ov_model, int8_source(run)[1], groups, load, recipe)
    calib = run.calibration_record({"tool": "nncf", "preset": recipe.preset,
                                    "range_estimator": recipe.range_estimator})
    return result.model, {"calibration": calib, "quantization": {**result.record(), **source_record(run)}}


FORMAT = register_format(ExportFormat(
    name="openvino", order=10, build=build, backend="openvino",
    verify_options={"precision": VERIFY_PRECISION_HINT}, companions=(".bin",),
    description="OpenVINO IR (.xml + .bin), verified on the CPU plugin with f32 float ops",
    files={p: f"openvino/model_{p}.xml" for p in ("fp32", "fp16", "int8")}))
