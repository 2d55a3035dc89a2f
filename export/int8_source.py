"""The FP32 model the INT8 artifacts are quantized from: the checkpoint's own graph, or the model with
its activation ranges equalized (:mod:`resunetpp.export.equalize`; the same function, checked against the
original in PyTorch on held-out images) and its biases corrected for INT8's mean shifts
(:mod:`resunetpp.export.bias_correction`), exported to ONNX once per export and shared by the Q/DQ ONNX,
the NNCF IR and the TensorRT INT8 engines."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

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
    INT8's mean shifts (``QDQRecipe.bias_correction_images``, :mod:`resunetpp.export.bias_correction`).
    With a one-pass recipe (:func:`resunetpp.export.channel_tails.supports`) every range the recipe needs
    is measured on the way (:func:`conv_ranges`)."""
    if "int8_source" not in run.onnx_paths:
        _prepare(run, run.o.qdq)
    return run.onnx_paths["int8_source"], run.int8_source_model


def conv_ranges(run: ExportRun) -> tuple[dict[str, float], dict[str, np.ndarray]] | None:
    """``({convolution: input range}, {convolution: per-image ranges})`` of the INT8 source model, from
    the one calibration pass (the second empty unless the calibration set is small), or ``None`` when
    the recipe's ranges are measured on the source graph itself."""
    int8_source(run)
    return run.conv_ranges


def source_cache_key(run: ExportRun) -> dict:
    """What :func:`int8_source`'s model depends on, for the calibration cache entries measured on it."""
    int8_source(run)
    if run.source_cache_key is None:  # the checkpoint's own graph: neither equalized nor corrected
        run.source_cache_key = cache_base(run)
    return run.source_cache_key


def calibration_method(run: ExportRun) -> dict:
    """How the Q/DQ ranges were calibrated, for the INT8 artifacts' ``calibration.method``."""
    recipe = run.o.qdq
    method = {"method": recipe.method, **({"percentile": recipe.percentile} if recipe.method == "percentile" else {})}
    if conv_ranges(run) is not None:
        return {"tool": "resunetpp channel tails (one ONNX Runtime pass over the FP32 graph, exact percentile of "
                        "the equalized tensors)", **method}
    return {"tool": "onnxruntime", **method}


def source_record(run: ExportRun) -> dict:
    """What the INT8 source model went through, for every INT8 artifact's ``quantization``."""
    return {"equalization": run.equalization_record, "bias_correction": run.bias_correction_record}


#: Version of what the calibration cache entries of this module hold; bump when a step's result changes.
CACHE_RECIPE = 2


