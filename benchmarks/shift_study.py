"""How well INT8 keeps the FP32 masks off the calibration distribution (benchmarks/INT8.md, sections 12-14).

Every score compares the INT8 model's binarised mask with the FP32 model's on the same (shifted)
image, at the image's original size, through :func:`resunetpp.export.verify.compare_outputs` --
the export gate's own measure: mean / min Dice, images below 0.90, and the share of the image's
pixels where the masks differ (:func:`resunetpp.metrics.disagreement`).

The INT8 model is a written artifact (``--artifact``: a Q/DQ ``.onnx`` on ONNX Runtime's CPU
provider, as the export verifies it) or, without one, the PyTorch simulation of the export's
default recipe (:class:`resunetpp.export.quantsim.QuantSim` after equalization and bias
correction, the default modules in float: :func:`simulated_int8`), which is also what the
calibration-set variants need (each one a new calibration).

Subcommands (``python -m resunetpp.bench.shift_study --help``):

``shifts``
    Photometric shifts of the validation images (:data:`SHIFTS`: brightness, contrast, colour
    temperature, blur, JPEG quality, resolution, a few strengths each), and calibration sets
    drawn differently (another seed, only small-polyp images, only dark images).
``calib-sets``
    The real default export (ONNX Q/DQ and OpenVINO IR, verified as the export verifies them)
    calibrated on the export's own sample and on each set :func:`calibration_variants` draws.
``calib-count``
    The default recipe calibrated on 16 ... 880 images (the export's own seeded sample of the
    training split), scored on the validation images, with each calibrated range recorded.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from resunetpp.export.quantize import DEFAULT_BIAS_CORRECTION_IMAGES, DEFAULT_EQUALIZE_ALPHA, DEFAULT_INT8_KEEP_MODULES

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

DataOpt = Annotated[Path, typer.Option(exists=True, file_okay=False, help="Dataset root (images/, masks/, train.txt, val.txt).")]
CkptOpt = Annotated[Path, typer.Option(exists=True, dir_okay=False, help="FP32 checkpoint.")]
DEFAULT_CKPT = Path("resunetpp/weights/resunetpp_kvasir.safetensors")
BATCH = 4
ThreadsOpt = Annotated[int, typer.Option(help="torch intra-op threads (1: on a busy machine OpenMP workers spin-wait).")]


# ---- shifts: (H, W, 3) uint8 -> (H, W, 3) uint8, same size --------------------------------------
def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """Every channel plus ``delta`` grey levels."""
    return _u8(image.astype(np.float32) + delta)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Distances from the image's mean grey level times ``factor``."""
    x = image.astype(np.float32)
    return _u8((x - x.mean()) * factor + x.mean())


def colour_temperature(image: np.ndarray, shift: float) -> np.ndarray:
    """Warmer (``shift`` > 0: red x (1 + shift), blue x (1 - shift)) or cooler (< 0)."""
    x = image.astype(np.float32)
    x[..., 0] *= 1.0 + shift
    x[..., 2] *= 1.0 - shift
    return _u8(x)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (OpenCV)."""
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)


def jpeg(image: np.ndarray, quality: float) -> np.ndarray:
    """Re-encoded as JPEG at ``quality`` (Pillow, 4:2:0) and decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def resolution(image: np.ndarray, scale: float) -> np.ndarray:
    """Down-scaled by ``scale`` (area averaging) and up-scaled back (bilinear): a lower-resolution camera."""
    import cv2

    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


SHIFT_FUNCTIONS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "brightness": brightness, "contrast": contrast, "colour_temperature": colour_temperature,
    "blur": blur, "jpeg": jpeg, "resolution": resolution,
}
#: (shift, strength) pairs of the study: two strengths each, a mild and a strong one.
SHIFTS: tuple[tuple[str, float], ...] = (
    ("brightness", -40), ("brightness", 40), ("contrast", 0.6), ("contrast", 1.5),
    ("colour_temperature", -0.15), ("colour_temperature", 0.15), ("blur", 1.5), ("blur", 4.0),
    ("jpeg", 50), ("jpeg", 15), ("resolution", 0.5), ("resolution", 0.25),
)


def shift_label(name: str, strength: float) -> str:
    return f"{name} {strength:+g}" if name in ("brightness", "colour_temperature") else f"{name} {strength:g}"


