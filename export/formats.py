"""The export formats and precisions, and the file each artifact is written to."""

from __future__ import annotations

FORMATS = ("onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


def artifact_name(fmt: str, precision: str) -> str:
    """Relative path of an artifact inside ``--out``."""
    if fmt == "onnx":
        return {"fp32": "model_fp32.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8_qdq.onnx"}[precision]
    if fmt == "openvino":
        return f"openvino/model_{precision}.xml"
    return f"tensorrt/model_{precision}.engine"


__all__ = ["FORMATS", "PRECISIONS", "artifact_name"]
