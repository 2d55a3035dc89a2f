"""ONNX graph building blocks: PyTorch -> ONNX FP32 (the source of every artifact), node -> module
scopes, checking, and writing an ONNX artifact with its record. The ONNX *format* (its export
steps: FP32, FP16, INT8 Q/DQ) is :mod:`resunetpp.export.onnx_format`.

Exporter choice (torch 2.13, measured on this project's model): the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``, the default and the only one not deprecated) gives the
cleaner graph -- BatchNorm folded into the convolutions that precede it, ``Gemm`` for the SE
blocks, no ``Identity``/``Constant`` clutter (157 nodes against 220 for the TorchScript
exporter) -- and its dynamic batch and height/width run correctly in ONNX Runtime and OpenVINO.
Its node names are generic (``node_Conv_282``), but every node carries the module path it came
from in ``metadata_props`` (``pkg.torch.onnx.name_scopes``); :func:`node_scopes` reads them, so
INT8/FP16 exclusions are given per module (``decoder1.attention``, ``head``). onnxslim drops
node metadata, so it is copied back by node name after simplification.

Constraints found on the way: height and width are declared as multiples of 8
(``8 * Dim(...)``; a free symbol makes torch.export fail on the stride-2 stages), the example
batch is 2 (size-1 dimensions specialise), and the lowest opset is 18 (the exporter's
down-conversion to 17 fails on ``ReduceMean`` and silently keeps 18).
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from resunetpp.artifact import INPUT_NAME, ONNX_METADATA_KEY, OUTPUT_NAME, write_sidecar
from resunetpp.atomic import atomic_path
from resunetpp.errors import ResUNetError
from resunetpp.model_config import SIZE_MULTIPLE

MIN_OPSET = 18
DEFAULT_OPSET = 18
#: Upper bounds declared to torch.export for the dynamic dimensions.
MAX_BATCH = 1024
MAX_SIDE = 8192
DIM_NAMES = ("batch", "height", "width")
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
#: The attribute under which :class:`resunetpp.model.WithActivation` holds the network.
WRAPPED_PREFIX = "model"


@dataclass(frozen=True)
class ShapeSpec:
    """Input geometry of an export: channels, classes, example (H, W), static or dynamic axes."""

    channels: int
    num_classes: int
    size: tuple[int, int]
    batch: int | None = None  # None: dynamic
    dynamic_size: bool = True

    def __post_init__(self) -> None:
        if self.batch is not None and self.batch < 1:
            raise ResUNetError(f"batch must be 'dynamic' or a positive integer, got {self.batch}")
        if any(s <= 0 or s % SIZE_MULTIPLE for s in self.size):
            raise ResUNetError(f"image size must be positive multiples of {SIZE_MULTIPLE}, got "
                               f"{self.size[0]}x{self.size[1]}")

    @property
    def example_batch(self) -> int:
        return self.batch if self.batch is not None else 2

    def example_shape(self, batch: int | None = None) -> tuple[int, int, int, int]:
        return (batch or self.example_batch, self.channels, *self.size)

    def dims(self, channels: int) -> list[int | str]:
        b = "batch" if self.batch is None else self.batch
        h, w = ("height", "width") if self.dynamic_size else self.size
        return [b, channels, h, w]

    def record(self) -> dict:
        return {
            "input_shape": self.dims(self.channels),
            "output_shape": self.dims(self.num_classes),
            "example_shape": list(self.example_shape(1 if self.batch is None else self.batch)),
            "dynamic": {"batch": self.batch is None, "height": self.dynamic_size, "width": self.dynamic_size},
        }


# ---- export ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's optional-dependency warnings (torchvision ops) and deprecations."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dynamic_shapes(spec: ShapeSpec) -> dict | None:
    from torch.export import Dim

    axes: dict[int, object] = {}
    if spec.batch is None:
        axes[0] = Dim("batch", min=1, max=MAX_BATCH)
    if spec.dynamic_size:
        axes[2] = SIZE_MULTIPLE * Dim("h", min=1, max=MAX_SIDE // SIZE_MULTIPLE)
        axes[3] = SIZE_MULTIPLE * Dim("w", min=1, max=MAX_SIDE // SIZE_MULTIPLE)
    return {"images": axes} if axes else None


def export_onnx(module, spec: ShapeSpec, *, opset: int = DEFAULT_OPSET, simplify: bool = True):
    """Export ``module`` (a :class:`~resunetpp.model.WithActivation`) to an ONNX ``ModelProto``.

    Input ``images`` (N, C, H, W) float32, output ``probs``; dynamic axes named ``batch``,
    ``height``, ``width``. The graph is checked (``onnx.checker`` full check, strict shape
    inference) before it is returned. Raises :class:`ResUNetError` with one line on failure.
    """
    import torch

    if opset < MIN_OPSET:
        raise ResUNetError(f"opset {opset} is not supported: the torch {torch.__version__.split('+')[0]} "
                           f"exporter produces opset {MIN_OPSET} or newer (use --opset {MIN_OPSET})")
    module = module.eval()
    example = torch.randn(*spec.example_shape(), generator=torch.Generator().manual_seed(0))
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=_dynamic_shapes(spec), dynamo=True, opset_version=opset,
                optimize=True, verbose=False, external_data=False)
    except Exception as e:  # the exporter raises many types; the first line names the cause
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ResUNetError(f"ONNX export failed: {first[:300]}") from e
    model = program.model_proto
    got = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if got != opset:
        raise ResUNetError(f"ONNX export produced opset {got}, not the requested {opset}")
    _name_dynamic_dims(model, spec)
    if simplify:
        model = simplify_onnx(model)
    return check_onnx(model)


def _name_dynamic_dims(model, spec: ShapeSpec) -> None:
    """Give the graph inputs/outputs' symbolic dims readable names (``batch``, ``height``, ``width``)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
            if dims[axis].dim_param:
                dims[axis].dim_param = name
    # Internal value_info may still use the exporter's symbols; shape inference recomputes them.
    del model.graph.value_info[:]


