"""The FP32 model the INT8 artifacts are quantized from: the checkpoint's own graph, or the model with
its activation ranges equalized (:mod:`resunetpp.export.equalize`; the same function, checked against the
original in PyTorch on held-out images) and its biases corrected for INT8's mean shifts
(:mod:`resunetpp.export.bias_correction`), exported to ONNX once per export and shared by the Q/DQ ONNX,
the NNCF IR and the TensorRT INT8 engines."""

from __future__ import annotations

from typing import TYPE_CHECKING

from resunetpp.export import onnx_graph
from resunetpp.export.quantize import QDQRecipe
from resunetpp.export.verify import FP32_MAX_ABS_ERROR
from resunetpp.errors import ResUNetError

if TYPE_CHECKING:
    from resunetpp.export.context import ExportRun

#: Held-out images on which the equalized model must match the original (PyTorch, probabilities).
EQUALIZATION_CHECK_IMAGES = 4


def int8_source(run: ExportRun):
    """The FP32 ONNX (path, model) the INT8 artifacts are quantized from: the export's own, or
    the model with equalized activation ranges (``QDQRecipe.equalize_alpha``, same function:
    checked against the original in PyTorch on held-out images) and biases corrected for
    INT8's mean shifts (``QDQRecipe.bias_correction_images``, :mod:`resunetpp.export.bias_correction`)."""
    recipe = run.o.qdq
    if recipe.equalize_alpha is None and not recipe.bias_correction_images:
        return run.onnx_paths["fp32"], run.fp32_model
    if "int8_source" not in run.onnx_paths:
        _prepare(run, recipe)
    return run.onnx_paths["int8_source"], run.int8_source_model


def int8_source_torch(run: ExportRun):
    """The PyTorch model :func:`int8_source`'s ONNX was exported from (the same function)."""
    int8_source(run)
    if run.int8_source_torch is None:
        run.int8_source_torch = run.ckpt.build_model().eval()
    return run.int8_source_torch


def source_record(run: ExportRun) -> dict:
    """What the INT8 source model went through, for every INT8 artifact's ``quantization``."""
    return {"equalization": run.equalization_record, "bias_correction": run.bias_correction_record}


def _prepare(run: ExportRun, recipe: QDQRecipe) -> None:
    import onnx
    import torch

    from resunetpp.model import WithActivation

    model = run.ckpt.build_model()
    with run.r.task("load calibration images", total=len(run.calib)) as adv:
        images = []
        for x in run.calib.inputs(run.pre):  # decoded once for both steps
            images.append(x[None])
            adv(1)
    steps = []
    if recipe.equalize_alpha is not None:
        from resunetpp.export.equalize import equalize

        alpha = recipe.equalize_alpha
        with run.r.task(f"equalize activation ranges (alpha {alpha:g}, PyTorch)"):
            result = equalize(model, images, alpha)
        # The same function: compare with the unequalized model on held-out images.
        original = WithActivation(run.ckpt.build_model()).eval()
        equalized = WithActivation(model).eval()
        with torch.no_grad():
            err = max(float((equalized(t) - original(t)).abs().max())
                      for t in (torch.as_tensor(x[None]) for x in run.vset.inputs[:EQUALIZATION_CHECK_IMAGES]))
        if not err <= FP32_MAX_ABS_ERROR:
            raise ResUNetError(f"equalization changed the FP32 model (largest probability difference {err:.3g} > "
                               f"{FP32_MAX_ABS_ERROR:g}); export with --no-equalize")
        run.equalization_record = {**result.record(), "fp32_max_abs_difference": err,
                                   "checked_on_images": min(EQUALIZATION_CHECK_IMAGES, len(run.vset.inputs))}
        steps.append("equalized")
    if recipe.bias_correction_images:
        from resunetpp.export.bias_correction import bias_correct
        from resunetpp.export.quantsim import sim_ranges

        n = min(recipe.bias_correction_images, len(run.calib))
        with run.r.task(f"correct INT8 biases ({n} images, simulated INT8)", total=n) as adv:
            run.bias_correction_record = bias_correct(
                model, images, recipe.bias_correction_images, progress=adv, keep_modules=recipe.keep_modules,
                **sim_ranges(recipe.method, recipe.percentile))
        steps.append("bias-corrected")
    name = " and ".join(steps)
    with run.r.task(f"export the {name} model to ONNX"):
        run.int8_source_torch = model.eval()
    run.int8_source_model = onnx_graph.export_onnx(WithActivation(model), run.spec, opset=run.o.opset,
                                                       simplify=run.o.simplify)
    path = run.work / "fp32_int8_source.onnx"
    onnx.save_model(run.int8_source_model, str(path))
    run.onnx_paths["int8_source"] = path


__all__ = ["EQUALIZATION_CHECK_IMAGES", "int8_source", "int8_source_torch", "source_record"]
