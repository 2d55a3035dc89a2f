"""The ONNX format: FP32 (the source of every artifact, verified against PyTorch with its dynamic
axes exercised; the export stops if it does not match), FP16 (:mod:`resunetpp.export.fp16`) and INT8 Q/DQ
(:mod:`resunetpp.export.quantize`, from the INT8 source model of :mod:`resunetpp.export.int8_source`), each verified
on ONNX Runtime's CPU provider before it is written. The graph building blocks (exporter, node
scopes, writing) are :mod:`resunetpp.export.onnx_graph`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from resunetpp.export import onnx_graph
from resunetpp.export.formats import ExportFormat, register_format
from resunetpp.export.inputs import batches
from resunetpp.export.int8_source import calibration_method, conv_ranges, int8_source, source_cache_key, source_record
# Also the ONNX graph API callers outside export use (DEFAULT_OPSET, ShapeSpec, export_onnx, write_onnx_artifact);
# new code imports them from export.onnx_graph.
from resunetpp.export.onnx_graph import DEFAULT_OPSET, ShapeSpec, export_onnx, write_onnx_artifact  # noqa: F401
from resunetpp.export.verify import FP32_MAX_ABS_ERROR, PredictFn, gate_for
from resunetpp.errors import ResUNetError

if TYPE_CHECKING:
    from resunetpp.export.context import ExportRun

#: Held-out images the FP32 graph is checked on when it is not itself an output of the export.
INTERMEDIATE_CHECK_IMAGES = 8
#: Images the FP16 range probe runs (calibration images when given, else verification images).
RANGE_PROBE_IMAGES = 32


def build(run: ExportRun, precisions: list[str]) -> None:
    """Build, verify and write the ONNX artifacts of ``precisions`` (FP32 first: every other
    artifact is built from it)."""
    if "fp32" in precisions:
        fp32(run, write=True)
    if "fp16" in precisions:
        fp16(run, write=True)
    if "int8" in precisions:
        int8(run, write=True)


def fp32(run: ExportRun, write: bool) -> None:
    import onnx

    from resunetpp.model import WithActivation

    model = run.export_onnx(WithActivation(run.ckpt.build_model()),
                            f"export ONNX (opset {run.o.opset}, torch dynamo exporter)", {"model": run.ckpt.sha256})
    run.fp32_model = model
    path = run.work / "fp32.onnx"
    onnx.save_model(model, str(path))
    run.onnx_paths["fp32"] = path
    # not an output (e.g. -p int8): the graph is checked against PyTorch on a few images, then gives the
    # reference the artifacts built from it are verified against on every held-out image
    images = None if write else INTERMEDIATE_CHECK_IMAGES
    with run.staged(path, "onnx", "fp32") as predict:
        metrics = run.measure("ONNX FP32 (ONNX Runtime)" if write else
                              f"the FP32 ONNX the other artifacts are built from ({images} images, ONNX Runtime)",
                              predict, images=images)
        metrics["dynamic_axes_check"] = _check_dynamic(run, predict)
        gate = gate_for("fp32", metrics)
        if not gate.passed:
            raise ResUNetError(f"the exported ONNX graph does not match PyTorch: {gate.reason}")
        if not write:  # the checked graph gives the reference on every held-out image
            import hashlib

            run.graph_reference(predict, hashlib.sha256(path.read_bytes()).hexdigest(),
                                min(images, len(run.vset.inputs)))
    if write:
        final = run.final("onnx", "fp32")
        rec = run.record("onnx", "fp32", final, {**metrics, "gate": gate.as_dict()}, onnx=_onnx_info(run, model),
                         verification={**run.vset.record(), "runtime": "onnxruntime CPUExecutionProvider"})
        write_onnx_artifact(model, final, rec)
        run.add("onnx", "fp32", final, True, metrics, gate)


def _onnx_info(run: ExportRun, model) -> dict:
    opset = {o.domain: o.version for o in model.opset_import}.get("", run.o.opset)
    return {"opset": opset, "exporter": "torch.onnx.export(dynamo=True)", "simplified": run.o.simplify,
            "nodes": len(model.graph.node), "ir_version": model.ir_version}


def _check_dynamic(run: ExportRun, predict: PredictFn) -> dict | None:
    """Run shapes other than the example through the graph and PyTorch (dynamic axes really work)."""
    import torch

    from resunetpp.model import WithActivation

    shapes = []
    _, c, h, w = run.spec.example_shape(1)
    if run.spec.batch is None:
        shapes.append((3, c, h, w))
    if run.spec.dynamic_size:
        shapes.append((run.spec.batch or 1, c, h, w + 2 * 8))
    if not shapes:
        return None
    net = WithActivation(run.ckpt.build_model())
    rng = np.random.default_rng(1)
    worst = 0.0
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        got = predict(x)
        if got.shape != ref.shape:
            raise ResUNetError(f"exported ONNX graph returns {got.shape} for input {shape}, PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > FP32_MAX_ABS_ERROR:
        raise ResUNetError(f"exported ONNX graph differs from PyTorch by {worst:.3g} on inputs {shapes} "
                           "(dynamic axes)")
    return {"shapes": [list(s) for s in shapes], "max_abs_error": worst}

def fp16(run: ExportRun, write: bool) -> None:
    import onnx

    from resunetpp.export.fp16 import build_fp16

    probe = _probe_inputs(run)
    with run.r.task(f"FP16 ONNX (range probe on {len(probe)} images)"):
        result = build_fp16(run.fp32_model, run.o.fp16, probe)
    run.fp16_result = result
    path = run.work / "fp16.onnx"
    onnx.save_model(result.model, str(path))
    run.onnx_paths["fp16"] = path
    if not write:
        return
    with run.staged(path, "onnx", "fp16") as predict:
        metrics = run.measure("ONNX FP16 (ONNX Runtime)", predict)
    gate, keep = run.judge("onnx", "fp16", metrics)
    final = run.final("onnx", "fp16")
    if keep:
        rec = run.record("onnx", "fp16", final, {**metrics, "gate": gate.as_dict(run.o.allow_accuracy_drop)},
                         onnx=_onnx_info(run, result.model), fp16=result.record(),
                         verification={**run.vset.record(), "runtime": "onnxruntime CPUExecutionProvider "
                                       "(FP16 ops without a CPU kernel run in FP32 between casts)"})
        write_onnx_artifact(result.model, final, rec)
    run.add("onnx", "fp16", final, keep, metrics, gate)


def _probe_inputs(run: ExportRun) -> list[np.ndarray]:
    if run.calib is not None:
        out = []
        for x in run.calib.inputs(run.pre):
            out.append(x)
            if len(out) == RANGE_PROBE_IMAGES:
                break
        return out
    return run.vset.inputs[:RANGE_PROBE_IMAGES]

def int8(run: ExportRun, write: bool) -> None:
    import onnx

    from resunetpp.export import fast_calibration
    from resunetpp.export.quantize import calibrate_ranges, quantize_qdq

    recipe = run.o.qdq
    source, source_model = int8_source(run)
    cache = run.work / f"ranges_{recipe.method}.json"
    if conv_ranges(run) is not None:
        _pass_ranges(run, source_model, cache)
    elif fast_calibration.supports(recipe.method, recipe.conv_only, recipe.quantize_outputs):
        _fast_ranges(run, source_model, cache)
    else:
        calib_batches = batches(run.calib.inputs(run.pre), run.o.batch or 1, fixed=run.o.batch is not None)
        with run.r.task(f"calibrate Q/DQ ranges ({recipe.method}, ONNX Runtime)", total=len(run.calib)) as adv:
            calibrate_ranges(source, calib_batches, cache, method=recipe.method, percentile=recipe.percentile,
                             progress=adv)
    with run.r.task("quantize Q/DQ ONNX (ONNX Runtime quantize_static)"):
        result = quantize_qdq(source, cache, run.work / "int8_qdq.onnx", recipe)
    run.onnx_paths["int8_qdq"] = result.path
    run.qdq_record = {**result.record(), **source_record(run)}
    if not write:
        return
    with run.staged(result.path, "onnx", "int8") as predict:
        metrics = run.measure("ONNX INT8 Q/DQ (ONNX Runtime)", predict, "int8")
    gate, keep = run.judge("onnx", "int8", metrics)
    final = run.final("onnx", "int8")
    if keep:
        model = onnx.load(str(result.path))
        rec = run.record("onnx", "int8", final, {**metrics, "gate": gate.as_dict(run.o.allow_accuracy_drop)},
                         calibration=run.calibration_record(calibration_method(run)),
                         quantization=run.qdq_record, onnx=_onnx_info(run, model),
                         verification={**run.vset.record(), "runtime": "onnxruntime CPUExecutionProvider"})
        write_onnx_artifact(model, final, rec)
    run.add("onnx", "int8", final, keep, metrics, gate)

def _pass_ranges(run: ExportRun, source_model, cache) -> None:
    """The one calibration pass's ranges (:func:`resunetpp.export.int8_source.conv_ranges`) keyed by the
    tensors the source graph's convolutions read, written as the calibration cache ``quantize_qdq`` reads."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    from resunetpp.export import fast_calibration

    recipe = run.o.qdq
    ranges, images = conv_ranges(run)
    data, per_image = {}, {}
    for module, tensor in fast_calibration.conv_input_tensors(source_model).items():
        if module not in ranges:
            raise ResUNetError(f"no calibrated range for convolution {module!r} of the INT8 source graph")
        if tensor not in data:  # convolutions reading one tensor got the same range
            a = np.float32(ranges[module])
            data[tensor] = TensorData(lowest=-a, highest=a)
            if images:
                per_image[tensor] = images[module]
    method = CalibrationMethod.MinMax if recipe.method == "minmax" else CalibrationMethod.Percentile
    _save_ranges(run, TensorsData(method, data), per_image, cache)


