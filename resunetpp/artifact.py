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
from pathlib import Path

from resunetpp.atomic import write_json_atomic
from resunetpp.errors import InputFileError

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
    """The record of ``artifact``: its sidecar, else (ONNX) its embedded metadata."""
    artifact = Path(artifact)
    side = sidecar_path(artifact)
    if side.is_file():
        try:
            return json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(side, f"metadata sidecar is not valid JSON ({e})") from None
    if artifact.suffix == ".onnx":
        import onnx

        try:
            m = onnx.load(str(artifact), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError and others
            raise InputFileError(artifact, f"not a valid ONNX model ({str(e).splitlines()[0][:120]})") from None
        for p in m.metadata_props:
            if p.key == ONNX_METADATA_KEY:
                return json.loads(p.value)
    raise InputFileError(artifact, f"no resunetpp metadata (expected {side.name} beside it)")