def simplify_onnx(model):
    """onnxslim simplification, keeping node names and copying the node metadata back."""
    import onnxslim

    before = {n.name: list(n.metadata_props) for n in model.graph.node}
    with _quiet_exporter():
        slim = onnxslim.slim(model)
    for node in slim.graph.node:
        if not node.metadata_props and node.name in before:
            node.metadata_props.extend(before[node.name])
    return slim


def check_onnx(model):
    """``onnx.checker`` (full) and strict shape inference; returns the shape-inferred model."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ResUNetError(f"exported ONNX graph is invalid: {str(e).splitlines()[0][:300]}") from e
    return model


# ---- node -> module scopes ------------------------------------------------------------------
def _module_of(node) -> str | None:
    props = {p.key: p.value for p in node.metadata_props}
    raw = props.get(SCOPE_KEY)
    if raw:
        try:
            scopes = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, list) and scopes:
            return str(scopes[-2]) if len(scopes) >= 2 else ""
    namespace = props.get("namespace")
    if namespace:  # ": Cls/model: Cls/model.stem: Cls" -> "model.stem"
        return namespace.split("/")[-1].split(":")[0].strip()
    return None


def _strip_wrapper(path: str) -> str:
    if path == WRAPPED_PREFIX:
        return ""
    return path.removeprefix(WRAPPED_PREFIX + ".")


def node_scopes(model) -> dict[str, str]:
    """``{node name: module path}`` of an exported graph, e.g. ``{"node_mul_390": "decoder1.attention"}``.

    Paths are those of :class:`~resunetpp.model.ResUNetPlusPlus` (``stem.body.0``, ``head``);
    nodes of the wrapper itself (the output activation) map to ``""``. Nodes without exporter
    metadata (added later, e.g. by quantization) are left out.
    """
    out: dict[str, str] = {}
    for node in model.graph.node:
        module = _module_of(node)
        if module is not None and node.name:
            own = _conv_module(node)
            out[node.name] = _strip_wrapper(own if own is not None else module)
    return out


def _conv_module(node) -> str | None:
    """The convolution module a Conv node computes, from its weight's name (``model.stem.body.0.weight``).

    The exporter folds BatchNorm into the preceding convolution and the fused node keeps the
    *BatchNorm's* metadata (``stem.body.1``); its weight keeps the convolution's parameter name, so
    ``--keep-float stem.body.0`` names the convolution as the user sees it in the model."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
        return None
    weight = node.input[1]
    if weight.startswith(WRAPPED_PREFIX + ".") and weight.endswith(".weight"):
        return weight.removesuffix(".weight")
    return None


def in_module(scope: str, module: str) -> bool:
    return scope == module or scope.startswith(module + ".")


def nodes_in_modules(scopes: dict[str, str], modules: Iterable[str]) -> list[str]:
    """Node names inside any of ``modules`` (a module and its children); unknown modules raise."""
    names: list[str] = []
    for module in modules:
        hit = [n for n, s in scopes.items() if in_module(s, module)]
        if not hit:
            known = sorted({s.split(".")[0] for s in scopes.values() if s})
            raise ResUNetError(f"module {module!r} matches no node of the graph (top-level modules: "
                               f"{', '.join(known)})")
        names.extend(hit)
    return sorted(set(names))


