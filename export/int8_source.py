"""The FP32 model the INT8 artifacts are quantized from: the checkpoint's own graph, or the model with
its activation ranges equalized (:mod:`resunetpp.export.equalize`; the same function, checked against the
original in PyTorch on held-out images) and its biases corrected for INT8's mean shifts
(:mod:`resunetpp.export.bias_correction`), exported to ONNX once per export and shared by the Q/DQ ONNX,
the NNCF IR and the TensorRT INT8 engines."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def source_cache_key(run: ExportRun) -> dict:
    """What :func:`int8_source`'s model depends on, for the calibration cache entries measured on it."""
    int8_source(run)
    if run.source_cache_key is None:  # the checkpoint's own graph: neither equalized nor corrected
        run.source_cache_key = cache_base(run)
    return run.source_cache_key


def source_record(run: ExportRun) -> dict:
    """What the INT8 source model went through, for every INT8 artifact's ``quantization``."""
    return {"equalization": run.equalization_record, "bias_correction": run.bias_correction_record}


#: Version of what the calibration cache entries of this module hold; bump when a step's result changes.
CACHE_RECIPE = 1


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
    import numpy as np
    import onnx
    import torch

    from resunetpp.model import WithActivation

    model = run.ckpt.build_model()
    key = cache_base(run)
    steps = []
    if recipe.equalize_alpha is not None:
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
        key = {**key, "sites": key_ranges["sites"], "alpha": alpha}
        # The same function: compare with the unequalized model on held-out images (one batch).
        original = WithActivation(run.ckpt.build_model()).eval()
        equalized = WithActivation(model).eval()
        check = run.vset.inputs[:EQUALIZATION_CHECK_IMAGES]
        with run.r.task(f"check the equalized model against the original ({len(check)} held-out images)"), \
                torch.no_grad():
            groups: dict = {}
            for x in check:
                groups.setdefault(x.shape, []).append(x)
            err = max(float((equalized(t) - original(t)).abs().max())
                      for t in (torch.as_tensor(np.stack(g)) for g in groups.values()))
        if not err <= FP32_MAX_ABS_ERROR:
            raise ResUNetError(f"equalization changed the FP32 model (largest probability difference {err:.3g} > "
                               f"{FP32_MAX_ABS_ERROR:g}); export with --no-equalize")
        run.equalization_record = {**result.record(), "fp32_max_abs_difference": err,
                                   "checked_on_images": min(EQUALIZATION_CHECK_IMAGES, len(run.vset.inputs))}
        steps.append("equalized")
    if recipe.bias_correction_images:
        _bias_correction(run, recipe, model, key)
        key = {**key, "bias_correction": recipe.bias_correction_images, "method": recipe.method,
               "percentile": recipe.percentile, "keep_float": sorted(recipe.keep_modules)}
        steps.append("bias-corrected")
    run.source_cache_key = key
    name = " and ".join(steps)
    run.int8_source_model = run.export_onnx(WithActivation(model), f"export the {name} model to ONNX",
                                            {"int8_source": key})
    path = run.work / "fp32_int8_source.onnx"
    onnx.save_model(run.int8_source_model, str(path))
    run.onnx_paths["int8_source"] = path


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
    names = {f"{c}:in" for c in convs}
    amax = cached(run, "simulated-ranges", key_amax,
                  lambda a: "its entries are not this model's" if set(a) != names
                  else ("not one range per convolution" if any(v.size != 1 for v in a.values()) else None))
    if amax is None:  # the equalized model's ranges, measured by ONNX Runtime on its graph
        from resunetpp.export.equalize import stacked
        from resunetpp.export.quantsim import graph_sim_ranges
        from resunetpp.model import WithActivation

        graph = run.export_onnx(WithActivation(model), "export the equalized model to ONNX", {"equalized": key})
        with run.r.task(f"simulated INT8 ranges ({len(run.calib)} images, ONNX Runtime)", total=len(run.calib)) as adv:
            measured = graph_sim_ranges(graph, sorted(convs), stacked(calib_images(run), 4), images=len(run.calib),
                                        progress=adv, **sim)
        keep(run, "simulated-ranges", key_amax, {k: np.float64(v) for k, v in measured.items()})
    else:
        measured = {k: float(v.item()) for k, v in amax.items()}
    state: dict = {}
    with run.r.task(f"correct INT8 biases ({n} images, simulated INT8"
                    + (", cached ranges)" if amax is not None else ")"), total=n) as adv:
        run.bias_correction_record = bias_correct(
            model, calib_images(run), recipe.bias_correction_images, progress=adv, keep_modules=recipe.keep_modules,
            amax=measured, state=state, **sim)
    import json

    record = np.frombuffer(json.dumps(run.bias_correction_record).encode(), dtype=np.uint8)
    keep(run, "bias-shifts", key_shift, {**{k: v.numpy() for k, v in state["shifts"].items()}, "record": record})


__all__ = ["CACHE_RECIPE", "EQUALIZATION_CHECK_IMAGES", "cache_base", "calib_images", "int8_source", "source_cache_key",
           "source_record"]
