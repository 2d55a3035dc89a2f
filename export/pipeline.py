"""What ``resunetpp export`` runs: checkpoint -> verified ONNX / OpenVINO / TensorRT artifacts.

Order of work: load the checkpoint and the image sets (all argument and file errors surface
before anything heavy runs) -> PyTorch FP32 reference outputs on the verification images ->
ONNX FP32 (verified against PyTorch, dynamic axes exercised; the export stops if it does not
match) -> each registered format's step in its order (:mod:`resunetpp.export.formats`; ONNX FP16 and INT8
Q/DQ -> OpenVINO IR FP32/FP16/INT8 -> TensorRT engines), a format's module declaring what it builds,
where its artifacts go, which engine verifies them and whether this machine can build it.

Every artifact is verified before it is written: FP32 within
:data:`resunetpp.export.verify.FP32_MAX_ABS_ERROR` of PyTorch, FP16 finite and Dice vs reference >=
:data:`resunetpp.export.verify.FP16_MIN_DICE`, INT8 Dice vs reference >= :data:`resunetpp.export.verify.INT8_MIN_DICE`
on held-out images. An artifact that fails its gate is not written (unless
``allow_accuracy_drop``) and :meth:`ExportReport.raise_for_gate` raises after the others are
done. Intermediate graphs live in a hidden work folder inside ``out`` that is always removed;
every final file is written under a temporary name and renamed, its sidecar first.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from resunetpp.export import calibration as cal
from resunetpp.export import onnx_format
from resunetpp.export.context import ExportRun
from resunetpp.export.formats import PRECISIONS, artifact_name, export_formats, format_names, get_precision
from resunetpp.export.inputs import image_sets, verification_set
from resunetpp.export.options import OPENVINO_INT8_SOURCES, ExportOptions, TensorRTOptions
from resunetpp.export.outdir import LOCK_NAME, remove_empty_folders, remove_stale_work
from resunetpp.export.report import NullReporter, Reporter, TimedReporter
from resunetpp.export.results import AccuracyGateError, ArtifactResult, ExportReport
from resunetpp.atomic import clean_stale_temporaries, make_output_folder, write_json_atomic
from resunetpp.errors import ResUNetError
from resunetpp.locking import OutLock

REPORT_NAME = "export_report.json"


def _parse_targets(options: ExportOptions,
                   has_calib: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """``(format, precision)`` pairs to build, in build order, and ``(format, precision, why)`` skipped."""
    known = format_names()
    formats = options.formats or tuple(f.name for f in export_formats() if f.default)
    precisions = options.precisions or PRECISIONS
    for f in formats:
        if f not in known:
            raise ResUNetError(f"unknown format {f!r} (choose from {', '.join(known)})")
    for p in precisions:
        if p not in PRECISIONS:
            raise ResUNetError(f"unknown precision {p!r} (choose from {', '.join(PRECISIONS)})")
    targets, skipped = [], []
    for fmt in export_formats():
        f = fmt.name
        if f not in formats:
            continue
        unavailable = fmt.unavailable()
        for p in fmt.precisions:
            if p not in precisions:
                continue
            why = fmt.skip(options, p) if fmt.skip is not None else None
            if unavailable is not None:
                if options.formats:
                    raise ResUNetError(f"--format {f}: {unavailable}")
                skipped.append((f, p, unavailable))
            elif get_precision(p).needs_calibration and not has_calib:
                if options.precisions:
                    raise ResUNetError(f"--precision {p} needs calibration images: pass --calib DIR")
                skipped.append((f, p, "needs calibration images (--calib)"))
            elif why is not None:
                skipped.append((f, p, why))
            else:
                targets.append((f, p))
    if not targets:
        raise ResUNetError("nothing to export: " + "; ".join(f"{f} {p}: {r}" for f, p, r in skipped))
    return targets, skipped


def run_export(options: ExportOptions, reporter: Reporter | None = None) -> ExportReport:
    """Export ``options.checkpoint`` to ``options.out``; see the module docstring.

    Returns the report; call :meth:`ExportReport.raise_for_gate` to turn refused artifacts into an
    error (the CLI does, after printing the summary).
    """
    reporter = TimedReporter(reporter or NullReporter())
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ResUNetError(f"{out}: --out exists and is not a folder")
    targets, skipped = _parse_targets(options, options.calib is not None)
    need_eval = any(get_precision(p).needs_calibration for _, p in targets)
    calib, evaluation = image_sets(options, need_eval)  # a bad --calib / --eval is refused before --out exists
    make_output_folder(out)
    lock = OutLock(out, LOCK_NAME, what="export", on_wait=reporter.info)
    if lock.held:  # holding the lock, any work folder or temporary here was left by a killed export
        remove_stale_work(out)
        clean_stale_temporaries(out, recursive=True)
    work = Path(tempfile.mkdtemp(prefix=".export-work-", dir=out))
    try:
        run = ExportRun(replace(options, out=out), reporter, work)
        run.report.skipped = skipped
        run.calib, run.eval = calib, evaluation
        if run.calib is not None and len(run.calib) < cal.MIN_CALIB_COUNT:
            run.warn(f"calibration set has {len(run.calib)} images; at least {cal.MIN_CALIB_COUNT} are recommended "
                     f"({cal.DEFAULT_CALIB_COUNT} by default)")
        run.vset = verification_set(run.ckpt, run.pre, run.calib, run.eval, options.eval_count)
        run.report.verification = run.vset.record()
        _execute(run, targets)
        run.report.verification = run.vset.record()  # now with the INT8 reference, when there is one
        run.report.timing = {"total_s": round(reporter.elapsed(), 2), "steps": reporter.steps}
        write_json_atomic(out / REPORT_NAME, run.report.as_dict())
        return run.report
    finally:
        shutil.rmtree(work, ignore_errors=True)
        remove_empty_folders(out, _subfolders())
        lock.close()


def _subfolders() -> list[str]:
    """The folders of ``--out`` artifacts are written into (``openvino``, ``tensorrt``)."""
    return sorted({str(Path(name).parent) for f in export_formats() for name in f.files.values()} - {"."})


def _execute(run: ExportRun, targets: list[tuple[str, str]]) -> None:
    want = set(targets)
    if ("onnx", "fp32") in want:
        run.reference()
    else:  # every artifact is built from the FP32 ONNX: checked against PyTorch, it gives the reference
        run.reference(onnx_format.INTERMEDIATE_CHECK_IMAGES)
        onnx_format.fp32(run, write=False)
    for fmt in export_formats():
        precisions = [p for p in fmt.precisions if (fmt.name, p) in want]
        if precisions:
            fmt.build(run, precisions)
    for fmt in export_formats():
        skipped = [p for f, p, _ in run.report.skipped if f == fmt.name]
        if skipped and fmt.skipped is not None:
            fmt.skipped(run, skipped)


def __getattr__(name: str) -> Any:
    if name == "FORMATS":  # the registered formats (export.formats), computed on access
        return format_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OPENVINO_INT8_SOURCES", "REPORT_NAME", "AccuracyGateError", "ArtifactResult", "ExportOptions",
           "ExportReport", "FORMATS", "PRECISIONS", "TensorRTOptions", "artifact_name", "run_export"]
