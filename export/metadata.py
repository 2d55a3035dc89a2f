"""The metadata record of an exported artifact (see :mod:`resunetpp.artifact` for the contract)."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

from resunetpp.checkpoint import Checkpoint
from resunetpp.preprocess import Preprocessing

#: Distributions whose versions are recorded when installed (read without importing them).
TOOL_DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "openvino", "nncf",
                      "numpy", "tensorrt", "nvidia-modelopt")


def tool_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions of the toolchain that produced an artifact (python, resunetpp, installed tools)."""
    from resunetpp._version import __version__

    tools = {"python": platform.python_version(), "resunetpp": __version__}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            tools[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    tools.update(extra or {})
    return tools


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def artifact_record(ckpt: Checkpoint, pre: Preprocessing, *, fmt: str, precision: str, file: str | Path,
                    shape: dict, calibration: dict | None = None, accuracy: dict | None = None,
                    **extra: object) -> dict:
    """The full record: the checkpoint's metadata (with the export's preprocessing) + ``artifact``."""
    record = ckpt.metadata()
    record["preprocessing"] = pre.to_dict()
    record["artifact"] = {
        "format": fmt,
        "precision": precision,
        "file": Path(file).name,
        "source_checkpoint": str(ckpt.path) if ckpt.path else None,
        "source_sha256": ckpt.sha256,
        "created": utc_now(),
        "tools": tool_versions(),
        "input_name": "images",
        "output_name": "probs",
        "input_shape": shape["input_shape"],
        "output_shape": shape["output_shape"],
        "dynamic": shape["dynamic"],
        "calibration": calibration,
        "accuracy": accuracy,
        **extra,
    }
    return record


def graph_record(model, precision: str = "fp32") -> dict:
    """A minimal record for an ONNX graph written by no export (a probe in a work folder), so that an
    engine can run it: channels and classes read from the graph's ``images`` / ``probs`` shapes,
    neutral preprocessing in ``pad`` mode (any size that is a multiple of 8, inputs already
    normalised). ``model`` is a ``ModelProto`` or a path."""
    import onnx

    from resunetpp.artifact import OUTPUT_NAME

    if not hasattr(model, "graph"):
        model = onnx.load(str(model), load_external_data=False)

    def dims(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in value.type.tensor_type.shape.dim]

    shape = dims(model.graph.input[0])
    out = next((o for o in model.graph.output if o.name == OUTPUT_NAME), model.graph.output[0])
    channels, classes = shape[1], dims(out)[1]
    if not isinstance(channels, int) or not isinstance(classes, int):
        raise ValueError(f"graph input {shape} / output {dims(out)}: channels and classes must be static")
    pre = Preprocessing(mode="pad", mean=(0.0,) * channels, std=(1.0,) * channels, channels=channels)
    return {"model": {"num_classes": classes}, "activation": "sigmoid" if classes == 1 else "softmax",
            "class_names": None, "preprocessing": pre.to_dict(),
            "artifact": {"format": "onnx", "precision": precision, "input_shape": shape}}