def _save_ranges(run: ExportRun, ranges, per_image: dict, cache) -> None:
    """Write ``ranges``, each widened by the small-set rule when ``per_image`` holds the per-image
    percentiles (fewer than :data:`resunetpp.export.ranges.SMALL_SET_IMAGES` calibration images)."""
    from resunetpp.export import fast_calibration
    from resunetpp.export.image_tails import widen_ranges
    from resunetpp.export.ranges import SMALL_SET_IMAGES

    if per_image:
        recipe = run.o.qdq
        ranges, widened = widen_ranges(ranges, per_image, len(run.calib))
        run.r.info(f"{len(run.calib)} calibration images (< {SMALL_SET_IMAGES}): {len(widened)} of "
                   f"{len(ranges.data)} ranges widened to the largest per-image {recipe.percentile:g}th percentile")
    fast_calibration.save_ranges(ranges, cache)


def _fast_ranges(run: ExportRun, source_model, cache) -> None:
    """The conv-only recipe's ranges from one ONNX Runtime pass over the source graph with ONNX Runtime's
    histograms (:mod:`resunetpp.export.fast_calibration`), written as the calibration cache ``quantize_qdq`` reads.
    The histograms of every convolution input (whatever is kept in float) are kept in the cache of
    :mod:`resunetpp.cache`, keyed by what the source model depends on."""
    from resunetpp.export import fast_calibration
    from resunetpp.export.image_tails import ImageTails
    from resunetpp.export.int8_source import cached, calib_images, keep
    from resunetpp.export.quantize import CALIB_CHUNK, _chunks
    from resunetpp.export.ranges import SMALL_SET_IMAGES

    recipe = run.o.qdq
    tensors = fast_calibration.conv_input_tensors(source_model)
    first: dict[str, str] = {}  # tensor -> the first convolution reading it (names entries by module)
    for module, tensor in tensors.items():
        first.setdefault(tensor, module)
    # below SMALL_SET_IMAGES images each range is widened to the largest per-image percentile
    # (export.ranges.small_set_range): those per-image percentiles are collected in the same pass
    small = recipe.method == "percentile" and len(run.calib) < SMALL_SET_IMAGES
    # the percentile method bins only the upper tail after the first chunk (fast_calibration.OrtAbsHistogram)
    tail = recipe.percentile if recipe.method == "percentile" else None
    key = {**source_cache_key(run), "batch": run.o.batch, "chunk": CALIB_CHUNK, "bins": fast_calibration.ORT_BINS,
           **({"image_tails": recipe.percentile} if small else {}),
           **({"tail_share": fast_calibration.TAIL_SHARE} if tail is not None else {})}
    parts = ("hist", "edges", "minmax") + (("tails",) if small else ())
    names = {f"{m}/{part}" for m in first.values() for part in parts}
    arrays = cached(run, "conv-input-histograms", key,
                    lambda a: None if set(a) == names else "its convolutions are not this graph's")
    if arrays is not None:
        histograms = {t: (arrays[f"{m}/hist"].astype(np.int64), arrays[f"{m}/edges"].astype(np.float32),
                          np.float32(arrays[f"{m}/minmax"][0]), np.float32(arrays[f"{m}/minmax"][1]))
                      for t, m in first.items()}
        tails = {t: arrays[f"{m}/tails"].astype(np.float64) for t, m in first.items()} if small else {}
        bad = [m for t, m in first.items() if histograms[t][0].shape[0] + 1 != histograms[t][1].shape[0]]
        if bad:
            run.warn(f"ignoring a conv-input-histograms cache entry ({bad[0]}: histogram and edges disagree); "
                     "recomputing")
            arrays = None
    if arrays is None:
        image_tails = ImageTails(recipe.percentile) if small else None
        with run.r.task(f"calibrate Q/DQ ranges ({recipe.method}, one ONNX Runtime pass)", total=len(run.calib)) as adv:
            calib_batches = batches((x[0] for x in calib_images(run)), run.o.batch or 1, fixed=run.o.batch is not None)
            # one histogram update per chunk, as ORT's collect_data sees it; images of other sizes
            # (preprocessing mode "pad") cannot share an array: each run of one size is its own update
            chunks = [np.concatenate(run_) for c in _chunks(calib_batches, CALIB_CHUNK) for run_ in _same_size(c)]
            histograms = fast_calibration.collect_graph_histograms(source_model, list(first), chunks, progress=adv,
                                                                   percentile=tail, image_tails=image_tails)
        tails = image_tails.per_image() if small else {}
        keep(run, "conv-input-histograms", key,
             {**{f"{first[t]}/{part}": a for t, (h, e, lo, hi) in histograms.items()
                 for part, a in (("hist", h), ("edges", e), ("minmax", np.array([lo, hi], dtype=np.float32)))},
              **{f"{first[t]}/tails": v for t, v in tails.items()}})
    with run.r.task(f"Q/DQ ranges from the histograms ({recipe.method}"
                    + (", cached histograms)" if arrays is not None else ")")):
        ranges = fast_calibration.ranges_from_histograms(histograms, recipe.method, recipe.percentile)
    _save_ranges(run, ranges, tails, cache)


def _same_size(arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Consecutive runs of ``arrays`` whose shapes agree past the batch axis."""
    runs: list[list[np.ndarray]] = []
    for a in arrays:
        if runs and runs[-1][0].shape[1:] == a.shape[1:]:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs


def ensure_source(run: ExportRun, source: str) -> None:
    """Build the intermediate ONNX ``source`` (``fp16`` or ``int8_qdq``) another format is built from,
    without writing it, unless this export has it already (``fp32`` always has been)."""
    if source in run.onnx_paths:
        return
    if source == "fp16":
        fp16(run, write=False)
    elif source == "int8_qdq":
        int8(run, write=False)


FORMAT = register_format(ExportFormat(
    name="onnx", order=0, build=build, backend="onnxruntime",
    description="ONNX graphs (dynamic batch and size by default), verified on ONNX Runtime's CPU provider",
    files={"fp32": "model_fp32.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8_qdq.onnx"}))
