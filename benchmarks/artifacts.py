"""What the benchmark runs on: evaluation / calibration images, and the exported-artifact cache.

Images (:func:`plan_images`): evaluation and INT8 calibration sets never share an image (by file
stem or content). For the shipped default model without ``--calib``, the shipped sample images
are split deterministically -- the first half (``val.txt`` order) is evaluated, the second half
calibrates.

Artifacts (:func:`ensure_artifacts`): exported by :func:`resunetpp.export.pipeline.run_export` into
``~/.cache/resunetpp/artifacts/<key>/`` (or ``--artifacts DIR``), where the key hashes the
checkpoint's SHA-256, the preprocessing (input size), the calibration set's digest and the tool
versions (:func:`artifact_key`). A marker file written last lists what a folder holds under
which key, so an interrupted export is redone, and a later run reuses what is there and exports
only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from resunetpp.export import calibration as cal
from resunetpp.export.report import Reporter
from resunetpp.atomic import write_json_atomic, write_text_atomic
from resunetpp.checkpoint import Checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.preprocess import Preprocessing

MARKER = "bench_artifacts.json"
CALIB_SPLIT_FILE = "bench_calibration.txt"
EVAL_SPLIT_FILE = "bench_evaluation.txt"


# ---- images ------------------------------------------------------------------------------------------
def subset(images: cal.ImageSet, keep: Sequence[int], role: str) -> cal.ImageSet:
    """The images of ``images`` at indices ``keep`` (in that order), as a set of its own."""
    return dataclasses.replace(images, role=role, paths=tuple(images.paths[i] for i in keep),
                               mask_paths=tuple(images.mask_paths[i] for i in keep),
                               file_hashes=tuple(images.file_hashes[i] for i in keep), available=len(keep))


@dataclass
class ImagePlan:
    """Evaluation and calibration images, and why INT8 rows cannot run when there is no calibration."""

    evaluation: cal.ImageSet
    calibration: cal.ImageSet | None
    calib_missing: str | None
    notes: list[str]


def plan_images(data: Path, split: str | None, calib: Path | None, default_model: bool,
                sample_root: Path | None) -> ImagePlan:
    """Pick evaluation and calibration images; they never share an image (stem or content).

    With ``calib`` its images (a dataset root's ``train`` split, sampled to
    :data:`resunetpp.export.calibration.DEFAULT_CALIB_COUNT`) calibrate. Else, for the shipped default model,
    the shipped sample images are split in two: the first half (in ``val.txt`` order) is evaluated,
    the second half calibrates -- and is removed from the evaluation set if ``data`` holds them.
    Else there is no calibration and INT8 rows are skipped.
    """
    evaluation = cal.select_images(data, split, None, role="evaluation", default_split="val")
    notes: list[str] = []
    if calib is not None:
        calibration = cal.select_images(calib, None, cal.DEFAULT_CALIB_COUNT, role="calibration",
                                        default_split="train")
        cal.check_disjoint(calibration, evaluation)
        notes.append(f"INT8 calibrated on {len(calibration)} images of {calib}; accuracy measured on "
                     f"{len(evaluation)} other images")
        return ImagePlan(evaluation, calibration, None, notes)
    if default_model and sample_root is not None:
        samples = cal.select_images(sample_root, None, None, role="calibration", default_split="val")
        half = len(samples) // 2
        if half == 0:
            return ImagePlan(evaluation, None, "the shipped sample data is too small to hold out calibration "
                                               "images; pass --calib DIR", notes)
        calibration = subset(samples, range(half, len(samples)), "calibration")
        held = set(calibration.file_hashes) | {f"stem:{s}" for s in calibration.stems}
        keep = [i for i, (h, s) in enumerate(zip(evaluation.file_hashes, evaluation.stems))
                if h not in held and f"stem:{s}" not in held]
        if not keep:
            raise ResUNetError(f"{data}: every evaluation image is a calibration image; pass other --data or "
                               "--calib DIR")
        removed = len(evaluation) - len(keep)
        if removed:
            evaluation = subset(evaluation, keep, "evaluation")
        if Path(data).resolve() == Path(sample_root).resolve():
            notes.append(f"the {len(samples)} shipped sample images are split (val.txt order): the first {half} are "
                         f"evaluated, the last {len(calibration)} calibrate INT8 and are never evaluated")
        else:
            notes.append(f"INT8 calibrated on the last {len(calibration)} of the {len(samples)} shipped sample "
                         f"images; accuracy measured on {len(evaluation)} images of {data}"
                         + (f" ({removed} calibration image(s) removed from them)" if removed else ""))
        return ImagePlan(evaluation, calibration, None, notes)
    return ImagePlan(evaluation, None, "needs calibration images for this model: pass --calib DIR (images never "
                                       "used for evaluation)", notes)




# ---- artifacts ---------------------------------------------------------------------------------------
def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/resunetpp/artifacts`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resunetpp" / "artifacts"


def artifact_key(ckpt: Checkpoint, pre: Preprocessing, calibration: cal.ImageSet | None) -> tuple[str, dict]:
    """Cache key of the exported artifacts: checkpoint hash, input size, calibration set, the export
    recipes (INT8 exclusions and ranges, FP16 block list), tool versions."""
    from dataclasses import asdict

    from resunetpp.export.onnx_format import DEFAULT_OPSET
    from resunetpp.export.pipeline import ExportOptions
    from resunetpp._version import __version__
    from resunetpp.engines.info import libraries, library_version

    fields = {
        "checkpoint_sha256": ckpt.sha256,
        "preprocessing": pre.to_dict(),
        "calibration_sha256": calibration.digest if calibration is not None else None,
        "opset": DEFAULT_OPSET,
        "recipes": {name: asdict(getattr(ExportOptions, name)) for name in ("qdq", "nncf", "fp16")},
        "openvino_int8": ExportOptions.openvino_int8,
        "resunetpp": __version__,
        "versions": {m: library_version(m) for m in libraries()},  # what `resunetpp info` lists
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16], fields


@dataclass
class ArtifactSet:
    folder: Path
    key: str
    paths: dict[tuple[str, str], Path]
    problems: dict[tuple[str, str], str]
    reused: list[str]
    exported: list[str]
    export_s: float | None

    def record(self) -> dict:
        return {"folder": str(self.folder), "key": self.key, "reused": self.reused, "exported": self.exported,
                "export_s": round(self.export_s, 2) if self.export_s is not None else None,
                "not_available": {f"{f} {p}": r for (f, p), r in self.problems.items()}}


def _artifact_files(path: Path) -> list[Path]:
    files = [path, path.with_name(path.name + ".json")]
    if path.suffix == ".xml":
        files.append(path.with_suffix(".bin"))
    return files


def artifact_size_mb(path: Path) -> float:
    """Size on disk of an artifact (an OpenVINO IR: ``.xml`` + ``.bin``), in MB (10^6 bytes)."""
    files = [path] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else [])
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def _read_marker(folder: Path, key: str) -> dict[str, str]:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(marker, dict) or marker.get("key") != key:
        return {}
    return dict(marker.get("artifacts") or {})


def ensure_artifacts(ckpt_path: Path, folder: Path, key: str, key_fields: dict, wanted: set[tuple[str, str]],
                     images: ImagePlan, image_size: int | None, reporter: Reporter) -> ArtifactSet:
    """Reuse the artifacts in ``folder`` made under ``key``; export the missing ones with
    :func:`resunetpp.export.pipeline.run_export` (accuracy gates reported, not enforced: the benchmark shows
    the drop and ``--max-dice-drop`` gates it). The marker file is written last."""
    from resunetpp.export.pipeline import artifact_name, run_export

    folder.mkdir(parents=True, exist_ok=True)
    listed = _read_marker(folder, key)
    paths, reused = {}, []
    for fmt, prec in sorted(wanted):
        rel = listed.get(f"{fmt} {prec}")
        if rel and all(f.is_file() for f in _artifact_files(folder / rel)):
            paths[(fmt, prec)] = folder / rel
            reused.append(f"{fmt} {prec}")
    missing = {w for w in wanted if w not in paths}
    problems: dict[tuple[str, str], str] = {}
    export_s = None
    if missing:
        options = _export_options(ckpt_path, folder, missing, images, image_size)
        start = time.perf_counter()
        report = run_export(options, reporter)
        export_s = time.perf_counter() - start
        for a in report.artifacts:
            if (a.format, a.precision) in missing:
                if a.written:
                    paths[(a.format, a.precision)] = folder / artifact_name(a.format, a.precision)
                else:
                    problems[(a.format, a.precision)] = f"export refused it: {a.gate.get('reason')}"
        for fmt, prec, reason in report.skipped:
            problems.setdefault((fmt, prec), reason)
        for w in missing:
            if w not in paths:
                problems.setdefault(w, "the export did not produce it")
    held = {name: rel for name, rel in listed.items() if all(f.is_file() for f in _artifact_files(folder / rel))}
    held.update({f"{f} {p}": str(path.relative_to(folder)) for (f, p), path in paths.items()})
    write_json_atomic(folder / MARKER, {"key": key, "fields": key_fields, "artifacts": dict(sorted(held.items()))})
    return ArtifactSet(folder, key, paths, problems, reused, sorted(f"{f} {p}" for f, p in missing), export_s)


def _split_file(folder: Path, name: str, images: cal.ImageSet) -> Path:
    path = folder / name
    write_text_atomic(path, "".join(f"{s}\n" for s in images.stems))
    return path


def _export_options(ckpt_path: Path, folder: Path, missing: set[tuple[str, str]], images: ImagePlan,
                    image_size: int | None):
    from resunetpp.export.pipeline import ExportOptions

    ev = images.evaluation
    calib = images.calibration
    need_int8 = any(p == "int8" for _, p in missing)
    return ExportOptions(
        checkpoint=ckpt_path, out=folder,
        formats=tuple(sorted({f for f, _ in missing})), precisions=tuple(sorted({p for _, p in missing})),
        calib=calib.source if calib is not None and need_int8 else None,
        calib_split=str(_split_file(folder, CALIB_SPLIT_FILE, calib)) if calib is not None and need_int8 else None,
        calib_count=len(calib) if calib is not None else cal.DEFAULT_CALIB_COUNT,
        eval=ev.source, eval_split=str(_split_file(folder, EVAL_SPLIT_FILE, ev)), eval_count=len(ev),
        image_size=(image_size, image_size) if image_size else None, allow_accuracy_drop=True)


