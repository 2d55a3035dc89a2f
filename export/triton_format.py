"""A Triton Inference Server model repository from the artifacts an export verified.

`NVIDIA Triton <https://github.com/triton-inference-server/server>`_ serves ONNX (its ONNX Runtime
backend), OpenVINO IR (its OpenVINO backend) and TensorRT plans (its TensorRT backend), on servers
and on Jetson. :func:`write_triton_repository` packages artifacts written by ``resunetpp export``
-- each one already verified against PyTorch and through its accuracy gate, and only written if it
passed (or with ``--allow-accuracy-drop``, which its record says) -- into the layout Triton loads::

    <out>/
      README.md                       preprocessing stays with the client; the models, their gates
      resunetpp_onnx_fp32/
        config.pbtxt                  platform, I/O names, types and dims, max_batch_size,
        resunetpp.json                dynamic batching, instance group; the artifact's record
        1/model.onnx
      resunetpp_openvino_int8/
        config.pbtxt, resunetpp.json, 1/model.xml, 1/model.bin
      resunetpp_tensorrt_fp16/
        config.pbtxt, resunetpp.json, 1/model.plan

Nothing is re-verified here (Triton is a packaging of verified artifacts): the files are copied as
they are, and each ``config.pbtxt`` is derived from the artifact itself -- the ONNX graph's input
and output (names, element types, dimensions), the IR's ``Parameter`` and ``Result`` layers, a
TensorRT plan's record (its optimization profile bounds ``max_batch_size``). The graph's I/O is the
toolkit's contract (:mod:`resunetpp.artifact`): ``images`` ``(N, C, H, W)`` float32, normalised;
``probs`` ``(N, K, H, W)`` float32 probabilities.

Preprocessing (resize or pad, ``/255``, mean/std, NCHW) and restoring the probabilities to the
image's size stay with the client; each model folder carries the artifact's sidecar record as
``resunetpp.json`` (mean, std, size, mode, classes, activation). ``docs/triton.md`` has a
``tritonclient`` HTTP client.

The repository is built in a temporary folder beside ``out`` and renamed into place, so a reader
never sees half of one. :func:`parse_config` checks a ``config.pbtxt`` against Triton's own
``ModelConfig`` protobuf schema (``tritonclient`` ships it); no Triton server runs here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resunetpp.artifact import INPUT_NAME, OUTPUT_NAME, read_record, sidecar_path
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.export.formats import PRECISIONS, ExportFormat, register_format
from resunetpp.export.results import ArtifactResult

if TYPE_CHECKING:
    from resunetpp.export.context import ExportRun
    from resunetpp.export.options import ExportOptions

__all__ = ["TRITON_BACKENDS", "TritonModel", "TritonOptions", "TensorSpec", "artifact_io", "artifacts_from_export",
           "model_config", "model_config_schema", "parse_config", "write_triton_repository"]

#: Per export format: the Triton platform/backend line, the model file(s) in the version folder and
#: the instance kind (the OpenVINO backend runs on the CPU, TensorRT plans on a GPU).
TRITON_BACKENDS: dict[str, dict[str, Any]] = {
    "onnx": {"key": "platform", "value": "onnxruntime_onnx", "files": ("model.onnx",), "kind": None},
    "openvino": {"key": "backend", "value": "openvino", "files": ("model.xml", "model.bin"), "kind": "KIND_CPU"},
    "tensorrt": {"key": "platform", "value": "tensorrt_plan", "files": ("model.plan",), "kind": "KIND_GPU"},
}
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
RECORD_NAME = "resunetpp.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
               6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}
_OV_TYPES = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "bf16": "TYPE_BF16", "f64": "TYPE_FP64", "u8": "TYPE_UINT8",
             "i8": "TYPE_INT8", "i32": "TYPE_INT32", "i64": "TYPE_INT64", "boolean": "TYPE_BOOL"}
_OV_PORT_TYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "BF16": "TYPE_BF16", "FP64": "TYPE_FP64", "U8": "TYPE_UINT8",
                  "I8": "TYPE_INT8", "I32": "TYPE_INT32", "I64": "TYPE_INT64", "BOOL": "TYPE_BOOL"}


@dataclass(frozen=True)
class TritonOptions:
    """How the repository's models are configured.

    ``max_batch_size``: the largest batch Triton forms for a model whose batch dimension is dynamic
    (a TensorRT plan's is also bounded by its profile); a static-batch export gets ``0`` and full
    dims, and no dynamic batcher (Triton batches only along a dynamic first dimension).
    ``onnx_device``: where the ONNX Runtime backend runs (``cpu`` or ``gpu``); OpenVINO models run on
    the CPU, TensorRT plans on a GPU. ``openvino_hint``: the OpenVINO backend's ``PERFORMANCE_HINT``
    (``LATENCY`` / ``THROUGHPUT``; ``None``: the backend's default).
    """

    prefix: str = "resunetpp"
    version: int = 1
    max_batch_size: int = 8
    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    onnx_device: str = "cpu"
    openvino_hint: str | None = None

    def validate(self) -> None:
        if not _NAME_RE.match(self.prefix):
            raise ResUNetError(f"Triton model name prefix {self.prefix!r}: letters, digits, '_', '-', '.' only")
        if self.version < 1:
            raise ResUNetError(f"Triton model version must be at least 1, got {self.version}")
        if self.max_batch_size < 1:
            raise ResUNetError(f"Triton max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ResUNetError(f"Triton max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ResUNetError(f"Triton preferred batch sizes {list(self.preferred_batch_sizes)} must lie in "
                               f"1..{self.max_batch_size}")
        if self.instances < 1:
            raise ResUNetError(f"Triton instance count must be at least 1, got {self.instances}")
        if self.onnx_device not in INSTANCE_KINDS:
            raise ResUNetError(f"Triton ONNX device must be one of {', '.join(INSTANCE_KINDS)}, got {self.onnx_device!r}")
        if self.openvino_hint not in (None, "LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"):
            raise ResUNetError(f"OpenVINO PERFORMANCE_HINT must be LATENCY, THROUGHPUT or CUMULATIVE_THROUGHPUT, "
                               f"got {self.openvino_hint!r}")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as Triton declares it: name, ``TYPE_*`` and dims with the batch
    dimension first (``-1``: dynamic)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass
class TritonModel:
    """One model of the repository (paths are final, inside ``out``)."""

    name: str
    format: str
    precision: str
    source: Path
    folder: Path
    config: str
    files: list[Path] = field(default_factory=list)


# ---- I/O of each artifact, from the artifact ----------------------------------------------------------
def _onnx_io(path: Path) -> tuple[TensorSpec, TensorSpec]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise InputFileError(path, f"not a valid ONNX model ({str(e).splitlines()[0][:120]})") from None

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dtype = _ONNX_TYPES.get(t.elem_type)
        if dtype is None:
            raise InputFileError(path, f"graph {value.name!r} has ONNX element type {t.elem_type}, which the "
                                       "Triton writer does not map")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
        return TensorSpec(value.name, dtype, dims)

    return _one(path, [spec(v) for v in model.graph.input], INPUT_NAME), \
        _one(path, [spec(v) for v in model.graph.output], OUTPUT_NAME)


def _ov_dims(port: ET.Element) -> tuple[int, ...]:
    return tuple(int(d.text) if d.text and int(d.text) > 0 else -1 for d in port.findall("dim"))


def _openvino_io(path: Path) -> tuple[TensorSpec, TensorSpec]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise InputFileError(path, f"not a readable OpenVINO IR ({e})") from None
    layers = root.find("layers")
    if layers is None:
        raise InputFileError(path, "not an OpenVINO IR (no <layers>)")
    inputs, outputs = [], []
    by_id = {layer.get("id"): layer for layer in layers}
    for layer in layers:
        kind = layer.get("type")
        if kind == "Parameter":
            data = layer.find("data")
            port = layer.find("output/port")
            if data is None or port is None:
                raise InputFileError(path, f"IR Parameter {layer.get('name')!r} has no data or output port")
            dtype = _OV_TYPES.get(data.get("element_type", ""))
            if dtype is None:
                raise InputFileError(path, f"IR input {layer.get('name')!r} has element type "
                                           f"{data.get('element_type')!r}, which the Triton writer does not map")
            name = (port.get("names") or layer.get("name") or "").split(",")[0].strip()
            inputs.append(TensorSpec(name, dtype, _ov_dims(port)))
        elif kind == "Result":
            port = layer.find("input/port")
            if port is None:
                raise InputFileError(path, f"IR Result {layer.get('name')!r} has no input port")
            name = (layer.get("output_names") or "").split(",")[0].strip() or _result_tensor_name(root, by_id, layer)
            dtype = _OV_PORT_TYPES.get(port.get("precision", ""))
            if dtype is None:
                raise InputFileError(path, f"IR output {name!r} has precision {port.get('precision')!r}, which the "
                                           "Triton writer does not map")
            outputs.append(TensorSpec(name, dtype, _ov_dims(port)))
    return _one(path, inputs, INPUT_NAME), _one(path, outputs, OUTPUT_NAME)


def _result_tensor_name(root: ET.Element, by_id: dict, result: ET.Element) -> str:
    """The tensor name feeding a ``Result`` (older IRs name it on the producer's output port)."""
    for edge in root.iterfind("edges/edge"):
        if edge.get("to-layer") == result.get("id"):
            producer = by_id.get(edge.get("from-layer"))
            if producer is not None:
                for port in producer.iterfind("output/port"):
                    if port.get("id") == edge.get("from-port") and port.get("names"):
                        return port.get("names").split(",")[0].strip()
    return (result.get("name") or "").split("/sink_port")[0]


def _record_io(path: Path, record: dict) -> tuple[TensorSpec, TensorSpec]:
    """I/O from the record (a TensorRT plan cannot be read without TensorRT); float32 by contract."""
    art = record.get("artifact") or {}

    def dims(key: str) -> tuple[int, ...]:
        shape = art.get(key)
        if not isinstance(shape, list) or len(shape) != 4:
            raise InputFileError(sidecar_path(path), f"record has no 4-d artifact.{key}")
        return tuple(int(s) if isinstance(s, int) and s > 0 else -1 for s in shape)

    return (TensorSpec(str(art.get("input_name") or INPUT_NAME), "TYPE_FP32", dims("input_shape")),
            TensorSpec(str(art.get("output_name") or OUTPUT_NAME), "TYPE_FP32", dims("output_shape")))


def _one(path: Path, specs: list[TensorSpec], expected: str) -> TensorSpec:
    if len(specs) != 1:
        raise InputFileError(path, f"expected one graph {'input' if expected == INPUT_NAME else 'output'} "
                                   f"({expected!r}), found {len(specs)}: {[s.name for s in specs]}")
    if len(specs[0].dims) != 4:
        raise InputFileError(path, f"graph tensor {specs[0].name!r} has dims {list(specs[0].dims)}; expected "
                                   "(N, C, H, W)")
    return specs[0]


def artifact_io(path: Path, record: dict) -> tuple[TensorSpec, TensorSpec]:
    """``(input, output)`` of an artifact, read from the artifact (TensorRT: from its record)."""
    fmt = (record.get("artifact") or {}).get("format")
    if fmt == "onnx":
        return _onnx_io(path)
    if fmt == "openvino":
        return _openvino_io(path)
    return _record_io(path, record)


# ---- config.pbtxt ------------------------------------------------------------------------------------
def _dims_text(dims: Iterable[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _max_batch(fmt: str, record: dict, batch_dim: int, options: TritonOptions) -> int:
    """0 for a static batch; else ``options.max_batch_size``, bounded by a TensorRT profile's maximum."""
    if batch_dim != -1:
        return 0
    if fmt == "tensorrt":
        profile = ((record.get("artifact") or {}).get("tensorrt") or {}).get("profile") or {}
        top = (profile.get("max") or [None])[0]
        if isinstance(top, int) and top > 0:
            return min(options.max_batch_size, top)
    return options.max_batch_size


def model_config(name: str, fmt: str, record: dict, io: tuple[TensorSpec, TensorSpec],
                 options: TritonOptions = TritonOptions()) -> str:
    """The ``config.pbtxt`` text of one model (protobuf text format of Triton's ``ModelConfig``)."""
    if fmt not in TRITON_BACKENDS:
        raise ResUNetError(f"no Triton backend for the {fmt!r} format (known: {', '.join(TRITON_BACKENDS)})")
    backend = TRITON_BACKENDS[fmt]
    inp, out = io
    max_batch = _max_batch(fmt, record, inp.dims[0], options)
    in_dims = inp.dims[1:] if max_batch else inp.dims
    out_dims = out.dims[1:] if max_batch else out.dims
    art = record.get("artifact") or {}
    kind = backend["kind"] or INSTANCE_KINDS[options.onnx_device]
    lines = [
        f"# {art.get('format', fmt)} {art.get('precision', '?')} from {art.get('file', '?')} (resunetpp export; "
        f"verified before it was written).",
        "# Inputs are normalised by the client: see resunetpp.json (preprocessing) and ../README.md.",
        f'name: "{name}"',
        f'{backend["key"]}: "{backend["value"]}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f'    name: "{inp.name}"',
        f"    data_type: {inp.data_type}",
        f"    dims: {_dims_text(in_dims)}",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{out.name}"',
        f"    data_type: {out.data_type}",
        f"    dims: {_dims_text(out_dims)}",
        "  }",
        "]",
    ]
    if max_batch:
        lines.append("dynamic_batching {")
        if options.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_dims_text(sorted(set(options.preferred_batch_sizes)))}")
        lines += [f"  max_queue_delay_microseconds: {options.max_queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {options.instances}", f"    kind: {kind}", "  }", "]"]
    if fmt == "openvino" and options.openvino_hint:
        lines += ["parameters: {", '  key: "PERFORMANCE_HINT"',
                  f'  value: {{ string_value: "{options.openvino_hint}" }}', "}"]
    return "\n".join(lines) + "\n"


def model_config_schema() -> Any:
    """Triton's model-configuration protobuf module (``ModelConfig``, ``DataType`` values ...).

    It is ``tritonclient``'s generated ``model_config_pb2`` (``pip install 'resunetpp[triton]'``),
    which lives in ``tritonclient.grpc``, whose package ``__init__`` needs grpcio; the module itself
    needs only protobuf, so it is loaded from its file.
    """
    import importlib.util
    import sys

    name = "_resunetpp_triton_model_config_pb2"
    module = sys.modules.get("tritonclient.grpc.model_config_pb2") or sys.modules.get(name)
    if module is not None:
        return module
    try:
        import tritonclient
    except ImportError as e:
        raise ResUNetError(f"Triton's model-config schema comes with tritonclient ({e}); "
                           "pip install 'resunetpp[triton]'") from None
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ResUNetError(f"this tritonclient has no {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text with Triton's ``ModelConfig`` schema (:func:`model_config_schema`)
    and return the message; an unknown field, a wrong type or a bad enum raises :class:`ResUNetError`."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_schema().ModelConfig())
    except text_format.ParseError as e:
        raise ResUNetError(f"not a valid Triton model config: {e}") from None


# ---- the repository ----------------------------------------------------------------------------------
def artifacts_from_export(export_out: str | Path) -> list[Path]:
    """The artifacts an export wrote (``export_report.json`` in its ``--out``), in report order."""
    export_out = Path(export_out)
    report = export_out / "export_report.json"
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(report, "no export report here; run resunetpp export first") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise InputFileError(report, f"unreadable export report ({e})") from None
    paths = []
    for a in data.get("artifacts") or []:
        if a.get("written") and a.get("format") in TRITON_BACKENDS:
            p = Path(a["path"])
            paths.append(p if p.is_absolute() else export_out / p)
    return paths


def _model_name(options: TritonOptions, fmt: str, precision: str) -> str:
    return f"{options.prefix}_{fmt}_{precision}"


def _readme(models: list[TritonModel], records: dict[str, dict], checked: str) -> str:
    first = records[models[0].name]
    pre = first.get("preprocessing") or {}
    classes = first.get("class_names") or []
    activation = first.get("activation", "sigmoid")
    size = pre.get("size", ["?", "?"])
    rows = []
    for m in models:
        art = records[m.name].get("artifact") or {}
        gate = (art.get("accuracy") or {}).get("gate") or {}
        verdict = ("passed" if gate.get("passed") else "**below its gate, written with --allow-accuracy-drop**") \
            if gate else "-"
        reason = gate.get("reason", "")
        rows.append(f"| `{m.name}` | {TRITON_BACKENDS[m.format]['value']} | {m.precision} | "
                    f"`{art.get('file', m.source.name)}` | {verdict}{': ' + reason if reason else ''} |")
    mode = pre.get("mode", "resize")
    if mode == "resize":
        geometry = (f"resize the image to {size[0]}x{size[1]} (height x width, bilinear), and after inference "
                    "resize the probabilities back to the image's size (bilinear)")
    else:
        geometry = ("pad the image at the bottom and right (with zeros, after normalising) to the next multiple "
                    "of 8, and after inference crop the probabilities back to the image's size")
    hw = ("any multiple of 8 (the graphs have dynamic height and width)"
          if -1 in models_dims(models, records) else f"{size[0]}x{size[1]} (static)")
    if mode == "resize":
        hw += f"; the recorded preprocessing resizes to {size[0]}x{size[1]}"
    ov_note = ("\nOpenVINO models: the export verified each IR with the CPU plugin's `INFERENCE_PRECISION_HINT=f32`. "
               "Triton's OpenVINO backend documents no parameter for that hint, so on CPUs with native bf16 "
               "(AMX, AVX512-BF16) the plugin's default applies and an FP32 IR computes in bf16.\n"
               if any(m.format == "openvino" for m in models) else "")
    head = ("threshold the one channel at 0.5 (foreground: 255)" if len(classes) <= 1
            else "take the argmax over the channels (class indices)")
    return f"""# Triton model repository (resunetpp)

Written by resunetpp's Triton writer (`resunetpp.export.triton_format`) from artifacts that
`resunetpp export` had already verified against the PyTorch checkpoint (each only written after
passing its accuracy gate, unless the export was run with `--allow-accuracy-drop`). The files are copies of those artifacts; nothing
was re-exported. Start a server on this folder with, e.g.,
`tritonserver --model-repository=$PWD` (the NGC image `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`).

| model | Triton backend | precision | exported file | accuracy gate |
|---|---|---|---|---|
{chr(10).join(rows)}

## Preprocessing stays with the client

The models take `{INPUT_NAME}`, float32 `(N, {pre.get('channels', 3)}, H, W)`, **already normalised**, and return
`{OUTPUT_NAME}`, float32 `(N, {max(len(classes), 1)}, H, W)`: probabilities ({activation} applied inside
the model). A client must, per image:

1. decode it to {'RGB' if pre.get('channels', 3) == 3 else 'grayscale'} uint8 and {geometry};
2. scale to [0, 1] (`/ 255`), subtract the mean {pre.get('mean')} and divide by the std
   {pre.get('std')} per channel, and lay it out channels-first (`NCHW`);
3. {head}.

Every model folder holds `resunetpp.json`, the exported artifact's full record: `preprocessing`
(size, mode, mean, std, channels), `class_names` ({', '.join(map(str, classes)) or '-'}),
`activation`, the source checkpoint's hash and the export's accuracy measurements. A Python client
with `tritonclient` is in the toolkit's `docs/triton.md`; with `resunetpp` installed,
`Preprocessing.from_dict(record["preprocessing"])` gives `apply(image)` and
`restore(probs, height, width)` exactly as the toolkit's own engines use them.

H and W: {hw}. Dynamic batching is on for models with a dynamic batch dimension
(`max_batch_size` > 0).
{ov_note}
## What was checked, and what was not

{checked} The inputs' and outputs' names, types and dims were read from the artifacts
themselves. No Triton server loaded this repository where it was written: load it on yours
before you rely on it.
"""


def _schema_check(models: list[TritonModel]) -> str:
    """Parse every config with Triton's schema when ``tritonclient`` is installed; the README's sentence."""
    try:
        import tritonclient
    except ImportError:
        return ("The `config.pbtxt` files were not checked against Triton's schema here (`tritonclient` "
                "was not installed).")
    for m in models:
        parse_config(m.config)  # raises on a config Triton's schema refuses
    version = getattr(tritonclient, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version("tritonclient")
        except PackageNotFoundError:
            version = "?"
    return (f"Each `config.pbtxt` was parsed, when this repository was written, with Triton's own "
            f"`ModelConfig` protobuf schema (`model_config_pb2` of tritonclient {version}).")


def models_dims(models: list[TritonModel], records: dict[str, dict]) -> set[int]:
    """Every height/width value of the models' inputs (``-1``: dynamic), for the README."""
    dims: set[int] = set()
    for m in models:
        shape = (records[m.name].get("artifact") or {}).get("input_shape") or []
        dims.update(int(s) if isinstance(s, int) else -1 for s in shape[2:])
    return dims


def _copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise InputFileError(src, "artifact file missing")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def write_triton_repository(artifacts: Iterable[str | Path], out: str | Path,
                            options: TritonOptions = TritonOptions()) -> list[TritonModel]:
    """Write a Triton model repository at ``out`` with one model per artifact; see the module doc.

    ``artifacts`` are files written by ``resunetpp export`` (``model_fp32.onnx``,
    ``openvino/model_int8.xml``, ``tensorrt/model_fp16.engine`` ...), each with its sidecar record
    (:func:`artifacts_from_export` lists an export folder's). ``out`` is replaced as a whole: the
    repository is built beside it and renamed into place.
    """
    options.validate()
    out = Path(out)
    sources = [Path(a) for a in artifacts]
    if not sources:
        raise ResUNetError("no artifacts to put in a Triton repository (export ONNX, OpenVINO or TensorRT first)")
    plans: list[tuple[str, str, str, Path, dict]] = []
    seen: dict[str, Path] = {}
    for src in sources:
        record = read_record(src)
        art = record.get("artifact") or {}
        fmt, precision = art.get("format"), art.get("precision")
        if fmt not in TRITON_BACKENDS or not precision:
            raise InputFileError(src, f"record names format {fmt!r}, precision {precision!r}; a Triton model is "
                                      f"made from {', '.join(TRITON_BACKENDS)} artifacts")
        name = _model_name(options, fmt, str(precision))
        if name in seen:
            raise InputFileError(src, f"a second {fmt} {precision} artifact (the first: {seen[name]})")
        seen[name] = src
        plans.append((name, fmt, str(precision), src, record))

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    models: list[TritonModel] = []
    records: dict[str, dict] = {}
    try:
        for name, fmt, precision, src, record in plans:
            io = artifact_io(src, record)
            config = model_config(name, fmt, record, io, options)
            folder = stage / name
            version = folder / str(options.version)
            files = []
            main = version / TRITON_BACKENDS[fmt]["files"][0]
            _copy(src, main)
            files.append(main)
            if fmt == "openvino":
                weights = version / "model.bin"
                _copy(src.with_suffix(".bin"), weights)
                files.append(weights)
            (folder / "config.pbtxt").write_text(config, encoding="utf-8")
            (folder / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
            records[name] = record
            models.append(TritonModel(name, fmt, precision, src, out / name, config,
                                      [out / p.relative_to(stage) for p in files]))
        (stage / "README.md").write_text(_readme(models, records, _schema_check(models)), encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        _replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return models


def _replace_dir(stage: Path, out: Path) -> None:
    """Rename ``stage`` onto ``out``; an existing ``out`` is moved aside first and removed after."""
    if out.exists() and not out.is_dir():
        raise InputFileError(out, "exists and is not a folder")
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the export format ------------------------------------------------------------------------------------------
#: Where ``resunetpp export --format triton`` writes the repository, relative to ``--out``.
REPOSITORY = "triton"


def _skip(options: "ExportOptions", precision: str) -> str | None:
    if options.formats and not set(options.formats) & set(TRITON_BACKENDS):
        return f"packages the artifacts built in the same export: add -f {' / -f '.join(TRITON_BACKENDS)}"
    return None


def build(run: "ExportRun", precisions: list[str]) -> None:
    """Package the artifacts of ``precisions`` this export verified and wrote (never re-verified: the
    repository holds the same files) as a Triton model repository in ``OUT/triton``."""
    written = [a for a in run.report.artifacts
               if a.written and a.format in TRITON_BACKENDS and a.precision in precisions]
    if not written:
        run.warn(f"triton {', '.join(precisions)}: no artifact of those precisions was written; no repository")
        return
    out = run.o.out / REPOSITORY
    with run.r.task(f"write the Triton model repository ({len(written)} models)", total=1) as advance:
        models = write_triton_repository([a.path for a in written], out, TritonOptions())
        advance(1)
    for precision in precisions:
        mine = [a for a in written if a.precision == precision]
        if mine:
            run.report.artifacts.append(ArtifactResult(
                "triton", precision, out, True, None, {},
                {"passed": True, "reason": "packages " + ", ".join(a.name for a in mine) + " (verified above)",
                 "models": [m.name for m in models if m.precision == precision]}))


FORMAT = register_format(ExportFormat(
    name="triton", order=1000, build=build, backend="onnxruntime", default=False, skip=_skip,
    description="a Triton Inference Server model repository of the artifacts this export verified "
                "(config.pbtxt per model; opt-in: -f triton with -f onnx / openvino / tensorrt)",
    files={p: REPOSITORY for p in PRECISIONS}))