def cache_base(run: ExportRun) -> dict:
    """What every calibration cache entry of this export depends on: the checkpoint, the calibration
    images in their order, the preprocessing, the torch version, and the ONNX Runtime version (every
    calibration pass runs on it: :class:`resunetpp.engines.graph_taps.GraphTaps`)."""
    import hashlib

    import onnxruntime
    import torch

    assert run.calib is not None
    return {"recipe": CACHE_RECIPE, "model": run.ckpt.sha256, "calibration": run.calib.digest,
            "calibration_order": hashlib.sha256("\n".join(run.calib.file_hashes).encode()).hexdigest(),
            "images": len(run.calib), "preprocessing": run.pre.to_dict(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}


def cached(run: ExportRun, kind: str, key: dict, expect=None) -> dict | None:
    """A cache entry (:mod:`resunetpp.cache`), unless the export runs without the cache."""
    if not run.o.cache:
        return None
    from resunetpp import cache

    return cache.load(kind, key, warn=run.warn, expect=expect)


def keep(run: ExportRun, kind: str, key: dict, arrays: dict) -> None:
    if run.o.cache:
        from resunetpp import cache

        cache.store(kind, key, arrays)


def calib_images(run: ExportRun) -> list:
    """The calibration images, preprocessed, each ``(1, C, H, W)``; decoded once per export, on first use."""
    if run.calib_arrays is None:
        with run.r.task("load calibration images", total=len(run.calib)) as adv:
            images = []
            for x in run.calib.inputs(run.pre):
                images.append(x[None])
                adv(1)
        run.calib_arrays = images
    return run.calib_arrays


def _names_are(names: set[str]):
    def check(arrays: dict) -> str | None:
        return None if set(arrays) == names else "its entries are not this model's"
    return check


def _prepare(run: ExportRun, recipe: QDQRecipe) -> None:
    import onnx

    from resunetpp.export import channel_tails
    from resunetpp.model import WithActivation

    # the channel tails keep what the percentile of a known number of equally sized images needs: images
    # of any size (preprocessing mode "pad") are measured on the equalized graph instead
    one_pass = (channel_tails.supports(recipe.method, recipe.conv_only, recipe.quantize_outputs)
                and run.pre.mode == "resize")
    model = run.ckpt.build_model()
    key = cache_base(run)
    steps = []
    if one_pass:
        key = _one_pass(run, recipe, model, key)
    elif recipe.equalize_alpha is not None:
        key = _equalize_measured(run, recipe, model, key)
    if recipe.equalize_alpha is not None:
        _check_equalized(run, model)
        steps.append("equalized")
    if recipe.bias_correction_images:
        _bias_correction(run, recipe, model, key)
        key = {**key, "bias_correction": recipe.bias_correction_images, "method": recipe.method,
               "percentile": recipe.percentile, "keep_float": sorted(recipe.keep_modules)}
        steps.append("bias-corrected")
    run.source_cache_key = key
    if not steps:  # the checkpoint's own graph
        run.onnx_paths["int8_source"], run.int8_source_model = run.onnx_paths["fp32"], run.fp32_model
        return
    name = " and ".join(steps)
    run.int8_source_model = _patched_graph(run, model, name) or run.export_onnx(
        WithActivation(model), f"export the {name} model to ONNX", {"int8_source": key})
    path = run.work / "fp32_int8_source.onnx"
    onnx.save_model(run.int8_source_model, str(path))
    run.onnx_paths["int8_source"] = path


#: Held-out images the FP32 graph with the equalized, corrected weights is checked on against PyTorch.
PATCH_CHECK_IMAGES = 2


def _patched_graph(run: ExportRun, model, name: str):
    """The verified FP32 graph with ``model``'s weights (:func:`resunetpp.export.onnx_graph.with_parameters`:
    the structure is the same, only weights changed), checked against PyTorch on a few held-out
    images; ``None`` when the weights do not map onto the graph or the check fails (the caller exports
    ``model`` instead)."""
    import numpy as np
    import torch

    from resunetpp.artifact import OUTPUT_NAME
    from resunetpp.engines.graph_taps import GraphTaps
    from resunetpp.export.onnx_graph import with_parameters
    from resunetpp.export.verify import FP32_MAX_ABS_ERROR
    from resunetpp.model import WithActivation

    with run.r.task(f"the {name} weights into the FP32 graph (checked on {PATCH_CHECK_IMAGES} images)"):
        graph = with_parameters(run.fp32_model, run.ckpt.build_model(), model)
        if graph is None:
            return None
        first = run.vset.inputs[0]
        x = np.stack([i for i in run.vset.inputs[:PATCH_CHECK_IMAGES] if i.shape == first.shape]).astype(np.float32)
        got = GraphTaps(graph, [OUTPUT_NAME])(x)[OUTPUT_NAME]
        with torch.no_grad():
            want = WithActivation(model).eval()(torch.from_numpy(x)).numpy()
        if got.shape != want.shape or float(np.abs(got - want).max()) > FP32_MAX_ABS_ERROR:
            run.warn(f"the {name} weights did not reproduce PyTorch in the FP32 graph; exporting the model again")
            return None
    return graph


#: :class:`resunetpp.export.channel_tails.ChannelTails`' headroom in the one pass: each channel keeps 32
#: times its even share of the tensor's tail. The shipped model's equalized tensors need at most 24.8
#: (``decoder1.attention.out_conv.2``'s input; 14-19 for the next ones); a tensor that needs more is
#: measured again, alone, on the part of the graph it depends on (benchmarks/INT8.md, section 19).
TAIL_HEADROOM = 32.0


def _one_pass(run: ExportRun, recipe: QDQRecipe, model, key: dict) -> dict:
    """Every range of a one-pass recipe from one ONNX Runtime pass over the verified FP32 graph
    (:mod:`resunetpp.export.channel_tails`), or the cache: each equalization site's channel maxima, then
    -- ``model`` equalized in place with them -- each convolution input's range in the equalized model
    (``run.conv_ranges``: the bias correction's simulated ranges and the Q/DQ ranges alike). Returns the
    cache key of what follows."""
    import torch

    from resunetpp.export.channel_tails import graph_channel_tails
    from resunetpp.export.equalize import default_sites, equalize, input_scales, stacked
    from resunetpp.export.fast_calibration import conv_inputs
    from resunetpp.export.ranges import SMALL_SET_IMAGES

    alpha = recipe.equalize_alpha
    sites = default_sites(model) if alpha is not None else []
    convs = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    percentile = 100.0 if recipe.method == "minmax" else recipe.percentile
    # below SMALL_SET_IMAGES images each range is widened to the largest per-image percentile
    # (export.ranges.small_set_range): those per-image percentiles are collected in the same pass
    small = recipe.method == "percentile" and len(run.calib) < SMALL_SET_IMAGES
    key = {**key, "sites": [s.name for s in sites], "alpha": alpha}
    key_ranges = {**key, "ranges": "channel tails", "percentile": percentile, "per_image": small}
    names = ({f"site/{s.name}" for s in sites} | {f"conv/{c}" for c in convs}
             | ({f"image/{c}" for c in convs} if small else set()))
    arrays = cached(run, "one-pass-ranges", key_ranges, _names_are(names))
    if arrays is not None:
        bad = [s.name for s in sites if arrays[f"site/{s.name}"].shape != (s.channels,)]
        bad += [c for c in convs if arrays[f"conv/{c}"].size != 1
                or (small and arrays[f"image/{c}"].shape != (len(run.calib),))]
        if bad:
            run.warn(f"ignoring a one-pass-ranges cache entry ({bad[0]}: wrong shape); recomputing")
            arrays = None
    if arrays is not None:
        with run.r.task("equalization and INT8 ranges (cached)"):
            if sites:
                result = equalize(model, [], alpha, sites,
                                  ranges={s.name: torch.from_numpy(arrays[f"site/{s.name}"]) for s in sites})
            run.conv_ranges = ({c: float(arrays[f"conv/{c}"]) for c in convs},
                               {c: arrays[f"image/{c}"].astype(np.float64) for c in convs} if small else {})
        from_cache = True
    else:
        tensors = conv_inputs(run.fp32_model, convs)
        what = "equalization, simulated and Q/DQ ranges" if sites else "Q/DQ ranges"
        with run.r.task(f"calibrate: one ONNX Runtime pass over {len(run.calib)} images ({what})",
                        total=len(run.calib)) as adv:
            tails = graph_channel_tails(run.fp32_model, list(tensors.values()), stacked(calib_images(run), 8),
                                        images=len(run.calib), percentile=percentile, per_image=small,
                                        headroom=TAIL_HEADROOM, progress=adv)
        with run.r.task("equalize and derive the INT8 ranges"):
            if sites:
                result = equalize(model, [], alpha, sites, ranges={
                    s.name: tails[tensors[s.measure]].channel_max()[:s.channels] for s in sites})
                scales = input_scales(model, sites, result.scales)
            else:
                scales = {c: None for c in convs}
            found = {c: tails[tensors[c]].exact_percentile(scales[c]) for c in convs}
            short = [c for c, v in found.items() if v is None]
            ranges = {c: v for c, v in found.items() if v is not None}
            images = {c: tails[tensors[c]].per_image(scales[c]) for c in convs} if small else {}
        if short:  # a tail concentrated in a few channels: those tensors again, every channel's whole tail
            again = sorted({tensors[c] for c in short})
            with run.r.task(f"calibrate again: {len(again)} tensor(s) whose rescaled tail sits in few channels",
                            total=len(run.calib)) as adv:
                whole = graph_channel_tails(run.fp32_model, again, stacked(calib_images(run), 8),
                                            images=len(run.calib), percentile=percentile, prune=True,
                                            progress=adv)
            ranges.update({c: whole[tensors[c]].percentile(scales[c]) for c in short})
        run.conv_ranges = (ranges, images)
        keep(run, "one-pass-ranges", key_ranges,
             {**({f"site/{s.name}": result.ranges[s.name].numpy() for s in sites}),
              **{f"conv/{c}": np.float64(v) for c, v in ranges.items()},
              **{f"image/{c}": v for c, v in images.items()}})
        from_cache = False
    if sites:
        run.equalization_record = {**result.record(), "ranges": "one ONNX Runtime pass over the FP32 graph",
                                   "from_cache": from_cache}
    return {**key, "ranges": key_ranges["ranges"]}


def _equalize_measured(run: ExportRun, recipe: QDQRecipe, model, key: dict) -> dict:
    """Equalize ``model`` in place from its sites' channel maxima, measured by ONNX Runtime on the FP32
    graph or taken from the cache (recipes whose ranges are measured on the source graph afterwards)."""
    import torch

    from resunetpp.export.equalize import default_sites, equalize, graph_channel_ranges

    alpha = recipe.equalize_alpha
    sites = default_sites(model)
    key_ranges = {**key, "sites": [s.name for s in sites]}
    ranges = cached(run, "equalization-ranges", key_ranges, _names_are({s.name for s in sites}))
    how = "cached ranges" if ranges is not None else f"{len(run.calib)} images, ONNX Runtime"
    with run.r.task(f"equalize activation ranges (alpha {alpha:g}, {how})",
                    total=None if ranges is not None else len(run.calib)) as adv:
        if ranges is None:  # measured on the FP32 graph this export verified: the same function
            measured = graph_channel_ranges(run.fp32_model, sites, calib_images(run), progress=adv)
        else:
            measured = {k: torch.from_numpy(v) for k, v in ranges.items()}
        result = equalize(model, [], alpha, sites, ranges=measured)
    if ranges is None:
        keep(run, "equalization-ranges", key_ranges, {k: v.numpy() for k, v in result.ranges.items()})
    run.equalization_record = result.record()
    return {**key, "sites": key_ranges["sites"], "alpha": alpha}


def _check_equalized(run: ExportRun, model) -> None:
    """The equalized ``model`` against the FP32 reference on held-out images (the same function): the
    reference outputs this export already has (PyTorch's, or the FP32 graph's once checked against
    PyTorch), so only the equalized model runs (channels-last, one batch per input shape)."""
    import torch

    from resunetpp.export.equalize import nhwc
    from resunetpp.export.inputs import batches
    from resunetpp.model import WithActivation

    v = run.vset
    n = min(EQUALIZATION_CHECK_IMAGES, len(v.inputs))
    equalized = WithActivation(model).eval()
    with run.r.task(f"check the equalized model against the FP32 reference ({n} held-out images)"), \
            torch.no_grad(), nhwc(equalized) as tensor:
        pairs = zip(batches(v.inputs[:n], n, fixed=False), batches(v.reference[:n], n, fixed=False))
        err = max(float(np.abs(equalized(tensor(x)).numpy() - ref).max()) for x, ref in pairs)
    if not err <= FP32_MAX_ABS_ERROR:
        raise ResUNetError(f"equalization changed the FP32 model (largest probability difference {err:.3g} > "
                           f"{FP32_MAX_ABS_ERROR:g}); export with --no-equalize")
    run.equalization_record = {**run.equalization_record, "fp32_max_abs_difference": err, "checked_on_images": n,
                               "checked_against": v.reference_record["reference"]}


def _bias_correction(run: ExportRun, recipe: QDQRecipe, model, key: dict) -> None:
    """Bias correction of ``model`` in place, its two passes taken from the cache where it has them:
    the simulated ranges (every convolution; independent of the kept modules) and the shifts."""
    import numpy as np
    import torch

    from resunetpp.export.bias_correction import apply_shifts, bias_correct
    from resunetpp.export.quantsim import sim_ranges

    sim = sim_ranges(recipe.method, recipe.percentile)
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    key_amax = {**key, "simulation": sim}
    key_shift = {**key_amax, "bias_correction": recipe.bias_correction_images,
                 "keep_float": sorted(recipe.keep_modules)}
    n = min(recipe.bias_correction_images, len(run.calib))
    shifts = cached(run, "bias-shifts", key_shift,
                    lambda a: None if set(a) <= convs | {"record"} and "record" in a else "unknown convolutions")
    if shifts is not None:
        import json

        try:
            record = json.loads(shifts.pop("record").tobytes().decode())
        except ValueError:
            record = None
        if isinstance(record, dict):
            with run.r.task(f"correct INT8 biases ({n} images, cached)"):
                apply_shifts(model, {k: torch.from_numpy(v) for k, v in shifts.items()})
            run.bias_correction_record = {**record, "from_cache": True}
            return
        run.warn("ignoring a bias-shifts cache entry (its record is unreadable); recomputing")
    if run.conv_ranges is not None:  # from the one pass (channel_tails): the Q/DQ ranges themselves
        measured, how = {f"{c}:in": v for c, v in run.conv_ranges[0].items()}, " at the calibrated ranges)"
    else:
        measured, how = _sim_ranges(run, model, convs, key_amax, sim, key)
    state: dict = {}
    with run.r.task(f"correct INT8 biases ({n} images, simulated INT8{how}", total=n) as adv:
        run.bias_correction_record = bias_correct(
            model, calib_images(run), recipe.bias_correction_images, progress=adv, keep_modules=recipe.keep_modules,
            amax=measured, state=state, **sim)
    import json

    record = np.frombuffer(json.dumps(run.bias_correction_record).encode(), dtype=np.uint8)
    keep(run, "bias-shifts", key_shift, {**{k: v.numpy() for k, v in state["shifts"].items()}, "record": record})


def _sim_ranges(run: ExportRun, model, convs: set[str], key_amax: dict, sim: dict, key: dict) -> tuple[dict, str]:
    """The equalized ``model``'s simulated ranges at every convolution input, measured by ONNX Runtime on
    its graph or from the cache (recipes without the one pass); and how, for the task's label."""
    names = {f"{c}:in" for c in convs}
    amax = cached(run, "simulated-ranges", key_amax,
                  lambda a: "its entries are not this model's" if set(a) != names
                  else ("not one range per convolution" if any(v.size != 1 for v in a.values()) else None))
    if amax is not None:
        return {k: float(v.item()) for k, v in amax.items()}, ", cached ranges)"
    from resunetpp.export.equalize import stacked
    from resunetpp.export.quantsim import graph_sim_ranges
    from resunetpp.model import WithActivation

    graph = run.export_onnx(WithActivation(model), "export the equalized model to ONNX", {"equalized": key})
    with run.r.task(f"simulated INT8 ranges ({len(run.calib)} images, ONNX Runtime)", total=len(run.calib)) as adv:
        measured = graph_sim_ranges(graph, sorted(convs), stacked(calib_images(run), 4), images=len(run.calib),
                                    progress=adv, **sim)
    keep(run, "simulated-ranges", key_amax, {k: np.float64(v) for k, v in measured.items()})
    return measured, ")"


__all__ = ["CACHE_RECIPE", "EQUALIZATION_CHECK_IMAGES", "cache_base", "calib_images", "calibration_method", "conv_ranges", "int8_source",
           "source_cache_key", "source_record"]
