"""The metadata record every exported artifact carries, and how engines find it.

Contract shared by ``export/`` (writer) and ``engines/`` (reader):

* Every artifact ``X`` (``model.onnx``, ``model_int8.xml``, ``model_fp16.engine`` ...) has a
  sidecar ``X.json`` written atomically *before* the artifact is renamed into place, holding the
  record below. ONNX files also embed it in ``metadata_props`` under the key ``resunetpp``.
* Graph I/O: one input ``images`` (N, C, H, W) float32, normalised by the record's
  ``preprocessing``; one output ``probs`` (N, K, H, W) float32: probabilities, the model's
  declared activation (sigmoid or softmax) already applied inside the graph.

Record keys: everything of :meth:`resunetpp.checkpoint.Checkpoint.metadata` (``model``,
``activation``, ``class_names``, ``preprocessing``, ``provenance``) plus ``artifact``:
``{"format", "precision", "source_checkpoint", "source_sha256", "created", "tools": {...},
"input_shape": [...], "dynamic": {...}, "calibration": {...} | None, "accuracy": {...} | None, ...}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from resunetpp.atomic import write_json_atomic
from resunetpp.errors import InputFileError, RecordFieldError
from resunetpp.model_config import MAX_CLASSES, MAX_INPUT_SIZE, input_size_problem, model_config_problem
from resunetpp.preprocess import preprocessing_problem

INPUT_NAME = "images"
OUTPUT_NAME = "probs"
ONNX_METADATA_KEY = "resunetpp"


def sidecar_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def write_sidecar(artifact: str | Path, record: dict) -> Path:
    path = sidecar_path(artifact)
    write_json_atomic(path, record)
    return path


def read_record(artifact: str | Path) -> dict:
    """The record of ``artifact``: its sidecar, else (ONNX) its embedded metadata; checked by
    :func:`check_record`, an invalid field named with the file it came from."""
    artifact = Path(artifact)
    side = sidecar_path(artifact)
    if side.is_file():
        try:
            record = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(side, f"metadata sidecar is not valid JSON ({e})") from None
        except OSError as e:
            raise InputFileError(side, f"cannot read the metadata sidecar ({e.strerror or e})") from None
        return check_record(record, side)
    if artifact.suffix == ".onnx":
        import onnx

        try:
            m = onnx.load(str(artifact), load_external_data=False)
        except PermissionError:
            raise InputFileError(artifact, "cannot read the model file (Permission denied)") from None
        except Exception as e:  # onnx raises DecodeError and others
            raise InputFileError(artifact, f"not a valid ONNX model ({str(e).splitlines()[0][:120]})") from None
        for p in m.metadata_props:
            if p.key == ONNX_METADATA_KEY:
                try:
                    record = json.loads(p.value)
                except json.JSONDecodeError as e:
                    raise InputFileError(artifact, f"embedded resunetpp metadata is not valid JSON ({e})") from None
                return check_record(record, artifact)
    raise InputFileError(artifact, f"no resunetpp metadata (expected {side.name} beside it)")


# ---- validation ------------------------------------------------------------------------------------------
ACTIVATIONS = ("sigmoid", "softmax")


def record_problem(record: object) -> RecordFieldError | None:
    """The first invalid field of a checkpoint's or an artifact's record, or ``None``.

    Checked: ``preprocessing`` (:func:`~resunetpp.preprocess.preprocessing_problem`: finite
    mean/std in range, sizes multiples of 8 up to the maximum), ``model``
    (:func:`~resunetpp.model.model_config_problem`), ``class_names`` (strings, one per class),
    ``activation`` (the one the class count implies), ``artifact`` (a mapping; ``input_shape`` four
    dimensions, static ones in range) and ``provenance`` (a mapping). Absent fields are not
    checked here (each reader has its defaults and its own message for a required one).
    """
    if not isinstance(record, Mapping):
        return RecordFieldError("", f"the record is a {type(record).__name__}, expected a mapping")
    pre = record.get("preprocessing")
    if "preprocessing" in record:
        problem = preprocessing_problem(pre)
        if problem is not None:
            return RecordFieldError(*problem).within("preprocessing")
    model = record.get("model")
    if model is not None:
        problem = model_config_problem(model)
        if problem is not None:
            return RecordFieldError(*problem).within("model")
    num_classes = model.get("num_classes") if isinstance(model, Mapping) else None
    names = record.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names) \
                or len(names) > MAX_CLASSES:
            return RecordFieldError("class_names", f"must be a list of non-empty class names, got {names!r}"[:300])
        if names and num_classes is not None and len(names) != num_classes:
            return RecordFieldError("class_names", f"names {len(names)} classes for a {num_classes}-class model")
    k = num_classes if num_classes is not None else (len(names) if names else 1)
    activation = record.get("activation")
    if activation is not None:
        expected = "sigmoid" if k == 1 else "softmax"
        if activation != expected:
            return RecordFieldError("activation", f"must be {expected!r} for a {k}-class model, got {activation!r}")
    art = record.get("artifact")
    if art is not None:
        if not isinstance(art, Mapping):
            return RecordFieldError("artifact", f"must be a mapping, got {type(art).__name__}")
        shape = art.get("input_shape")
        if shape is not None:
            problem = _input_shape_problem(shape, pre.get("channels", 3) if isinstance(pre, Mapping) else 3)
            if problem:
                return RecordFieldError("artifact.input_shape", problem)
        if "precision" in art and not isinstance(art["precision"], str):
            return RecordFieldError("artifact.precision", f"must be a string, got {art['precision']!r}")
        ov = art.get("openvino")
        if ov is not None:
            if not isinstance(ov, Mapping):
                return RecordFieldError("artifact.openvino", f"must be a mapping, got {type(ov).__name__}")
            hint = ov.get("verified_with_precision_hint")
            if hint is not None and hint not in VERIFIED_HINTS:
                return RecordFieldError("artifact.openvino.verified_with_precision_hint",
                                        f"must be one of {', '.join(VERIFIED_HINTS)}, got {hint!r}")
        if art.get("accuracy") is not None:
            problem = accuracy_problem(art["accuracy"])
            if problem is not None:
                return problem.within("artifact.accuracy")
    if record.get("provenance") is not None and not isinstance(record["provenance"], Mapping):
        return RecordFieldError("provenance", f"must be a mapping, got {type(record['provenance']).__name__}")
    return None


#: Accuracy fields that are shares in [0, 1] (``None`` where not measured): Dice vs the reference and
#: vs ground truth, and the disagreement of the masks (:func:`resunetpp.metrics.disagreement`).
_SHARE_FIELDS = ("dice_vs_reference_mean", "dice_vs_reference_min", "dice_vs_gt_mean", "dice_vs_gt_min",
                 "reference_dice_vs_gt_mean", "disagreement_image_share_mean", "disagreement_image_share_max",
                 "disagreement_union_share_mean", "disagreement_union_share_max", "min_union_share", "threshold")
_SHARE_LISTS = ("dice_vs_reference_per_image", "disagreement_image_share_per_image")
_GATE_LIMITS = ("dice_vs_reference_mean", "dice_vs_reference_min", "disagreement_image_share_max", "dice_vs_gt_drop")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _share_problem(v: object) -> str | None:
    if not _is_number(v) or not 0.0 <= v <= 1.0:  # type: ignore[operator]
        return f"must be a number in [0, 1], got {v!r}"[:200]
    return None


def accuracy_problem(acc: object) -> RecordFieldError | None:
    """The first invalid field of an artifact's ``accuracy`` record (what the export measured and
    its gate's verdict), or ``None``. Absent fields are not required (older records lack the
    disagreement shares); present ones must have their type and range."""
    if not isinstance(acc, Mapping):
        return RecordFieldError("", f"must be a mapping, got {type(acc).__name__}")
    images = acc.get("images")
    if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images < 1):
        return RecordFieldError("images", f"must be a positive integer, got {images!r}"[:200])
    for name in _SHARE_FIELDS:
        if acc.get(name) is not None and (problem := _share_problem(acc[name])):
            return RecordFieldError(name, problem)
    for name in ("abs_error_mean", "abs_error_max"):
        v = acc.get(name)
        if v is not None and not (_is_number(v) and v >= 0):
            return RecordFieldError(name, f"must be a number >= 0, got {v!r}"[:200])
    drop = acc.get("dice_vs_gt_drop")
    if drop is not None and not (_is_number(drop) and -1.0 <= drop <= 1.0):
        return RecordFieldError("dice_vs_gt_drop", f"must be a number in [-1, 1], got {drop!r}"[:200])
    for name in _SHARE_LISTS:
        values = acc.get(name)
        if values is None:
            continue
        if not isinstance(values, list) or (isinstance(images, int) and len(values) != images):
            return RecordFieldError(name, f"must be a list of one number per image ({images} images)")
        for v in values:
            if _share_problem(v):
                return RecordFieldError(name, f"must hold numbers in [0, 1], got {v!r}"[:200])
    gate = acc.get("gate")
    if gate is not None:
        if not isinstance(gate, Mapping):
            return RecordFieldError("gate", f"must be a mapping, got {type(gate).__name__}")
        if "passed" in gate and not isinstance(gate["passed"], bool):
            return RecordFieldError("gate.passed", f"must be true or false, got {gate['passed']!r}"[:200])
        limits = gate.get("limits")
        if limits is not None:
            if not isinstance(limits, Mapping):
                return RecordFieldError("gate.limits", f"must be a mapping, got {type(limits).__name__}")
            for name in _GATE_LIMITS:
                if name in limits and (problem := _share_problem(limits[name])):
                    return RecordFieldError(f"gate.limits.{name}", problem)
    return None


def _input_shape_problem(shape: object, channels: int) -> str | None:
    def static(d: object) -> bool:
        return isinstance(d, int) and not isinstance(d, bool)

    if not isinstance(shape, list) or len(shape) != 4:
        return f"must be 4 dimensions [N, C, H, W], got {shape!r}"
    if not all(d is None or isinstance(d, str) or static(d) for d in shape):
        return f"each dimension must be an integer or a name (dynamic), got {shape!r}"
    n, c, h, w = shape
    if static(n) and not 1 <= n <= MAX_INPUT_SIZE:
        return f"batch must be from 1 to {MAX_INPUT_SIZE}, got {n}"
    if static(c) and c != channels:
        return f"has {c} channels, the preprocessing gives {channels}"
    for side in (h, w):
        if static(side) and input_size_problem(side):
            return f"height and width {input_size_problem(side)}"
    return None


#: OpenVINO ``INFERENCE_PRECISION_HINT`` values an IR's record may say it was verified with.
VERIFIED_HINTS = ("f32", "bf16", "f16")


def check_record(record: object, where: str | Path) -> dict:
    """``record`` if valid (:func:`record_problem`), else :class:`~resunetpp.errors.InputFileError`
    naming ``where`` (the file the record came from) and the field."""
    problem = record_problem(record)
    if problem is not None:
        raise record_error(where, problem)
    return record  # type: ignore[return-value]


def record_error(where: str | Path, problem: RecordFieldError) -> InputFileError:
    """``<where>: invalid config record: field <field>: <problem>``."""
    field = f"field {problem.field}: " if problem.field else ""
    return InputFileError(where, f"invalid config record: {field}{problem.problem}")
