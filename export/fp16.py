"""FP16 ONNX: weights and arithmetic in half precision, input ``images`` and output ``probs`` FP32.

This graph is what TensorRT builds FP16 engines from when networks are strongly typed
(TensorRT 11, and the default path on 10.x), so every node it leaves in FP16 *will* compute in
FP16 on the GPU. ResUNet++'s attention blocks multiply two unbounded feature maps and its
activations were seen spanning five orders of magnitude, beyond FP16's 65,504. Nodes are kept
in FP32 when

* they produce the output activation (probabilities keep full precision near 0 and 1),
* their op type or module is on the block list (default: ``Softmax``; the attention products
  ``decoder*.attention`` ``Mul``), or
* an input or output of theirs was observed above :data:`FP16_RANGE_LIMIT` (1/8 of the FP16
  range, as headroom for images the probe did not see) when the FP32 graph ran on sample
  images -- the ModelOpt AutoCast rule, measured with ONNX Runtime.

The conversion itself is written with ``onnx.helper``: ``onnxconverter_common``'s converter
(1.16, with onnx 1.23) types the graph output FP16 when the node producing it is blocked, and
ONNX Runtime's fork of it emits unsorted graphs that fail ``onnx.checker``. Here each node is
either FP16 or FP32, FP32 initializers get FP16 copies for FP16 consumers (clamped to the FP16
range, counted), and a ``Cast`` is inserted on every edge whose producer and consumer disagree.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from resunetpp.export.onnx_graph import check_onnx, node_scopes, nodes_in_modules
from resunetpp.artifact import INPUT_NAME
from resunetpp.errors import ResUNetError

FP16_MAX = 65504.0
#: Nodes touching values above this (observed on sample images) stay FP32.
FP16_RANGE_LIMIT = FP16_MAX / 8
#: Inputs that must stay FP32 in an FP16 node (ONNX type constraints), by op type.
FP32_ONLY_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}


@dataclass(frozen=True)
class FP16Recipe:
    """What stays in FP32 when converting to FP16."""

    keep_modules: tuple[str, ...] = ()
    keep_nodes: tuple[str, ...] = ()
    keep_op_types: tuple[str, ...] = ("Softmax",)
    keep_output_activation: bool = True
    keep_attention_products: bool = True
    range_limit: float | None = FP16_RANGE_LIMIT

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FP16Result:
    model: object
    fp32_nodes: dict[str, str]  # node -> reason
    clamped_values: int
    max_abs_activation: float | None
    probe_images: int
    recipe: FP16Recipe = field(default_factory=FP16Recipe)

    def record(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "fp32_nodes": self.fp32_nodes,
                "clamped_initializer_values": self.clamped_values,
                "max_abs_activation_fp32": self.max_abs_activation, "range_probe_images": self.probe_images}


# ---- range probe ----------------------------------------------------------------------------------
def _float_types(model) -> dict[str, int]:
    from onnx import TensorProto

    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return {k: v for k, v in types.items() if v == TensorProto.FLOAT}


def activation_ranges(model, inputs: Iterable[np.ndarray]) -> dict[str, float]:
    """Largest |value| of every float tensor of ``model`` over ``inputs`` ((C,H,W) each), by name."""
    probe = copy.deepcopy(model)
    floats = _float_types(probe)
    known = {o.name for o in probe.graph.output}
    vi = {v.name: v for v in probe.graph.value_info}
    for node in probe.graph.node:
        for name in node.output:
            if name in floats and name not in known and name in vi:
                probe.graph.output.append(vi[name])
                known.add(name)
    from resunetpp.engines.onnxrt_engine import cpu_session  # a raw session: every tensor is an output

    session = cpu_session(probe)
    names = [o.name for o in session.get_outputs()]
    batch = session.get_inputs()[0].shape[0]
    repeat = batch if isinstance(batch, int) and batch > 1 else 1  # a static-batch graph
    peak: dict[str, float] = {}
    for x in inputs:
        feed = np.repeat(np.asarray(x, dtype=np.float32)[None], repeat, axis=0)
        outs = session.run(names, {INPUT_NAME: feed})
        for name, arr in zip(names, outs):
            a = np.abs(np.asarray(arr, dtype=np.float64))
            v = float(a.max()) if a.size else 0.0
            peak[name] = max(peak.get(name, 0.0), v if np.isfinite(v) else float(np.finfo(np.float32).max))
    return peak


# ---- choosing FP32 nodes ------------------------------------------------------------------------------
def resolve_fp32_nodes(model, recipe: FP16Recipe, ranges: dict[str, float] | None = None) -> dict[str, str]:
    """``{node: reason}`` of the nodes the recipe keeps in FP32 (``ranges`` from :func:`activation_ranges`)."""
    g = model.graph
    scopes = node_scopes(model)
    names = {n.name for n in g.node}
    keep: dict[str, str] = {}
    unknown = [n for n in recipe.keep_nodes if n not in names]
    if unknown:
        raise ResUNetError(f"FP16 recipe: node {unknown[0]!r} is not in the graph")
    for n in recipe.keep_nodes:
        keep[n] = "listed"
    for n in nodes_in_modules(scopes, recipe.keep_modules):
        keep.setdefault(n, "module")
    outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type in recipe.keep_op_types:
            keep.setdefault(node.name, f"op {node.op_type}")
        if recipe.keep_output_activation and outputs & set(node.output) and node.op_type in ("Sigmoid", "Softmax"):
            keep.setdefault(node.name, "output activation")
        scope = scopes.get(node.name, "")
        if (recipe.keep_attention_products and node.op_type == "Mul"
                and scope.rsplit(".", 1)[-1] == "attention"):
            keep.setdefault(node.name, "attention product (unbounded)")
    if ranges and recipe.range_limit is not None:
        for node in g.node:
            touched = [ranges.get(t, 0.0) for t in list(node.input) + list(node.output) if t]
            peak = max(touched, default=0.0)
            if peak > recipe.range_limit:
                keep.setdefault(node.name, f"range {peak:.3g} > {recipe.range_limit:g}")
    return keep


# ---- conversion ----------------------------------------------------------------------------------------
class _Converter:
    def __init__(self, model, keep_fp32: Collection[str]) -> None:
        from onnx import AttributeProto, TensorProto

        self.FLOAT, self.HALF = TensorProto.FLOAT, TensorProto.FLOAT16
        self.m = copy.deepcopy(model)
        g = self.m.graph
        for node in g.node:
            if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
                raise ResUNetError(f"FP16 conversion: node {node.name!r} has a subgraph (not supported)")
        self.floats = set(_float_types(self.m))
        self.inits = {t.name: t for t in g.initializer}
        self.half_nodes = {n.name for n in g.node if n.name not in keep_fp32
                           and any(t in self.floats for t in list(n.input) + list(n.output) if t)}
        self.produced = {t.name: self.FLOAT for t in g.input if t.name in self.floats}
        self.casts: dict[tuple[str, int], str] = {}
        self.half_inits: dict[str, str] = {}
        self.clamped = 0
        self.nodes: list = []

    def _cast(self, tensor: str, to: int) -> str:
        from onnx import helper

        key = (tensor, to)
        if key not in self.casts:
            name = f"{tensor}__{'fp16' if to == self.HALF else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [tensor], [name], to=to, name=f"{name}__cast"))
            self.casts[key] = name
        return self.casts[key]

    def _to_half(self, array: np.ndarray) -> np.ndarray:
        over = np.abs(array) > FP16_MAX
        self.clamped += int(np.count_nonzero(over & np.isfinite(array)))
        return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)

    def _half_init(self, name: str) -> str:
        from onnx import numpy_helper

        if name not in self.half_inits:
            new = f"{name}__fp16"
            tensor = numpy_helper.from_array(self._to_half(numpy_helper.to_array(self.inits[name])), new)
            self.m.graph.initializer.append(tensor)
            self.half_inits[name] = new
        return self.half_inits[name]

    def _halve_attributes(self, node) -> None:
        from onnx import numpy_helper

        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == self.FLOAT:
                attr.i = self.HALF
            elif attr.name == "value" and attr.t.data_type == self.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(self._to_half(numpy_helper.to_array(attr.t)), attr.t.name))

    def run(self):
        from onnx import helper

        g = self.m.graph
        graph_outputs = {o.name for o in g.output}
        for node in list(g.node):
            half = node.name in self.half_nodes
            for idx, t in enumerate(node.input):
                if not t or t not in self.floats:
                    continue
                want = self.FLOAT if not half or idx in FP32_ONLY_INPUTS.get(node.op_type, ()) else self.HALF
                if t in self.inits:
                    if want == self.HALF:
                        node.input[idx] = self._half_init(t)
                elif self.produced.get(t, self.FLOAT) != want:
                    node.input[idx] = self._cast(t, want)
            if half:
                self._halve_attributes(node)
            renamed = []
            for k, out in enumerate(node.output):
                if out in self.floats:
                    if half and out in graph_outputs:
                        node.output[k] = f"{out}__fp16"
                        renamed.append(out)
                    self.produced[out] = self.HALF if half and out not in renamed else self.FLOAT
            self.nodes.append(node)
            for out in renamed:  # graph outputs stay FP32
                self.nodes.append(helper.make_node("Cast", [f"{out}__fp16"], [out], to=self.FLOAT,
                                                   name=f"{out}__output_cast"))
        used = {t for n in self.nodes for t in n.input}
        keep_inits = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep_inits)
        del g.node[:]
        g.node.extend(self.nodes)
        del g.value_info[:]
        return check_onnx(self.m)


def convert_to_fp16(model, keep_fp32: Collection[str] = ()):
    """FP16 copy of ``model``: every float node not in ``keep_fp32`` computes in FP16; I/O stay FP32.

    Returns ``(model, clamped)``: the checked ``ModelProto`` and how many weight values were
    clamped to +-65504.
    """
    conv = _Converter(model, keep_fp32)
    out = conv.run()
    return out, conv.clamped


def build_fp16(model, recipe: FP16Recipe = FP16Recipe(), probe_inputs: Iterable[np.ndarray] = ()) -> FP16Result:
    """Probe ranges on ``probe_inputs``, choose the FP32 nodes, convert. ``probe_inputs`` may be empty."""
    inputs = list(probe_inputs)
    ranges = activation_ranges(model, inputs) if inputs and recipe.range_limit is not None else None
    keep = resolve_fp32_nodes(model, recipe, ranges)
    converted, clamped = convert_to_fp16(model, keep)
    peak = max(ranges.values()) if ranges else None
    return FP16Result(converted, dict(sorted(keep.items())), clamped, peak, len(inputs), recipe)


def fp16_node_fraction(model) -> float:
    """Share of compute nodes (not Cast) whose output is FP16 -- a quick sanity number."""
    from onnx import TensorProto

    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    nodes = [n for n in model.graph.node if n.op_type != "Cast" and n.output]
    half = [n for n in nodes if types.get(n.output[0]) == TensorProto.FLOAT16]
    return len(half) / max(len(nodes), 1)


def modules_of(model, nodes: Iterable[str]) -> list[str]:
    """Module paths of ``nodes`` (for reports)."""
    scopes = node_scopes(model)
    return sorted({scopes.get(n, "") for n in nodes})


__all__ = ["FP16Recipe", "FP16Result", "FP16_MAX", "FP16_RANGE_LIMIT", "activation_ranges", "build_fp16",
           "convert_to_fp16", "fp16_node_fraction", "modules_of", "resolve_fp32_nodes"]
