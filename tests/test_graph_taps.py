"""``GraphTaps.observe`` reuses its output buffers between batches (ONNX Runtime's I/O binding): every
batch still sees its own values, a tapped graph input is a copy (the caller's batch is never changed
even when the update works in place), and batches of a new shape get buffers of their own."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from resunetpp.engines.graph_taps import GraphTaps


def _graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h", "w"])
    nodes = [helper.make_node("Neg", ["x"], ["neg"]), helper.make_node("Relu", ["neg"], ["y"])]
    graph = helper.make_graph(nodes, "taps", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_every_batch_sees_its_own_values_and_the_callers_batches_are_untouched():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(s).astype(np.float32) for s in
               [(4, 2, 3, 5), (4, 2, 3, 5), (4, 2, 3, 5), (2, 2, 3, 5), (4, 2, 6, 4)]]
    originals = [b.copy() for b in batches]
    seen: dict[str, list[np.ndarray]] = {"x": [], "neg": []}
    done = []

    def update(tensor, value):
        seen[tensor].append(value.numpy().copy())
        value.abs_()  # allowed: the buffer is the pass's own

    GraphTaps(_graph(), ["x", "neg"]).observe(batches, update, done.append)
    assert done == [4, 4, 4, 2, 4]
    for b, orig in zip(batches, originals):
        np.testing.assert_array_equal(b, orig)
    for got, orig in zip(seen["x"], originals):
        np.testing.assert_array_equal(got, orig)
    for got, orig in zip(seen["neg"], originals):
        np.testing.assert_array_equal(got, -orig)


def test_a_pruned_graph_runs_only_what_the_tapped_tensors_need():
    x = np.random.default_rng(1).standard_normal((3, 2, 4, 4)).astype(np.float32)
    pruned = GraphTaps(_graph(), ["neg"], prune=True)
    assert [o.name for o in pruned.session.get_outputs()] == ["neg"]  # the Relu and the output "y" are gone
    np.testing.assert_array_equal(pruned(x)["neg"], -x)
    whole = GraphTaps(_graph(), ["neg"])
    assert {o.name for o in whole.session.get_outputs()} == {"y", "neg"}
