"""Intermediate tensors of an ONNX graph, read while ONNX Runtime runs it (the calibration passes).

ONNX Runtime's own calibrators do the same -- they "augment" the graph, adding the tensors they
observe to its outputs -- but for every tensor of every quantizable op. The calibration steps of the
INT8 export need only the inputs of the convolutions (the Q/DQ ranges, the equalization's channel
ranges): :class:`GraphTaps` adds exactly those and runs the graph on the CPU provider. On the 2-core
box ONNX Runtime runs ResUNet++ FP32 in about 0.22 s a 256x256 image against PyTorch's 0.5 s (NHWC),
and what it computes is what ``quantize_static``'s own calibrator would have seen::

    images ──> [ONNX Runtime: the exported graph] ──> probabilities
                       │ conv inputs (added outputs)
                       └──> {tensor name: (N, C, H, W) array} ──> histograms / channel maxima

It sits with the engines because they are the one layer that opens runtime sessions
(``tests/test_layering.py``); :mod:`resunetpp.export` calls it for its calibration passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from resunetpp.errors import ResUNetError


class GraphTaps:
    """An ONNX Runtime session of ``model`` (an ``onnx.ModelProto``; not changed) that returns the
    intermediate ``tensors`` as well. ``taps(x)``: ``{tensor: array}`` for one input batch.

    ``prune=True`` runs only the part of the graph the tensors depend on (``onnx.utils.Extractor``):
    a pass over a tensor halfway through the network costs a fraction of a whole forward pass."""

    def __init__(self, model, tensors: Sequence[str], prune: bool = False) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        self.tensors = list(dict.fromkeys(tensors))
        inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        produced = {t for node in model.graph.node for t in node.output}
        missing = [t for t in self.tensors if t not in produced and t not in inputs]
        if missing:
            raise ResUNetError(f"tensor {missing[0]!r} is not in the graph")
        tapped = onnx.ModelProto()
        if prune:
            from onnx.utils import Extractor

            full = onnx.ModelProto()
            full.CopyFrom(model)
            typed = {v.name for v in list(full.graph.value_info) + list(full.graph.input) + list(full.graph.output)}
            full.graph.value_info.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                                         for t in self.tensors if t not in typed)  # what the extractor asks for
            tapped.CopyFrom(Extractor(full).extract_model(inputs, self.tensors))
        else:
            tapped.CopyFrom(model)
        outputs = {o.name for o in tapped.graph.output}
        for t in self.tensors:
            if t not in outputs:
                tapped.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
        self.session = ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ResUNetError(f"expected a graph with one input, found {len(inputs)}")
        self.input = inputs[0].name
        first = inputs[0].shape[0] if inputs[0].shape else None
        self.batch = first if isinstance(first, int) and first > 0 else None  # a static-batch graph

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``{tensor: array}`` for the images of ``x``; a static-batch graph runs them ``batch`` at a
        time (the last piece padded with copies of its last image, whose outputs are dropped) and the
        pieces are concatenated."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if self.batch is None or n == self.batch:
            return dict(zip(self.tensors, self.session.run(self.tensors, {self.input: x})))
        if n % self.batch:
            x = np.concatenate([x, np.repeat(x[-1:], self.batch - n % self.batch, axis=0)])
        parts = [self.session.run(self.tensors, {self.input: x[i:i + self.batch]})
                 for i in range(0, x.shape[0], self.batch)]
        return {t: np.concatenate([p[k] for p in parts])[:n] for k, t in enumerate(self.tensors)}

    def observe(self, batches: Iterable[np.ndarray], update: Callable[[str, object], None],
                progress: Callable[[int], None] | None = None) -> None:
        """The calibration passes' loop: each batch through the graph, then ``update(tensor, value)`` for
        every tapped tensor and ``progress(images in the batch)``. ``value`` is a torch tensor over an
        output buffer the next batch overwrites: the caller may change it in place but must not keep it.

        The buffers are bound once per input shape (ONNX Runtime's I/O binding) and reused: a fresh
        output array for every batch costs the kernel a new zeroed page every 4 KiB, about as much time
        on this model's 150 MB of tapped tensors per image as the statistics themselves."""
        import torch

        bound: tuple | None = None  # (input shape, binding, {tensor: array})
        for x in batches:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if bound is not None and bound[0] == x.shape:
                _, binding, outs = bound
                binding.bind_cpu_input(self.input, x)
                self.session.run_with_iobinding(binding)
                if self.input in outs:  # the input itself is tapped: ONNX Runtime aliases it, not copies
                    np.copyto(outs[self.input], x)
            else:  # a new shape (the first batch, a smaller last one): a plain run, then bind its shapes
                outs = self(x)
                if self.batch is None or x.shape[0] == self.batch:
                    bound = self._bind(x.shape, outs)
            for t in self.tensors:
                update(t, torch.from_numpy(outs[t]))
            if progress:
                progress(int(x.shape[0]))

    def _bind(self, shape: tuple, like: dict[str, np.ndarray]) -> tuple:
        """An I/O binding for inputs of ``shape`` whose outputs are new arrays shaped as ``like``'s."""
        binding = self.session.io_binding()
        arrays = {t: np.empty_like(a) for t, a in like.items()}
        for t, a in arrays.items():
            if t != self.input:
                binding.bind_output(t, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        return shape, binding, arrays


__all__ = ["GraphTaps"]