# ---- scoring ----------------------------------------------------------------------------------------
#: Fields of every row of the report.
ROW_FIELDS = ("condition", "images", "dice_mean", "dice_min", "below_0.90", "disagreement_image_share_mean",
              "disagreement_image_share_max", "disagreement_union_share_max", "worst_image",
              "most_disagreeing_image")


def agreement_row(condition: str, int8_probs: Sequence[np.ndarray], fp32_probs: Sequence[np.ndarray], *,
                  names: Sequence[str], pre=None, sizes=None, per_image: bool = False) -> dict:
    """One report row: INT8 vs FP32 masks on one set of images (:func:`compare_outputs`)."""
    from resunetpp.export.verify import compare_outputs

    m = compare_outputs(list(int8_probs), list(fp32_probs), pre=pre, sizes=sizes, names=names)
    dices = m["dice_vs_reference_per_image"]
    return {"condition": condition, "images": m["images"], "dice_mean": m["dice_vs_reference_mean"],
            "dice_min": m["dice_vs_reference_min"], "below_0.90": int(sum(d < 0.9 for d in dices)),
            "disagreement_image_share_mean": m["disagreement_image_share_mean"],
            "disagreement_image_share_max": m["disagreement_image_share_max"],
            "disagreement_union_share_max": m["disagreement_union_share_max"],
            "worst_image": m["worst_images"][0], "most_disagreeing_image": m["most_disagreeing_images"][0],
            **({"dice_per_image": dices, "disagreement_image_share_per_image": m["disagreement_image_share_per_image"]}
               if per_image else {})}


#: Changes no reader would see, applied to the (shifted) image: how far FP32's own mask moves under them is
#: the noise floor an INT8 disagreement on that image is read against.
IMPERCEPTIBLE: tuple[tuple[str, float], ...] = (("jpeg", 95), ("brightness", 2), ("brightness", -2))
#: FP32 probabilities within this distance of 0.5 count as "FP32 unsure" for a differing pixel.
UNSURE = 0.3


def fp32_noise(val: "Val", image: np.ndarray, index: int, int8_prob: np.ndarray, fp32_prob: np.ndarray) -> dict:
    """For one (shifted) decoded ``image`` (validation image ``index``): FP32's mask against FP32's mask
    after each :data:`IMPERCEPTIBLE` change (Dice, share of the image that differs), and the share of the
    pixels where INT8 and FP32 differ at which FP32's probability is within :data:`UNSURE` of 0.5."""
    from resunetpp.export.verify import compare_outputs

    out: dict = {}
    for name, strength in IMPERCEPTIBLE:
        p = predict_torch(val.fp32, [val.pre.apply(SHIFT_FUNCTIONS[name](image, strength))])[0]
        m = compare_outputs([p], [fp32_prob], pre=val.pre, sizes=[val.sizes[index]])
        out[shift_label(name, strength)] = {"dice_vs_reference": m["dice_vs_reference_mean"],
                                            "disagreement_image_share": m["disagreement_image_share_mean"]}
    differ = (int8_prob > 0.5) != (fp32_prob > 0.5)
    unsure = np.abs(fp32_prob - 0.5) < UNSURE
    return {"fp32_vs_itself": out,
            "differing_pixels_fp32_unsure": float(unsure[differ].mean()) if differ.any() else None,
            "fp32_unsure_image_share": float(unsure.mean())}


def worst_case(rows: Sequence[dict]) -> dict:
    """The rows with the lowest per-image Dice and with the largest disagreement share."""
    by_dice = min(rows, key=lambda r: (r["dice_min"], r["condition"]))
    by_share = max(rows, key=lambda r: (r["disagreement_image_share_max"], r["condition"]))
    return {"by_dice_min": {"condition": by_dice["condition"], "dice_min": by_dice["dice_min"],
                            "image": by_dice["worst_image"]["image"]},
            "by_disagreement": {"condition": by_share["condition"],
                                "disagreement_image_share_max": by_share["disagreement_image_share_max"],
                                "image": by_share["most_disagreeing_image"]["image"]}}