def module_groups(scopes: dict[str, str], depth: int = 2) -> dict[str, list[str]]:
    """Nodes grouped by their module path cut to ``depth`` parts (``decoder1.attention``): the
    units a sensitivity analysis quantizes or keeps in float one at a time."""
    groups: dict[str, list[str]] = {}
    for name, scope in scopes.items():
        key = ".".join(scope.split(".")[:depth]) if scope else "<output>"
        groups.setdefault(key, []).append(name)
    return {k: sorted(v) for k, v in sorted(groups.items())}


# ---- writing -----------------------------------------------------------------------
def embed_record(model, record: dict) -> None:
    for i, prop in enumerate(model.metadata_props):
        if prop.key == ONNX_METADATA_KEY:
            del model.metadata_props[i]
            break
    entry = model.metadata_props.add()
    entry.key = ONNX_METADATA_KEY
    entry.value = json.dumps(record, default=str)


def write_onnx_artifact(model, path: str | Path, record: dict) -> Path:
    """Embed ``record``, write the graph under a temporary name, write the sidecar, rename."""
    import onnx

    path = Path(path)
    embed_record(model, record)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
        write_sidecar(path, record)
    return path


def with_parameters(graph, source, target, prefix: str = "model."):
    """``graph``, exported from the module ``source``, with the parameters of ``target`` -- a module of
    the same architecture whose weights differ (equalized, bias-corrected) -- or ``None``.

    Every initializer named after a parameter or buffer of ``source`` (``prefix`` + its name) must equal
    it, or, for a convolution followed by a BatchNorm the exporter folded into it, equal the folded value
    (to float32 rounding); it then takes ``target``'s value, folded the same way. Any other initializer
    stays. ``None`` when an initializer matches neither or the two modules' parameters differ in name
    or shape: the caller exports ``target`` instead. About a second against ten for the exporter; the
    caller still checks the graph against ``target`` (an initializer the exporter derived from weights
    under another name would otherwise go unnoticed)::

        conv (W, b) -> BatchNorm (g, beta, mean, var)   ==  conv (W * s, (b - mean) * s + beta),
                                                            s = g / sqrt(var + eps)
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    src = {k: v.detach().numpy() for k, v in source.state_dict().items()}
    dst = {k: v.detach().numpy() for k, v in target.state_dict().items()}
    if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
        return None
    modules = dict(source.named_modules())
    folded: dict[str, str] = {}  # convolution -> the BatchNorm right after it in a Sequential
    for name, module in modules.items():
        if isinstance(module, torch.nn.Sequential):
            children = list(module.named_children())
            for (a, first), (b, second) in zip(children, children[1:]):
                if isinstance(first, torch.nn.Conv2d) and isinstance(second, torch.nn.BatchNorm2d):
                    folded[f"{name}.{a}" if name else a] = f"{name}.{b}" if name else b

    def fold(params: dict, conv: str, kind: str):
        bn = folded[conv]
        eps = np.asarray(modules[bn].eps, dtype=params[f"{bn}.running_var"].dtype)
        scale = params[f"{bn}.weight"] / np.sqrt(params[f"{bn}.running_var"] + eps)
        if kind == "weight":
            return params[f"{conv}.weight"] * scale.reshape(-1, *([1] * (params[f"{conv}.weight"].ndim - 1)))
        bias = params.get(f"{conv}.bias", np.zeros_like(scale))
        return (bias - params[f"{bn}.running_mean"]) * scale + params[f"{bn}.bias"]

    patched = onnx.ModelProto()
    patched.CopyFrom(graph)
    for init in patched.graph.initializer:
        if not init.name.startswith(prefix):
            continue
        name = init.name[len(prefix):]
        value = numpy_helper.to_array(init)
        if name in src and src[name].shape == value.shape and np.array_equal(src[name].astype(value.dtype), value):
            new = dst[name]
        else:
            conv, _, kind = name.rpartition(".")
            if conv not in folded or kind not in ("weight", "bias"):
                return None
            want = fold(src, conv, kind)
            if want.shape != value.shape or not np.allclose(want, value, rtol=1e-5,
                                                            atol=1e-6 * float(np.abs(value).max(initial=1.0))):
                return None
            new = fold(dst, conv, kind)
        init.CopyFrom(numpy_helper.from_array(np.asarray(new, dtype=value.dtype), init.name))
    return patched
