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
from dataclasses import dataclass
from pathlib import Path

VERIFY_PRECISION_HINT = "f32"


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
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{xml_path.stem}.", suffix=".partial", dir=xml_path.parent))
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


def cpu_description() -> dict:
    """The CPU the IR was verified on and the plugin's default inference precision there."""
    import openvino as ov

    core = ov.Core()
    return {"device": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "default_inference_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "verified_with_precision_hint": VERIFY_PRECISION_HINT}