def line(r: dict) -> str:
    text = (f"{r['condition']:36s} Dice mean {r['dice_mean']:.4f} min {r['dice_min']:.4f} <0.90: {r['below_0.90']:2d}  "
            f"differing pixels mean {100 * r['disagreement_image_share_mean']:.3f}% "
            f"max {100 * r['disagreement_image_share_max']:.3f}% ({r['most_disagreeing_image']['image'][:8]})")
    noise = r["worst_image"].get("fp32_noise")
    if noise:
        low = min(v["dice_vs_reference"] for v in noise["fp32_vs_itself"].values())
        text += f"; FP32 vs itself on {r['worst_image']['image'][:8]}: Dice >= {low:.4f}"
    return text


# ---- models -----------------------------------------------------------------------------------------
def predict_torch(model, inputs: Sequence[np.ndarray], batch: int = BATCH) -> list[np.ndarray]:
    """Probabilities of ``model`` (logits; sigmoid applied here) on ``(C, H, W)`` inputs."""
    import torch

    out: list[np.ndarray] = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            x = torch.as_tensor(np.stack(inputs[i:i + batch]))
            out.extend(torch.sigmoid(model(x)).numpy())
    return out


def _no_grad(fn):
    """Run ``fn`` without autograd (and leave the caller's grad mode as it was: these functions run
    in-process under tests and notebooks)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


@_no_grad
def simulated_int8(ckpt, calib_inputs: Sequence[np.ndarray], *, keep: Sequence[str] = DEFAULT_INT8_KEEP_MODULES,
                   alpha: float | None = DEFAULT_EQUALIZE_ALPHA, bc_images: int = DEFAULT_BIAS_CORRECTION_IMAGES,
                   range_fn: Callable | None = None, small_set_rule: bool = True, batch: int = BATCH):
    """The export's default INT8 recipe in simulation: equalization on ``calib_inputs``, bias
    correction on the first ``bc_images`` of them, then the activation ranges observed on all of
    them, widened as the export widens them below 100 images (``small_set_rule``:
    :func:`resunetpp.export.ranges.small_set_range`). ``range_fn(per_image_stats) -> amax`` replaces
    them instead (see :class:`RangeStats`). Returns ``(model, sim, stats)``; ``model`` runs simulated INT8."""
    import torch

    from resunetpp.export.bias_correction import bias_correct
    from resunetpp.export.equalize import equalize
    from resunetpp.export.quantsim import QuantSim

    m = ckpt.build_model().eval()
    singles = [x[None] for x in calib_inputs]
    batches = [np.stack(calib_inputs[i:i + batch]) for i in range(0, len(calib_inputs), batch)]
    if alpha is not None:
        equalize(m, batches, alpha)
    if bc_images:
        bias_correct(m, singles, bc_images, keep_modules=keep)
    m.eval()
    sim = QuantSim(m, keep)
    stats = RangeStats(sim)
    sim.observe(len(calib_inputs))
    with stats.recording():
        for x in batches:
            m(torch.as_tensor(x))
    sim.freeze()
    if range_fn is not None:
        sim.amax.update({k: float(v) for k, v in range_fn(stats).items()})
    elif small_set_rule:
        from resunetpp.export.ranges import small_set_range

        sim.amax.update({k: small_set_range(a, np.asarray(stats.p9999[k]), len(calib_inputs)) for k, a in sim.amax.items()})
    return m, sim, stats


class RangeStats:
    """Per image and per quantized convolution input: the largest |x| and the 99.99th percentile of |x|."""

    def __init__(self, sim) -> None:
        self.sim = sim
        self.max: dict[str, list[float]] = {}
        self.p9999: dict[str, list[float]] = {}

    def recording(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            handles = [conv.register_forward_pre_hook(self._hook(name + ":in"), prepend=True)
                       for name, conv in self.sim.convs.items()]
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()
        return ctx()

    def _hook(self, key: str):
        import math

        import torch

        def hook(_module, args):
            a = args[0].detach().abs().flatten(1).float()
            k = max(1, math.ceil(round(1e-4 * a.shape[1], 6)))
            top = torch.topk(a, min(k, a.shape[1]), dim=1).values
            self.max.setdefault(key, []).extend(top[:, 0].tolist())
            self.p9999.setdefault(key, []).extend(top[:, -1].tolist())
        return hook

    def as_dict(self) -> dict:
        return {"max": self.max, "p99.99": self.p9999}


# ---- data -----------------------------------------------------------------------------------------
def _load(data: Path, split: str | None, count: int | None, pre, role: str = "evaluation", seed: int | None = None):
    from resunetpp.export import calibration as cal

    if seed is not None and seed != cal.SAMPLE_SEED:
        import random

        stems = cal.select_images(data, split, None, role=role).stems
        pick = sorted(random.Random(seed).sample(range(len(stems)), count)) if count and count < len(stems) else range(len(stems))
        return _from_stems(data, [stems[i] for i in pick], role)
    return cal.select_images(data, split, count, role=role, default_split="val" if role == "evaluation" else "train")


def _from_stems(data: Path, stems: Sequence[str], role: str):
    import tempfile

    from resunetpp.export import calibration as cal

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(stems) + "\n")
    try:
        return cal.select_images(data, f.name, None, role=role)
    finally:
        Path(f.name).unlink()


class Val:
    """The validation images (decoded), their FP32 reference probabilities per condition (cached)."""

    def __init__(self, data: Path, ckpt, cache: Path | None, split: str = "val", count: int | None = None) -> None:
        from resunetpp.imageio import read_image

        self.ckpt, self.pre = ckpt, ckpt.preprocessing
        self.set = _load(data, split, count, self.pre)
        self.names = self.set.stems
        self.images = [read_image(p, self.pre.channels) for p in self.set.paths]
        self.sizes = [im.shape[:2] for im in self.images]
        self.cache = cache
        self.fp32 = ckpt.build_model().eval()

    def inputs(self, shift: tuple[str, float] | None) -> list[np.ndarray]:
        ims = self.images if shift is None else [SHIFT_FUNCTIONS[shift[0]](im, shift[1]) for im in self.images]
        return [self.pre.apply(im) for im in ims]

    def reference(self, label: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        key = hashlib.sha256((self.ckpt.sha256 + label + ",".join(self.names)).encode()).hexdigest()[:16]
        path = self.cache / f"fp32_{key}.npy" if self.cache else None
        if path is not None and path.is_file():
            return list(np.load(path))
        probs = predict_torch(self.fp32, inputs)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.stack(probs))
        return probs

    def row(self, label: str, int8_probs, fp32_probs, per_image: bool = False) -> dict:
        return agreement_row(label, int8_probs, fp32_probs, names=self.names, pre=self.pre, sizes=self.sizes,
                             per_image=per_image)


def _artifact_predict(path: Path):
    from resunetpp.export.verify import artifact_predict

    return artifact_predict(path, "onnxruntime")


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def _resume(out: Path, rows: str, fields: dict[str, type], nested: dict[str, dict[str, type]] | None = None) -> dict:
    """The results ``out`` an earlier run wrote, checked before anything is taken from it: a JSON object
    whose ``rows`` is a list of objects, each with ``fields`` of those types (and ``nested``: field ->
    its own fields). Anything else is one line naming the file and the problem (exit 2), never a
    traceback halfway through a study."""
    try:
        data = json.loads(out.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise typer.BadParameter(f"{out}: not a results file of this study to resume ({type(e).__name__}: {e})")
    if not isinstance(data, dict) or not isinstance(data.get(rows), list):
        raise typer.BadParameter(f"{out}: not a results file of this study to resume (no list {rows!r})")
    for i, row in enumerate(data[rows]):
        checks = [(row, fields, f"{rows}[{i}]")]
        checks += [(row.get(k) if isinstance(row, dict) else None, f, f"{rows}[{i}].{k}")
                   for k, f in (nested or {}).items()]
        for obj, want, where in checks:
            if not isinstance(obj, dict):
                raise typer.BadParameter(f"{out}: {where} is not an object")
            for k, t in want.items():
                if not isinstance(obj.get(k), t) or isinstance(obj.get(k), bool) and t is not bool:
                    raise typer.BadParameter(f"{out}: {where}.{k} must be {t.__name__}, got {obj.get(k)!r}")
    return data


# ---- subcommands ------------------------------------------------------------------------------------
@app.command()
@_no_grad
def shifts(
    data: DataOpt, out: Annotated[Path, typer.Option(help="JSON results.")],
    checkpoint: CkptOpt = DEFAULT_CKPT,
    artifact: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="INT8 Q/DQ ONNX (ONNX Runtime); default: the simulation.")] = None,
    calib_count: int = 300, eval_count: Annotated[Optional[int], typer.Option(help="Validation images (default: all).")] = None,
    shift: Annotated[Optional[list[str]], typer.Option(help="NAME=STRENGTH (repeatable); default: SHIFTS.")] = None,
    calib_variants: Annotated[bool, typer.Option(help="Also calibrate on sets drawn differently (simulation).")] = True,
    cache: Annotated[Optional[Path], typer.Option(help="Folder caching FP32 reference outputs.")] = None,
    threads: ThreadsOpt = 1,
) -> None:
    """INT8 vs FP32 on photometrically shifted validation images, and with other calibration sets."""
    import torch

    from resunetpp.checkpoint import load_checkpoint

    t0 = time.time()
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    val = Val(data, ckpt, cache, count=eval_count)
    conditions = [None] + ([(s.split("=")[0], float(s.split("=")[1])) for s in shift] if shift else list(SHIFTS))
    for c in conditions:
        if c is not None and c[0] not in SHIFT_FUNCTIONS:
            raise typer.BadParameter(f"unknown shift {c[0]!r}; known: {', '.join(SHIFT_FUNCTIONS)}")
    result: dict = {"checkpoint": str(checkpoint), "images": len(val.names),
                    "int8": str(artifact) if artifact else f"simulation of the default recipe, {calib_count} calibration images",
                    "shifts": [], "calibration_sets": []}
    if artifact is not None:
        ctx = _artifact_predict(artifact)
        run = ctx.__enter__()

        def int8(inputs):
            return [run(x[None])[0] for x in inputs]
    else:
        calib = _load(data, None, calib_count, val.pre, role="calibration")
        model, _sim, _ = simulated_int8(ckpt, list(calib.inputs(val.pre)))

        def int8(inputs):
            return predict_torch(model, inputs)
    for c in conditions:
        label = "none" if c is None else shift_label(*c)
        inputs = val.inputs(c)
        q, ref = int8(inputs), val.reference(label, inputs)
        r = val.row(label, q, ref)
        r["shift"] = None if c is None else {"name": c[0], "strength": c[1]}
        for key in ("worst_image", "most_disagreeing_image"):  # each worst image against FP32's own noise
            i = val.names.index(r[key]["image"])
            image = val.images[i] if c is None else SHIFT_FUNCTIONS[c[0]](val.images[i], c[1])
            r[key]["fp32_noise"] = fp32_noise(val, image, i, q[i], ref[i])
        result["shifts"].append(r)
        print(line(r), f"{time.time() - t0:.0f}s", flush=True)
        _write(out, result)
    if artifact is not None:
        ctx.__exit__(None, None, None)
    result["worst_shift"] = worst_case(result["shifts"])
    _write(out, result)
    if calib_variants:
        inputs = val.inputs(None)
        ref = val.reference("none", inputs)
        for label, cset in calibration_variants(data, calib_count, val.pre):
            model, _sim, _ = simulated_int8(ckpt, list(cset.inputs(val.pre)))
            r = val.row(label, predict_torch(model, inputs), ref)
            r["calibration"] = {"count": len(cset), "sha256": cset.digest}
            result["calibration_sets"].append(r)
            print(line(r), f"{time.time() - t0:.0f}s", flush=True)
            _write(out, result)
        result["worst_calibration_set"] = worst_case(result["calibration_sets"])
    _write(out, result)


def calibration_variants(data: Path, count: int, pre):
    """(label, ImageSet): the training split drawn with another seed, only its small-polyp images
    (ground-truth mask below 5% of the image), only its darkest images (lowest mean grey level)."""
    from resunetpp.imageio import read_image, read_mask

    yield f"seed 1, {count} images", _load(data, None, count, pre, role="calibration", seed=1)
    train = _load(data, None, None, pre, role="calibration")
    share = [(read_mask(m, 1) > 0).mean() for m in train.mask_paths]
    small = [s for s, a in zip(train.stems, share) if a < 0.05]
    if small:
        yield f"small polyps only (< 5% of the image), {min(count, len(small))} images", \
            _from_stems(data, small[:count], "calibration")
    grey = [float(read_image(p, 3).mean()) for p in train.paths]
    dark = [train.stems[i] for i in np.argsort(grey, kind="stable")[:count]]
    yield f"darkest {len(dark)} images", _from_stems(data, dark, "calibration")


@app.command("calib-sets")
def calib_sets_cmd(
    data: DataOpt, out: Annotated[Path, typer.Option(help="JSON results.")],
    work: Annotated[Path, typer.Option(help="Folder for each export's artifacts (one subfolder per set).")],
    checkpoint: CkptOpt = DEFAULT_CKPT,
    calib_count: int = 300, eval_count: int = 100,
) -> None:
    """The default INT8 export -- real artifacts, ONNX Q/DQ and OpenVINO IR, each verified as the export
    does -- calibrated on the export's own sample and on the sets drawn differently
    (:func:`calibration_variants`); each artifact's gate metrics on the same held-out validation images.
    Artifacts that fail the gate are written anyway (``allow_accuracy_drop``): the point is the number."""
    from resunetpp.checkpoint import load_checkpoint
    from resunetpp.export.options import ExportOptions
    from resunetpp.export.pipeline import run_export
    from resunetpp.export.report import NullReporter

    t0 = time.time()
    pre = load_checkpoint(checkpoint).preprocessing
    own = _load(data, None, calib_count, pre, role="calibration")
    result: dict = {"checkpoint": str(checkpoint), "evaluation_images": eval_count, "sets": []}
    if out.is_file():  # resume: a set already measured on the same images is not exported again
        before = _resume(out, "sets", {"condition": str, "artifacts": list},
                         {"calibration": {"sha256": str, "count": int}})
        if before.get("checkpoint") == str(checkpoint) and before.get("evaluation_images") == eval_count:
            result = before
    done = {(r["condition"], r["calibration"]["sha256"]) for r in result["sets"]}
    for i, (label, cset) in enumerate([(f"the export's own sample (seed 0), {len(own)} images", own),
                                       *calibration_variants(data, calib_count, pre)]):
        if (label, cset.digest) in done:
            print(f"{label:60s} already in {out}", flush=True)
            continue
        split = work / f"set{i}.txt"
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(cset.stems) + "\n")
        opts = ExportOptions(checkpoint=checkpoint, out=work / f"set{i}", formats=("onnx", "openvino"),
                             precisions=("int8",), calib=data, calib_split=str(split), calib_count=len(cset),
                             eval=data, eval_count=eval_count, allow_accuracy_drop=True)
        report = run_export(opts, NullReporter())
        row = {"condition": label, "calibration": {"count": len(cset), "sha256": cset.digest}, "artifacts": []}
        for a in report.artifacts:
            row["artifacts"].append({"artifact": a.name, "gate_passed": a.gate["passed"],
                                     **{k: a.metrics.get(k) for k in GATE_FIELDS}})
            print(f"{label:60s} {a.name:14s} " + " ".join(f"{k}={a.metrics.get(k)}" for k in GATE_FIELDS[:3]),
                  f"{time.time() - t0:.0f}s", flush=True)
        result["sets"].append(row)
        _write(out, result)


#: What :func:`calib_sets_cmd` records of each artifact's export metrics.
GATE_FIELDS = ("dice_vs_reference_mean", "dice_vs_reference_min", "disagreement_image_share_max",
               "disagreement_image_share_mean", "dice_vs_gt_mean", "reference_dice_vs_gt_mean", "worst_images")


@app.command("calib-count")
@_no_grad
def calib_count_cmd(
    data: DataOpt, out: Annotated[Path, typer.Option(help="JSON results.")],
    checkpoint: CkptOpt = DEFAULT_CKPT,
    count: Annotated[Optional[list[int]], typer.Option(help="Calibration image counts (repeatable).")] = None,
    estimator: Annotated[Optional[list[str]], typer.Option(help="'percentile' or a range estimator of resunetpp.export.ranges.ESTIMATORS, optionally "
                                                                     "'+flips' (calibration images and their mirror images); repeatable; default: percentile. "
                                                                     "Equalization and bias correction use the percentile.")] = None,
    eval_count: Annotated[Optional[int], typer.Option(help="Validation images (default: all).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Folder caching FP32 reference outputs.")] = None,
    record_val_ranges: bool = False,
    threads: ThreadsOpt = 1,
) -> None:
    """The default recipe (simulated) against the number of calibration images."""
    import torch

    from resunetpp.checkpoint import load_checkpoint
    from resunetpp.export.ranges import ESTIMATORS

    t0 = time.time()
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    val = Val(data, ckpt, cache, count=eval_count)
    inputs = val.inputs(None)
    ref = val.reference("none", inputs)
    result: dict = {"checkpoint": str(checkpoint), "images": len(val.names), "int8": "simulation of the default recipe",
                    "runs": []}
    if out.is_file():  # resume
        result = _resume(out, "runs", {"calibration_images": int, "estimator": str})
    done = {(r["calibration_images"], r["estimator"]) for r in result["runs"]}
    names = estimator or ["percentile"]
    for name in names:
        base = name.removesuffix("+flips")
        if base != "percentile" and base not in ESTIMATORS:
            raise typer.BadParameter(f"unknown estimator {name!r}; known: percentile, {', '.join(ESTIMATORS)} "
                                     "(each also with +flips)")
    for n in count or [16, 32, 64, 100, 300, 880]:
        calib = None
        for flips in (False, True):
            todo = [e for e in names if e.endswith("+flips") == flips and (n, e) not in done]
            if not todo:
                continue
            calib = calib or _load(data, None, n, val.pre, role="calibration")
            images = list(calib.inputs(val.pre))
            if flips:  # the calibration set augmented with its mirror images
                images = images + [np.ascontiguousarray(x[:, :, ::-1]) for x in images]
            model, sim, stats = simulated_int8(ckpt, images, small_set_rule=False)  # the pooled percentile
            percentile = dict(sim.amax)
            for name in todo:
                fn = ESTIMATORS.get(name.removesuffix("+flips"))
                sim.amax = dict(percentile) if fn is None else {
                    k: float(fn(np.asarray(stats.max[k]), np.asarray(stats.p9999[k]))) for k in percentile}
                vstats = RangeStats(sim)
                if record_val_ranges:
                    with vstats.recording():
                        probs = predict_torch(model, inputs)
                else:
                    probs = predict_torch(model, inputs)
                r = val.row(f"{n} images, {name}", probs, ref, per_image=True)
                r.update(calibration_images=len(calib), estimator=name, amax=dict(sim.amax),
                         percentile_amax=percentile, calibration_ranges=stats.as_dict())
                if record_val_ranges:
                    r["validation_ranges"] = vstats.as_dict()
                result["runs"].append(r)
                print(line(r), f"{time.time() - t0:.0f}s", flush=True)
                _write(out, result)


@app.command("calib-folder")
def calib_folder_cmd(
    data: DataOpt, out: Annotated[Path, typer.Option(help="New folder of PNG images (must not exist).")],
    shift: Annotated[str, typer.Option(help="NAME=STRENGTH applied to every --every-th image.")],
    calib_count: int = 300,
    every: Annotated[int, typer.Option(min=1, help="Shift images 1, 1+N, 1+2N, ... of the sample (1: all).")] = 2,
) -> None:
    """A calibration folder for ``export --calib``: the export's own sample of the training images, every
    ``--every``-th of them shifted (``NAME_shifted.png``) -- calibrating on frames like the deployment's."""
    from PIL import Image

    from resunetpp.imageio import read_image

    name, _, strength = shift.partition("=")
    if name not in SHIFT_FUNCTIONS or not strength:
        raise typer.BadParameter(f"--shift {shift!r}: want NAME=STRENGTH, NAME one of {', '.join(SHIFT_FUNCTIONS)}")
    if out.exists():
        raise typer.BadParameter(f"{out} exists; give a new folder")
    import shutil
    import tempfile

    sample = _load(data, None, calib_count, None, role="calibration")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # never a folder of the user's
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    shifted_count = 0
    try:
        for i, (stem, path) in enumerate(zip(sample.stems, sample.paths)):
            image = read_image(path, 3)
            shifted = i % every == every - 1
            if shifted:
                image = SHIFT_FUNCTIONS[name](image, float(strength))
                shifted_count += 1
            Image.fromarray(image).save(tmp / f"{stem}{'_shifted' if shifted else ''}.png")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written
        raise
    print(f"{out}: {len(sample)} images, {shifted_count} shifted ({shift})")


if __name__ == "__main__":
    app()
