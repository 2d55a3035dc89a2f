"""The benchmark library behind ``resunetpp bench``: rows, accuracy against the reference, timing.

One *row* is one backend at one precision and one batch size. For each row the harness

1. opens the artifact with :func:`engines.open` (load/compile time recorded) -- artifacts come
   from :func:`resunetpp.export.pipeline.run_export`, cached per checkpoint hash + options (see
   :mod:`resunetpp.bench.artifacts`, which also picks the evaluation and calibration images);
2. measures accuracy on the evaluation images against the PyTorch FP32 reference
   (:func:`measure_accuracy`, built on :func:`resunetpp.export.verify.compare_outputs`): mean and min Dice
   of the binarised masks, mean and max absolute probability error, Dice/IoU against ground
   truth; a NaN/Inf output fails the row (``failed: non-finite output``), it is never averaged;
3. times the runtime's own call (``session.run``, the OpenVINO infer request, the torch forward)
   on pre-made arrays after a warm-up, interleaved with the toolkit's :meth:`Engine.infer` on
   the same arrays, giving the latency percentiles and ``overhead_pct`` (:func:`measure_latency`);
4. measures throughput -- OpenVINO with the THROUGHPUT hint and an ``AsyncInferQueue``
   (:func:`openvino_throughput`), the others as batch / mean latency -- and the end-to-end rate
   of :func:`resunetpp.engines.infer.run_inference` (decode, preprocess, infer, postprocess, write)
   on the same images (:func:`end_to_end_rate`).

Each row's rate is also given in GFLOP/s (the model's FLOPs per image x images/s) and, for rows
whose convolutions run in one precision on the CPU (fp32, bf16; OpenVINO int8), as a share of this
CPU's peak at that precision, measured at the end of the run (:mod:`resunetpp.bench.peak`) rather
than assumed.

Combinations this machine cannot run are rows with status ``skipped`` and the reason.

Which rows exist, in which order, on which device and with which engine options, comes from each
backend's bench options in :mod:`resunetpp.engines.registry` (:func:`matrix`): a new backend
brings its own rows.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import math
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp.bench.artifacts import ArtifactSet, ImagePlan, artifact_key, artifact_size_mb, default_cache_root, \
    ensure_artifacts, plan_images
from resunetpp.bench.matrix import artifact_of, backends, matrix, precisions
from resunetpp.bench.env import collect_environment, cpu_bf16_problem, other_processes_cpu, torch_threads
from resunetpp.engines import registry
from resunetpp.export import calibration as cal
from resunetpp.export.report import NullReporter, Reporter
from resunetpp.export.verify import compare_outputs, predict_batched
from resunetpp.checkpoint import Checkpoint, load_checkpoint
from resunetpp.errors import ResUNetError
from resunetpp.metrics import scores
from resunetpp.model_config import input_size_problem
from resunetpp.preprocess import Preprocessing, probs_to_mask

#: The row every other is measured against (its backend opens the checkpoint itself).
#: The longest warm-up or timing window ``bench`` accepts (seconds; ``inf`` would never end).
MAX_WINDOW_S = 3600.0
REFERENCE = ("torch", "fp32")


def __getattr__(name: str) -> Any:
    """``BACKENDS``, ``PRECISIONS``, ``MATRIX`` and ``ARTIFACT_OF``: :func:`backends`,
    :func:`precisions`, :func:`matrix` and :func:`artifact_of` of the registry as it is now."""
    derived = {"BACKENDS": backends, "PRECISIONS": precisions, "MATRIX": matrix, "ARTIFACT_OF": artifact_of}
    if name in derived:
        return derived[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Timed calls per measurement even when the window is shorter (a slow model on a slow CPU).
MIN_ITERATIONS = 3
#: A row whose timing shared the CPU with other processes above this share (%) is named in a note.
BUSY_PCT = 10.0
#: Accuracy runs once per artifact at this batch size; every batch-size row repeats it.
ACCURACY_BATCH = 1
NONFINITE = "failed: non-finite output"


class NonFiniteResult(ResUNetError):
    """A row's output held NaN or Inf: it fails, and none of its numbers are averaged."""


# ---- options, rows, result ------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    """What ``resunetpp bench`` was asked for (see the CLI's help for each option)."""

    model: Path | None = None  # None: the shipped default checkpoint
    data: Path | None = None  # None: the shipped sample images
    split: str | None = None  # None: DATA/val.txt when present, else every image
    backends: tuple[str, ...] | None = None  # None: all of backends()
    precisions: tuple[str, ...] | None = None  # None: all of precisions()
    batch_sizes: tuple[int, ...] = (1, 8)
    image_size: int | None = None  # None: the checkpoint's preprocessing size
    warmup_s: float = 1.0
    duration_s: float = 3.0
    threads: int | None = None  # None: each runtime's default
    device: str = "auto"  # auto | cpu | cuda: where torch (and ONNX Runtime with CUDA) run
    artifacts: Path | None = None  # None: ~/.cache/resunetpp/artifacts/<key>/
    calib: Path | None = None
    end_to_end: bool = True
    #: The input-size sweep (issue 17): each row runs at each of these sides, on artifacts exported
    #: once at the checkpoint's own size (dynamic H/W); ``None``: one size (``image_size``).
    image_sizes: tuple[int, ...] | None = None
    #: A video clip: each row also runs ``infer``'s video pipeline on it (:mod:`resunetpp.bench.video`).
    video: Path | None = None

    def validate(self) -> None:
        for name, values, known in (("--backends", self.backends, backends()), ("--precisions", self.precisions,
                                                                                  precisions())):
            bad = [v for v in values or () if v not in known]
            if bad:
                raise ResUNetError(f"{name}: unknown {', '.join(map(repr, bad))} (choose from {', '.join(known)})")
            if values is not None and not values:
                raise ResUNetError(f"{name}: give at least one of {', '.join(known)}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ResUNetError(f"--batch-sizes: positive integers expected, got {list(self.batch_sizes)}")
        if not (math.isfinite(self.warmup_s) and math.isfinite(self.duration_s)) or self.warmup_s < 0 \
                or self.duration_s <= 0 or max(self.warmup_s, self.duration_s) > MAX_WINDOW_S:
            raise ResUNetError(f"--warmup-s must be >= 0 and --duration-s > 0, both finite and at most "
                               f"{MAX_WINDOW_S:g} s (got {self.warmup_s}, {self.duration_s})")
        if self.threads is not None and self.threads < 1:
            raise ResUNetError(f"--threads must be at least 1, got {self.threads}")
        if self.image_size is not None and input_size_problem(self.image_size):
            raise ResUNetError(f"--image-size {input_size_problem(self.image_size)}")
        if self.image_sizes is not None:
            if self.image_size is not None:
                raise ResUNetError("give one --image-size, or several (a sweep), not both")
            if not self.image_sizes:
                raise ResUNetError("--image-size: give at least one size")
            for size in self.image_sizes:
                if input_size_problem(size):
                    raise ResUNetError(f"--image-size {input_size_problem(size)}")
            if len(set(self.image_sizes)) != len(self.image_sizes):
                raise ResUNetError(f"--image-size: each size once, got {list(self.image_sizes)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ResUNetError(f"--device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class BenchRow:
    """One backend x precision x batch size; ``None`` where a number was not measured."""

    backend: str
    precision: str
    status: str = "ok"  # ok | skipped | failed: <what>
    reason: str | None = None
    batch_size: int | None = None
    device: str | None = None
    artifact: str | None = None
    size_mb: float | None = None
    load_s: float | None = None
    dice_vs_reference: float | None = None
    dice_vs_reference_min: float | None = None
    dice_drop: float | None = None  # 1 - dice_vs_reference: agreement lost against the reference mask
    mean_abs_diff: float | None = None
    max_abs_diff: float | None = None
    dice_vs_gt: float | None = None
    iou_vs_gt: float | None = None
    dice_vs_gt_drop: float | None = None  # the reference's Dice vs GT minus this row's
    latency_ms_mean: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    latency_iterations: int | None = None
    latency_source: str | None = None  # "runtime": the backend's own call; "engine": Engine.infer
    engine_latency_ms_p50: float | None = None
    overhead_pct: float | None = None
    model_only_ips: float | None = None  # batch / mean latency of Engine.infer (what infer runs)
    throughput_ips: float | None = None
    throughput_mode: str | None = None
    end_to_end_ips: float | None = None
    end_to_end_ratio: float | None = None  # end_to_end_ips / model_only_ips
    speedup: float | None = None  # throughput over the reference's at the same batch size
    gflops_per_s: float | None = None  # throughput x the model's FLOPs per image (2 per multiply-add)
    peak_pct: float | None = None  # gflops_per_s over the measured CPU peak at the row's precision, in %
    image_size: list[int] | None = None  # the network input (H, W) this row ran at
    # the input-size sweep: Dice of this row's masks against the reference run at the checkpoint's own
    # input size (torch fp32, masks compared at each image's original resolution)
    dice_vs_native_reference: float | None = None
    dice_vs_native_reference_min: float | None = None
    # --video CLIP: infer's video pipeline (decode, preprocess, infer, overlay, encode) on the clip
    video_fps: float | None = None
    video_latency_ms_p50: float | None = None  # glass to glass: frame decoded -> its overlay frame encoded
    video_latency_ms_p99: float | None = None
    video_share: float | None = None  # video_fps / model_only_ips
    video_dice_vs_reference: float | None = None  # per frame, against torch fp32 on the same decoded frames
    video_dice_vs_reference_min: float | None = None
    video_keeps_up: bool | None = None  # video_fps >= the clip's frame rate
    details: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        name = self.details.get("file")  # bench on artifact files: the file names the row
        return f"{self.backend} {self.precision}" + (f" ({name})" if name else "")

    @property
    def is_reference(self) -> bool:
        """The row every other is measured against: ``details["reference"]`` when set (bench on
        artifact files), else the :data:`REFERENCE` backend and precision."""
        flag = self.details.get("reference")
        return bool(flag) if flag is not None else (self.backend, self.precision) == REFERENCE

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BenchResult:
    """Everything one run measured: environment, settings, image sets, artifacts, rows, notes."""

    environment: dict
    settings: dict
    evaluation: dict
    calibration: dict | None
    artifacts: dict | None
    rows: list[BenchRow]
    notes: list[str]
    elapsed_s: float = 0.0
    reference: str = " ".join(REFERENCE)  # what "Dice vs ref" compares against

    def as_dict(self) -> dict:
        return {"tool": "resunetpp bench", "reference": self.reference, "environment": self.environment,
                "settings": self.settings, "evaluation": self.evaluation, "calibration": self.calibration,
                "artifacts": self.artifacts, "notes": self.notes, "elapsed_s": round(self.elapsed_s, 2),
                "rows": [r.as_dict() for r in self.rows]}


# ---- images ------------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """The evaluation images, preprocessed once, with masks and original sizes."""

    pre: Preprocessing
    num_classes: int
    names: list[str]
    paths: list[Path]
    inputs: list[np.ndarray]  # (C, h, w) float32
    sizes: list[tuple[int, int]]
    masks: list[np.ndarray | None]

    @classmethod
    def load(cls, images: cal.ImageSet, pre: Preprocessing, num_classes: int) -> "EvalData":
        names, inputs, sizes, masks = [], [], [], []
        for i, stem in enumerate(images.stems):
            image, mask = images.load(i, pre.channels, num_classes)
            names.append(stem)
            inputs.append(pre.apply(image))
            sizes.append(tuple(image.shape[:2]))
            masks.append(mask)
        return cls(pre, num_classes, names, list(images.paths), inputs, sizes, masks)

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, n: int) -> np.ndarray:
        """``n`` evaluation inputs of the first input's shape (cycled), stacked: a timing batch."""
        same = [x for x in self.inputs if x.shape == self.inputs[0].shape]
        return np.ascontiguousarray(np.stack([same[i % len(same)] for i in range(n)]), dtype=np.float32)


# ---- accuracy -----------------------------------------------------------------------------------------
PredictFn = Callable[[np.ndarray], np.ndarray]


def reference_outputs(predict: PredictFn, data: EvalData) -> list[np.ndarray]:
    """The reference's probabilities per evaluation image (network resolution)."""
    out = predict_batched(predict, data.inputs, ACCURACY_BATCH)
    bad = [data.names[i] for i, p in enumerate(out) if not np.isfinite(p).all()]
    if bad:
        raise ResUNetError(f"the reference (torch fp32) gives NaN/Inf on {len(bad)} image(s), e.g. {bad[0]}")
    return out


def measure_accuracy(predict: PredictFn | None, data: EvalData, reference: Sequence[np.ndarray],
                     batch_size: int = ACCURACY_BATCH, outputs: Sequence[np.ndarray] | None = None,
                     native_masks: Sequence[np.ndarray] | None = None) -> dict:
    """Accuracy of ``predict`` against the reference outputs on ``data``.

    Keys: ``dice_vs_reference`` (mean) and ``dice_vs_reference_min`` between binarised masks at
    the original image size, ``dice_drop`` = 1 - mean, ``mean_abs_diff`` / ``max_abs_diff`` of the
    probabilities, and with ground-truth masks ``dice_vs_gt``, ``iou_vs_gt``, ``dice_vs_gt_drop``.
    ``outputs``, when given, are ``predict``'s answers already computed (the reference row's own).
    ``native_masks`` (the input-size sweep): the reference's masks at the checkpoint's own input size,
    at each image's original resolution; adds ``dice_vs_native_reference`` (mean) and ``_min``.
    Raises :class:`NonFiniteResult` when any output holds NaN or Inf.
    """
    from resunetpp.engines.base import NonFiniteOutputError

    if outputs is None:
        try:
            outputs = predict_batched(predict, data.inputs, batch_size)
        except NonFiniteOutputError as e:
            raise NonFiniteResult(str(e)) from None
    m = compare_outputs(outputs, reference, masks=data.masks, pre=data.pre, sizes=data.sizes, names=data.names,
                        num_classes=data.num_classes)
    if m["nonfinite_images"]:
        raise NonFiniteResult(f"NaN or Inf in the output of {m['nonfinite_images']} of {m['images']} images")
    ious = [scores(probs_to_mask(data.pre.restore(p, *size)), gt, data.num_classes).iou
            for p, size, gt in zip(outputs, data.sizes, data.masks) if gt is not None]
    native = {}
    if native_masks is not None:
        dice = [scores(probs_to_mask(data.pre.restore(p, *size)), ref, data.num_classes).dice
                for p, size, ref in zip(outputs, data.sizes, native_masks)]
        native = {"dice_vs_native_reference": float(np.mean(dice)), "dice_vs_native_reference_min": float(np.min(dice))}
    return {**native,
        "dice_vs_reference": m["dice_vs_reference_mean"],
        "dice_vs_reference_min": m["dice_vs_reference_min"],
        "dice_drop": 1.0 - m["dice_vs_reference_mean"],
        "mean_abs_diff": m["abs_error_mean"],
        "max_abs_diff": m["abs_error_max"],
        "dice_vs_gt": m["dice_vs_gt_mean"],
        "iou_vs_gt": float(np.mean(ious)) if ious else None,
        "dice_vs_gt_drop": m["dice_vs_gt_drop"],
        "worst_images": m["worst_images"],
    }


# ---- timing -------------------------------------------------------------------------------------------
def latency_summary(seconds: Sequence[float]) -> dict:
    """Mean and p50/p90/p99 in milliseconds of per-call times in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "iterations": int(ms.size)}


def measure_latency(engine_call: PredictFn, runtime_call: Callable[[np.ndarray], Any] | None, x: np.ndarray,
                    warmup_s: float, duration_s: float) -> dict:
    """Time ``runtime_call(x)`` (the backend's own call) and ``engine_call(x)`` (the toolkit's) alternately.

    Warm-up runs both for ``warmup_s``; the timed window then alternates single calls (which goes
    first alternates too) for ``duration_s`` and at least :data:`MIN_ITERATIONS` of each, so slow
    drift and a busy machine affect both alike. Returns the runtime latency summary (the
    engine's when there is no runtime call), the engine's, and ``overhead_pct``: the engine's
    median over the runtime's, minus one, in percent.
    """
    calls = [engine_call] if runtime_call is None else [runtime_call, engine_call]
    start = time.perf_counter()
    while True:
        for fn in calls:
            fn(x)
        if time.perf_counter() - start >= warmup_s:
            break
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    i = 0
    while i < MIN_ITERATIONS or time.perf_counter() - start < duration_s:
        order = range(len(calls)) if i % 2 == 0 else reversed(range(len(calls)))
        for k in order:
            t0 = time.perf_counter()
            calls[k](x)
            times[k].append(time.perf_counter() - t0)
        i += 1
    engine = latency_summary(times[-1])
    if runtime_call is None:
        return {"latency": engine, "engine": engine, "overhead_pct": None, "source": "engine"}
    runtime = latency_summary(times[0])
    return {"latency": runtime, "engine": engine, "overhead_pct": 100.0 * (engine["p50"] / runtime["p50"] - 1.0),
            "source": "runtime"}


def openvino_throughput(engine: Any, x: np.ndarray, warmup_s: float, duration_s: float) -> dict:
    """Images/s of an OpenVINO engine compiled with the THROUGHPUT hint, through ``AsyncInferQueue``.

    Batches go through :meth:`resunetpp.engines.openvino_engine.OpenVINOEngine.infer_async_many` in chunks of
    twice the device's optimal number of requests, for ``duration_s`` after ``warmup_s``.
    """
    engine.load()
    requests = _optimal_requests(engine)
    chunk = [x] * max(4, 2 * requests)
    start = time.perf_counter()
    while True:
        engine.infer_async_many(chunk)
        if time.perf_counter() - start >= warmup_s:
            break
    images, calls = 0, 0
    start = time.perf_counter()
    while calls < 1 or time.perf_counter() - start < duration_s:
        engine.infer_async_many(chunk)
        images += len(chunk) * x.shape[0]
        calls += 1
    elapsed = time.perf_counter() - start
    return {"throughput_ips": images / elapsed, "requests": requests,
            "mode": f"async: THROUGHPUT hint, AsyncInferQueue of {requests} requests"}


def _optimal_requests(engine: Any) -> int:
    ask = getattr(engine, "optimal_requests", None)  # OpenVINOEngine.optimal_requests; fakes have none
    return ask() if ask is not None else 1


def end_to_end_rate(engine: Any, paths: Sequence[Path], batch_size: int, seconds: float, threads: int) -> float:
    """Images/s of :func:`resunetpp.engines.infer.run_inference` over ``paths`` (repeated passes for
    ``seconds``, at least one), masks written to a temporary folder that is removed. Each pass
    holds at least one full batch (``paths`` repeated when fewer), so batching is exercised."""
    from resunetpp.engines.infer import InferOptions, run_inference
    from resunetpp.sources.images import ImageFiles

    paths = list(paths) * max(1, -(-batch_size // max(1, len(paths))))
    images, total = 0, 0.0
    with tempfile.TemporaryDirectory(prefix="resunetpp-bench-") as tmp:
        options = InferOptions(out=Path(tmp), batch_size=batch_size, threads=threads)
        while images == 0 or total < seconds:
            result = run_inference(engine, ImageFiles(paths), options)  # repeated paths keep a-2, a-3 keys
            if result.failures:
                raise ResUNetError(f"end-to-end run failed on {len(result.failures)} image(s): "
                                   f"{result.failures[0].message}")
            images += result.written
            total += result.total_seconds
    return images / total if total > 0 else 0.0


# ---- one engine -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How each row is measured."""

    batch_sizes: tuple[int, ...] = (1, 8)
    warmup_s: float = 1.0
    duration_s: float = 3.0
    threads: int | None = None
    end_to_end: bool = True


def _failure(base: BenchRow, error: BaseException) -> BenchRow:
    from resunetpp.engines.base import NonFiniteOutputError

    if isinstance(error, (NonFiniteResult, NonFiniteOutputError)):
        return dataclasses.replace(base, status=NONFINITE, reason=_one_line(error))
    kind = "engine error" if isinstance(error, ResUNetError) else type(error).__name__
    return dataclasses.replace(base, status=f"failed: {kind}", reason=_one_line(error))


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _precision_hint(details: dict) -> str | None:
    hint = details.get("precision_hint")
    if hint is None:
        return None
    found = re.search(r"'(\w+)'", str(hint))
    return found.group(1) if found else str(hint)


def bench_engine(engine: Any, base: BenchRow, data: EvalData, reference: Sequence[np.ndarray], settings: Settings,
                 throughput_engine: Callable[[], Any] | None = None, reporter: Reporter | None = None,
                 is_reference: bool = False, native_masks: Sequence[np.ndarray] | None = None,
                 video: Any = None) -> list[BenchRow]:
    """Accuracy once, then latency / throughput / end-to-end per batch size, of a loaded ``engine``.

    ``base`` carries the row's identity (backend, precision, artifact, size, load time); with
    ``is_reference`` the engine is the reference itself and its accuracy uses ``reference`` as
    its outputs instead of computing them again. ``native_masks``: the sweep's reference masks
    (:func:`measure_accuracy`). ``video`` (a :class:`resunetpp.bench.video.VideoPlan`): the clip is
    also run through ``infer``'s video pipeline, once per artifact, its numbers in every row.
    ``throughput_engine()`` opens a second engine for async throughput (OpenVINO); without it
    throughput is batch / mean latency. A NaN/Inf output or an error fails the row(s); it never
    raises (except ``KeyboardInterrupt``).
    """
    reporter = reporter or NullReporter()
    details = {k: v for k, v in engine.describe().items() if k not in ("file",)}
    if _precision_hint(details):
        details["precision_hint"] = _precision_hint(details)
    base = dataclasses.replace(base, details={**base.details, **details}, image_size=list(data.pre.size))
    if engine.preprocessing.to_dict() != data.pre.to_dict():
        return [dataclasses.replace(base, status="failed: preprocessing mismatch",
                                    reason=f"the artifact preprocesses {engine.preprocessing.to_dict()}, the "
                                           f"reference {data.pre.to_dict()}")]
    try:
        with reporter.task(f"{base.label}: accuracy on {len(data)} images"):
            acc = measure_accuracy(engine.predict, data, reference, outputs=reference if is_reference else None,
                                   native_masks=native_masks)
    except Exception as e:  # noqa: BLE001 - a broken backend is a failed row, not a crashed benchmark
        return [_failure(base, e)]
    worst = acc.pop("worst_images")
    base = dataclasses.replace(base, **acc, details={**base.details, "worst_images": worst})
    if video is not None:
        from resunetpp.bench.video import measure_video

        try:
            with reporter.task(f"{base.label}: video {video.path.name} ({video.frames} frames)"):
                found = measure_video(engine, video, settings.threads)
            base = dataclasses.replace(base, **found.fields(), details={**base.details, "video": found.details})
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - the model-only numbers stand; the video's failure is said
            base = dataclasses.replace(base, details={**base.details, "video_error": _one_line(e)})
    rows = []
    for b in settings.batch_sizes:
        row = dataclasses.replace(base, batch_size=b, details=dict(base.details))
        limit = engine.input_shape_constraints.max_batch
        fixed = engine.input_shape_constraints.batch
        if (fixed is not None and b != fixed) or (limit is not None and b > limit):
            rows.append(dataclasses.replace(row, status="skipped", reason=f"the artifact takes batches of "
                                            f"{fixed if fixed is not None else f'at most {limit}'}"))
            continue
        try:
            with reporter.task(f"{base.label}: speed at batch {b}"):
                rows.append(_speed(engine, row, data, settings, throughput_engine))
        except Exception as e:  # noqa: BLE001
            rows.append(_failure(row, e))
    return rows


def _speed(engine: Any, row: BenchRow, data: EvalData, settings: Settings,
           throughput_engine: Callable[[], Any] | None) -> BenchRow:
    b = row.batch_size
    x = data.batch(b)
    with other_processes_cpu() as busy:
        lat = measure_latency(engine.infer, engine.runtime_call(), x, settings.warmup_s, settings.duration_s)
        model_only = b * 1e3 / lat["engine"]["mean"]
        throughput, mode = b * 1e3 / lat["latency"]["mean"], f"sync: batch {b} / mean latency"
        if throughput_engine is not None:
            with throughput_engine() as tput:
                t = openvino_throughput(tput, x, settings.warmup_s, settings.duration_s)
            # collect the closed engine's cyclic garbage here, in the main thread: left to the
            # garbage collector, it can run inside a later AsyncInferQueue's callback thread and
            # destroy OpenVINO objects there, which aborts the process natively ("terminate called
            # ... Resource deadlock avoided": a thread joining itself)
            gc.collect()
            throughput, mode = t["throughput_ips"], t["mode"]
        e2e = None
        if settings.end_to_end:
            e2e = end_to_end_rate(engine, data.paths, b, settings.duration_s, settings.threads or 2)
    row.details["other_processes_cpu_pct"] = busy.pct
    return dataclasses.replace(
        row, latency_ms_mean=lat["latency"]["mean"], latency_ms_p50=lat["latency"]["p50"],
        latency_ms_p90=lat["latency"]["p90"], latency_ms_p99=lat["latency"]["p99"],
        latency_iterations=lat["latency"]["iterations"], latency_source=lat["source"],
        engine_latency_ms_p50=lat["engine"]["p50"], overhead_pct=lat["overhead_pct"], model_only_ips=model_only,
        throughput_ips=throughput, throughput_mode=mode, end_to_end_ips=e2e,
        end_to_end_ratio=e2e / model_only if e2e is not None and model_only > 0 else None,
        video_share=row.video_fps / model_only if row.video_fps is not None and model_only > 0 else None)


# ---- targets -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A runnable row: which artifact, on which device, with which engine options."""

    backend: str
    precision: str
    device: str
    options: dict = field(default_factory=dict)
    artifact: tuple[str, str] | None = None  # export (format, precision); None: the checkpoint

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


def plan_targets(backends: Sequence[str], precisions: Sequence[str], *, device: str, cpu_flags: dict,
                 available: dict[str, str | None], calib_missing: str | None,
                 threads: int | None) -> tuple[list[Target], list[BenchRow]]:
    """Every selected combination of :func:`matrix`: a :class:`Target` or a skipped row with its reason.

    Each backend's bench options (:mod:`resunetpp.engines.registry`) give the row's device (from
    ``device``: ``auto``, ``cpu``, ``cuda``), its engine options and the artifact it reads."""
    targets, skipped = [], []
    for backend, run in registry.bench_matrix():
        if backend.name not in backends or run.precision not in precisions:
            continue
        row_device = backend.bench.device(device)
        reason = available.get(backend.name)
        if reason is None:
            reason = _combination_problem(run, row_device, cpu_flags, calib_missing)
        if reason is not None:
            skipped.append(BenchRow(backend.name, run.precision, status="skipped", reason=reason))
            continue
        options: dict = {backend.bench.threads_option: threads} if threads and backend.bench.threads_option else {}
        options.update(run.options)
        targets.append(Target(backend.name, run.precision, row_device, options, artifact=run.artifact))
    return targets, skipped


def _combination_problem(run: registry.BenchPrecision, device: str, cpu_flags: dict,
                         calib_missing: str | None) -> str | None:
    """Why one row cannot run here (``None``: it can): INT8 without calibration images, a row that
    cannot run on the CPU, bf16 on a CPU without native bf16, a missing package."""
    if run.precision == "int8" and calib_missing:
        return calib_missing
    if device == "cpu" and run.cpu_problem:
        return run.cpu_problem
    if device == "cpu" and run.cpu_bf16:
        problem = cpu_bf16_problem(cpu_flags)
        if problem is not None:
            return problem
    for module, why in run.requires:
        if importlib.util.find_spec(module) is None:
            return why
    return None


# ---- the run -----------------------------------------------------------------------------------------
@dataclass
class _Setup:
    ckpt_path: Path
    ckpt: Checkpoint
    pre: Preprocessing
    data_path: Path
    images: ImagePlan
    default_model: bool


def _setup(options: BenchOptions) -> _Setup:
    from resunetpp.defaults import default_data_path, default_model_path

    shipped = default_model_path()
    model = options.model or shipped
    if model is None:
        raise ResUNetError("no MODEL given and this install ships no default model; pass a checkpoint")
    data = options.data or default_data_path()
    if data is None:
        raise ResUNetError("no --data given and this install ships no sample images; pass --data DIR")
    default_model = shipped is not None and Path(model).resolve() == shipped.resolve()
    ckpt = load_checkpoint(model)
    try:
        pre = ckpt.preprocessing.with_size(options.image_size)
    except ValueError as e:
        raise ResUNetError(f"--image-size: {e}") from None
    ckpt = dataclasses.replace(ckpt, preprocessing=pre)
    images = plan_images(Path(data), options.split, options.calib, default_model, default_data_path())
    return _Setup(Path(model), ckpt, pre, Path(data), images, default_model)


def _open(target: Target, setup: _Setup, artifacts: ArtifactSet | None, **extra: Any):
    from resunetpp import engines

    if target.artifact is None:  # the backend runs the checkpoint itself (torch)
        return engines.open(setup.ckpt, backend=target.backend, device=target.device, **target.options, **extra)
    assert artifacts is not None
    path = artifacts.paths[target.artifact]
    return engines.open(path, backend=target.backend, device=target.device, record=sized_record(path, setup.pre),
                        **target.options, **extra)


def sized_record(path: Path, pre: Preprocessing) -> dict | None:
    """The artifact's metadata record with its input size set to ``pre``'s (the input-size sweep runs
    one dynamic-H/W artifact at every size), or ``None`` when it already has that size (the sidecar
    is used as it is). Only the size changes: a different normalisation still shows as a mismatch.
    A static-size artifact then refuses to load ("graph input is 256x256 ..."): a failed row."""
    from resunetpp.artifact import read_record

    record = read_record(path)
    own = Preprocessing.from_dict(record["preprocessing"])
    if tuple(own.size) == tuple(pre.size) or own.mode != "resize":
        return None
    return {**record, "preprocessing": own.with_size(pre.size).to_dict()}


def bench_target(target: Target, setup: _Setup, artifacts: ArtifactSet | None, data: EvalData,
                 reference: Sequence[np.ndarray], settings: Settings, reporter: Reporter,
                 native_masks: Sequence[np.ndarray] | None = None, video: Any = None) -> list[BenchRow]:
    """Open one target (timed), then :func:`bench_engine`; problems become failed/skipped rows."""
    base = BenchRow(target.backend, target.precision, device=target.device, image_size=list(setup.pre.size),
                    details={"engine_options": dict(target.options)})
    if target.artifact is None:
        base.artifact, base.size_mb = str(setup.ckpt_path), artifact_size_mb(setup.ckpt_path)
    else:
        path = artifacts.paths.get(target.artifact) if artifacts is not None else None
        if path is None:
            why = artifacts.problems.get(target.artifact) if artifacts is not None else None
            return [dataclasses.replace(base, status="failed: no artifact",
                                        reason=why or "the export did not produce this artifact")]
        base.artifact, base.size_mb = str(path), artifact_size_mb(path)
    try:
        with reporter.task(f"{target.label}: load"):
            start = time.perf_counter()
            engine = _open(target, setup, artifacts).load()
            base.load_s = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a backend that cannot load is a failed row
        return [_failure(base, e)]
    tput_options = registry.get(target.backend).bench.throughput_options
    tput = (lambda: _open(target, setup, artifacts, **tput_options)) if tput_options is not None else None
    with engine:
        return bench_engine(engine, base, data, reference, settings, tput, reporter,
                            is_reference=(target.backend, target.precision) == REFERENCE,
                            native_masks=native_masks, video=video)


def model_flops(ckpt: Checkpoint, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one ``(C, H, W)`` input (convolutions and matmuls, 2 per
    multiply-add; :func:`resunetpp.flops.count_flops`)."""
    from resunetpp.flops import count_flops

    return count_flops(ckpt.build_model("cpu"), tuple(input_shape)).total


def add_speedups(rows: Sequence[BenchRow], flops_per_image: int | None = None,
                 peaks: dict[str, dict] | None = None) -> None:
    """``speedup`` of each measured row (its throughput over the reference's at the same batch size and
    input size)
    and, given the model's FLOPs per image, the arithmetic rate it reaches (``gflops_per_s``); given
    the CPU's measured peaks (:func:`resunetpp.bench.peak.cpu_peaks`), that rate as a share of the peak
    at the row's :func:`arithmetic_precision` (``peak_pct``)."""
    def at(r: BenchRow) -> tuple:
        return tuple(r.image_size or ()), r.batch_size

    ref = {at(r): r.throughput_ips for r in rows if r.is_reference and r.ok and r.throughput_ips}
    for r in rows:
        if r.ok and r.throughput_ips and ref.get(at(r)):
            r.speedup = r.throughput_ips / ref[at(r)]
        if r.ok and r.throughput_ips and flops_per_image:
            r.gflops_per_s = r.throughput_ips * flops_per_image / 1e9
            peak = (peaks or {}).get(arithmetic_precision(r) or "")
            if peak and peak.get("gflops"):
                r.peak_pct = 100.0 * r.gflops_per_s / peak["gflops"]


def arithmetic_precision(row: BenchRow) -> str | None:
    """The precision a CPU row's convolutions run in (``f32``, ``bf16``, ``int8`` for OpenVINO INT8,
    whose recipe keeps a few in float), or ``None``: a GPU row, ONNX Runtime INT8 (float convolutions
    on dequantized values) or fp16 (casts around unsupported kernels) -- as its backend's bench
    options tell (``BenchSpec.arithmetic``)."""
    backend = registry.find(row.backend)
    if backend is None or backend.bench.arithmetic is None:
        return None
    return backend.bench.arithmetic(row.precision, row.device, row.details)


def measure_peaks(rows: Sequence[BenchRow], threads: int | None, cpu_flags: dict, notes: list[str],
                  seconds: float = 3.0) -> dict[str, dict] | None:
    """The CPU's measured peaks (:func:`resunetpp.bench.peak.cpu_peaks`) when a measured row runs its
    convolutions on the CPU in f32, bf16 or int8 (:func:`arithmetic_precision`) and OpenVINO is
    installed; ``None`` otherwise. f32 is always measured then (the reference scale), bf16 where a
    row needs it and the CPU computes it natively, int8 where an OpenVINO INT8 row ran."""
    wanted = {arithmetic_precision(r) for r in rows if r.ok} - {None}
    if not wanted or importlib.util.find_spec("openvino") is None:
        return None
    from resunetpp.bench.peak import cpu_peaks, peak_shapes

    problems: dict[str, str] = {}
    try:
        peaks = cpu_peaks(threads, bf16="bf16" in wanted and cpu_bf16_problem(cpu_flags) is None, seconds=seconds,
                          int8="int8" in wanted, problems=problems)
    except Exception as e:  # noqa: BLE001 - the rows stand without it
        notes.append(f"the CPU peak could not be measured: {_one_line(e)}")
        return None
    for p, why in problems.items():
        notes.append(f"the CPU's {p} peak could not be measured: {why}")
    if not peaks:
        return None
    text = ", ".join(f"{p} {v['gflops']:.0f} {v.get('unit', 'GFLOP/s')} ({v['kernel']}, {v['runtime_precision']})"
                     for p, v in peaks.items())
    notes.append(f"peak: {text}, measured on this CPU at the end of the run (the fastest of "
                 f"{len(peak_shapes('f32'))} OpenVINO 3x3 convolutions, {len(peak_shapes('int8'))} for int8: u8 "
                 f"activations x int8 weights; {next(iter(peaks.values()))['threads']} threads); GFLOP/s (x%) = share "
                 "of the peak at the row's precision (fp32, bf16 rows on the CPU; OpenVINO int8 rows against the "
                 "int8 peak, though the recipe keeps some convolutions in float); a whole model can come out "
                 "slightly above one isolated layer's rate")
    return peaks


def gate_failures(rows: Sequence[BenchRow], max_dice_drop: float) -> list[str]:
    """One line per backend/precision whose Dice drop against the reference exceeds ``max_dice_drop``,
    or whose accuracy could not be measured (failed rows); skipped rows do not count."""
    out: dict[str, str] = {}
    for r in rows:
        if r.label in out:
            continue
        if r.failed and r.dice_drop is None:
            out[r.label] = f"{r.label} ({r.status})"
        elif r.dice_drop is not None and r.dice_drop > max_dice_drop:
            out[r.label] = f"{r.label} (Dice drop {r.dice_drop:.4f} > {max_dice_drop:g})"
    return list(out.values())


def run_bench(options: BenchOptions, reporter: Reporter | None = None) -> BenchResult:
    """Run the whole benchmark (see the module docstring) and return its result.

    With ``options.image_sizes`` (the input-size sweep) every row runs at each size, on artifacts
    exported once at the checkpoint's own input size; each row's accuracy is also measured against
    the reference at that native size (``dice_vs_native_reference``), and ``size_sweep`` in the
    settings summarises speed and accuracy per size. With ``options.video`` every row also runs
    ``infer``'s video pipeline on the clip (:mod:`resunetpp.bench.video`)."""
    from resunetpp import engines

    options.validate()
    reporter = reporter or NullReporter()
    started = time.perf_counter()
    setup = _setup(options)
    if options.image_sizes and setup.pre.mode != "resize":
        raise ResUNetError(f"--image-size with several sizes needs a model that resizes its input; this one "
                           f"preprocesses in {setup.pre.mode!r} mode (the network runs at each image's own size)")
    env = collect_environment(options.threads)
    targets, skipped = plan_targets(options.backends or backends(), options.precisions or precisions(),
                                    device=options.device, cpu_flags=env["cpu"]["flags"],
                                    available=engines.available_backends(),
                                    calib_missing=setup.images.calib_missing, threads=options.threads)
    settings = Settings(tuple(sorted(set(int(b) for b in options.batch_sizes))), options.warmup_s,
                        options.duration_s, options.threads, options.end_to_end)
    notes = list(setup.images.notes)
    sizes: tuple[int | None, ...] = tuple(options.image_sizes) if options.image_sizes else (None,)
    flops: dict[tuple[int, ...], int] = {}
    video_record = None
    with torch_threads(options.threads):
        artifacts = _artifacts(options, setup, targets, reporter, notes)
        native_masks = None
        if options.image_sizes:
            with reporter.task(f"torch fp32 reference at the native {setup.pre.size[0]}x{setup.pre.size[1]}"):
                native = EvalData.load(setup.images.evaluation, setup.pre, setup.ckpt.config.num_classes)
                native_masks = native_reference_masks(setup, native, options.device)
        per_size = []  # (setup at the size, its images, the reference's outputs, the clip's plan)
        for size in sizes:
            at = _at_size(setup, size)
            with reporter.task(f"load {len(setup.images.evaluation)} evaluation images"
                               + (f" at {size}x{size}" if size else "")):
                data = EvalData.load(setup.images.evaluation, at.pre, setup.ckpt.config.num_classes)
            with reporter.task("torch fp32 reference outputs" + (f" at {size}x{size}" if size else "")):
                ref = registry.get(REFERENCE[0])
                with engines.open(at.ckpt, backend=ref.name, device=ref.bench.device(options.device)) as ref_engine:
                    reference = reference_outputs(ref_engine.predict, data)
                    video = None
                    if options.video is not None:
                        from resunetpp.bench.video import plan_video

                        video = plan_video(options.video, ref_engine)
                        video_record = video.record()
            flops[tuple(at.pre.size)] = model_flops(at.ckpt, data.inputs[0].shape)
            per_size.append((at, data, reference, video))
        rows: list[BenchRow] = []
        # every size of one backend before the next backend: an ONNX Runtime session created after
        # OpenVINO ran in the same process can abort natively ("Resource deadlock avoided")
        for target in targets:
            for at, data, reference, video in per_size:
                rows.extend(bench_target(target, at, artifacts, data, reference, settings, reporter,
                                         native_masks=native_masks, video=video))
                gc.collect()  # the runtime objects of this size go here, not in a runtime's worker thread
    order = {combo: i for i, combo in enumerate(matrix())}
    rows = sorted(rows, key=lambda r: (tuple(r.image_size or ()), order[(r.backend, r.precision)],
                                       r.batch_size or 0))
    rows = skipped + rows if options.image_sizes else sorted(
        rows + skipped, key=lambda r: (order[(r.backend, r.precision)], r.batch_size or 0))
    notes += _standard_notes(settings)
    if options.image_sizes:
        notes.append(_sweep_note(setup))
    if options.video is not None:
        notes.append(_video_note(video_record))
    with reporter.task("CPU peak (f32, bf16, int8)"):
        peaks = measure_peaks(rows, options.threads, env["cpu"]["flags"], notes)
    notes += _contention_notes(rows)
    env["cpu_peak"] = peaks
    for size_hw, per_image in flops.items():
        add_speedups([r for r in rows if tuple(r.image_size or ()) == size_hw or (r.image_size is None and len(flops) == 1)],
                     per_image, peaks)
    native_flops = flops.get(tuple(setup.pre.size)) or model_flops(setup.ckpt, (setup.pre.channels, *setup.pre.size))
    record = {**_settings_record(options, settings, setup), "gflop_per_image": native_flops / 1e9}
    if options.image_sizes:
        record.update(image_sizes=list(options.image_sizes), native_size=list(setup.pre.size),
                      gflop_per_image_by_size={f"{h}x{w}": f / 1e9 for (h, w), f in flops.items()})
        record["size_sweep"] = size_sweep(rows, target_fps(video_record))
    if video_record is not None:
        record["video"] = video_record
    return BenchResult(env, record, _evaluation_record(setup, data),
                       setup.images.calibration.record() if setup.images.calibration is not None else None,
                       artifacts.record() if artifacts is not None else None, rows, notes,
                       time.perf_counter() - started)


#: The frame rate an operating point must keep up with when no clip gives one (colonoscopy video: 25-30 fps).
DEFAULT_TARGET_FPS = 25.0


def target_fps(video_record: dict | None) -> float:
    """The clip's frame rate when there is one, else :data:`DEFAULT_TARGET_FPS`."""
    fps = (video_record or {}).get("fps")
    return float(fps) if fps else DEFAULT_TARGET_FPS


def _at_size(setup: _Setup, size: int | None) -> _Setup:
    if size is None:
        return setup
    pre = setup.pre.with_size(size)
    return dataclasses.replace(setup, pre=pre, ckpt=dataclasses.replace(setup.ckpt, preprocessing=pre))


def native_reference_masks(setup: _Setup, data: EvalData, device: str) -> list[np.ndarray]:
    """The reference's masks at the checkpoint's own input size, each at its image's original resolution."""
    from resunetpp import engines

    ref = registry.get(REFERENCE[0])
    with engines.open(setup.ckpt, backend=ref.name, device=ref.bench.device(device)) as engine:
        outputs = reference_outputs(engine.predict, data)
    return [probs_to_mask(data.pre.restore(p, *size)) for p, size in zip(outputs, data.sizes)]


def size_sweep(rows: Sequence[BenchRow], fps: float = DEFAULT_TARGET_FPS) -> list[dict]:
    """One point per input size and backend/precision (its smallest batch size's row): the numbers a
    user picks an operating point from -- speed (throughput, model-only and, with a clip, video FPS),
    Dice against ground truth and against the reference at the native size, and whether it keeps up
    with ``fps`` (the clip's rate; video FPS when measured, else the model-only rate)."""
    best: dict[tuple, BenchRow] = {}
    for r in rows:
        if r.image_size is None or r.batch_size is None:
            continue
        key = (tuple(r.image_size), r.label)
        if key not in best or r.batch_size < best[key].batch_size:
            best[key] = r
    out = []
    for (size, _), r in best.items():
        speed = r.video_fps if r.video_fps is not None else r.model_only_ips
        out.append({"image_size": list(size), "backend": r.backend, "precision": r.precision, "status": r.status,
                    "reason": r.reason, "batch_size": r.batch_size, "throughput_ips": r.throughput_ips,
                    "model_only_ips": r.model_only_ips, "video_fps": r.video_fps, "dice_vs_gt": r.dice_vs_gt,
                    "dice_vs_native_reference": r.dice_vs_native_reference,
                    "dice_vs_native_reference_min": r.dice_vs_native_reference_min,
                    "dice_vs_reference": r.dice_vs_reference, "target_fps": fps,
                    "keeps_up": None if speed is None else bool(speed >= fps)})
    return out


def _sweep_note(setup: _Setup) -> str:
    h, w = setup.pre.size
    return (f"input-size sweep: every row runs at each size on the artifacts exported once at {h}x{w} (dynamic H/W); "
            "Dice vs ref compares with torch fp32 at the same size, Dice vs GT and dice_vs_native_reference (torch "
            f"fp32 at {h}x{w}) are measured at each image's original resolution")


def _video_note(record: dict | None) -> str:
    r = record or {}
    return (f"video: {r.get('file')} ({r.get('frames')} frames, {r.get('width')}x{r.get('height')} at "
            f"{r.get('fps') or 0:.3g} fps) through infer's video pipeline (decode, preprocess, infer, overlay, "
            "encode); video fps over the whole clip, latency from a frame decoded to its overlay frame encoded, "
            "share = video fps / model-only rate, Dice per frame against torch fp32 on the same decoded frames; "
            "keeps up: video fps >= the clip's frame rate")


def is_checkpoint(path: str | Path) -> bool:
    """Whether the backend that runs ``path`` by default opens checkpoints (torch: ``.safetensors``, ``.pt``)."""
    from resunetpp import engines

    return registry.get(engines.backend_for(path)).opens_checkpoints


def run_bench_files(files: Sequence[Path], options: BenchOptions, reporter: Reporter | None = None,
                    reference: Path | None = None) -> BenchResult:
    """Benchmark model files as they are (``resunetpp bench a.onnx b.xml c.engine``), nothing exported.

    Every file is one row per batch size, on the backend its suffix picks, at the precision its
    metadata records. The reference is ``reference`` (a checkpoint or an artifact), else the first
    checkpoint among ``files``, else -- said in a note -- the first FP32 artifact (the first file when
    none is FP32); a reference that is not among ``files`` is measured as a row too. Accuracy is
    against the reference's masks on the evaluation images (``options.data``, default the shipped
    sample images), speed-ups against its throughput. ``options.backends``, ``precisions``,
    ``artifacts`` and ``calib`` do not apply (nothing is exported or selected).
    """
    from resunetpp import engines
    from resunetpp.defaults import default_data_path

    options.validate()
    for name, value in (("--backends", options.backends), ("--precisions", options.precisions),
                        ("--artifacts", options.artifacts), ("--calib", options.calib),
                        ("--image-size", options.image_size if options.image_sizes is None else options.image_sizes)):
        if value is not None:
            raise ResUNetError(f"{name} applies to benchmarking a checkpoint (which bench exports); the model "
                               "files given are benchmarked as they are")
    files = [Path(f) for f in files]
    if not files:
        raise ResUNetError("no model file given")
    reporter = reporter or NullReporter()
    started = time.perf_counter()
    data_path = options.data or default_data_path()
    if data_path is None:
        raise ResUNetError("no --data given and this install ships no sample images; pass --data DIR")
    notes: list[str] = []

    def open_file(path: Path, **extra: Any):
        backend = registry.get(engines.backend_for(path))
        opts = {backend.bench.threads_option: options.threads} if options.threads and backend.bench.threads_option \
            else {}
        return engines.open(path, device=backend.bench.device(options.device), **opts, **extra)

    probes = {}
    for path in dict.fromkeys([*files, *([reference] if reference is not None else [])]):
        engine = open_file(path)  # metadata only: the runtime loads later
        probes[path] = (engine.name, engine.precision, engine.preprocessing, engine.num_classes)
        engine.close()
    if reference is None:
        checkpoints = [f for f in files if is_checkpoint(f)]
        fp32 = [f for f in files if probes[f][1] == "fp32"]
        reference = (checkpoints or fp32 or files)[0]
        if not checkpoints:
            notes.append(f"no reference checkpoint given (pass it as a MODEL or with --reference): {reference.name} "
                         f"({probes[reference][0]} {probes[reference][1]}) is the reference, the first "
                         + ("FP32 file" if fp32 else "file (none is FP32)"))
    ref_backend, ref_precision, pre, num_classes = probes[reference]
    order = [reference, *[f for f in dict.fromkeys(files) if f != reference]]
    # measured in backend order (the report keeps ``order``): an ONNX Runtime session created after
    # OpenVINO rows in one process aborted natively here ("Resource deadlock avoided"), as bench on a
    # checkpoint, which measures ONNX Runtime first, never does
    rank = {name: i for i, name in enumerate(registry.names())}
    measure = sorted(order, key=lambda f: rank.get(probes[f][0], len(rank)))
    env = collect_environment(options.threads)
    settings = Settings(tuple(sorted(set(int(b) for b in options.batch_sizes))), options.warmup_s,
                        options.duration_s, options.threads, options.end_to_end)
    evaluation = cal.select_images(Path(data_path), options.split, None, role="evaluation", default_split="val")
    rows: list[BenchRow] = []
    with torch_threads(options.threads):
        with reporter.task(f"load {len(evaluation)} evaluation images"):
            data = EvalData.load(evaluation, pre, num_classes)
        ckpt = next((load_checkpoint(p) for p in [reference, *order] if is_checkpoint(p)), None)
        flops = model_flops(ckpt, data.inputs[0].shape) if ckpt is not None else None  # before any OpenVINO row
        video = None
        with reporter.task(f"{reference.name}: reference outputs"):
            with open_file(reference) as ref_engine:
                reference_out = reference_outputs(ref_engine.predict, data)
                if options.video is not None:
                    from resunetpp.bench.video import plan_video

                    video = plan_video(options.video, ref_engine)
        for path in measure:
            backend_name, precision = probes[path][:2]
            base = BenchRow(backend_name, precision, artifact=str(path), size_mb=artifact_size_mb(path),
                            details={"file": path.name, "reference": path == reference})
            try:
                with reporter.task(f"{path.name}: load"):
                    start = time.perf_counter()
                    engine = open_file(path).load()
                    base.load_s = time.perf_counter() - start
                    base.device = engine.device
            except Exception as e:  # noqa: BLE001 - a file that cannot load is a failed row
                rows.append(_failure(base, e))
                continue
            tput_options = registry.get(backend_name).bench.throughput_options
            tput = (lambda p=path: open_file(p, **tput_options)) if tput_options is not None else None
            with engine:
                rows.extend(bench_engine(engine, base, data, reference_out, settings, tput, reporter,
                                         is_reference=path == reference, video=video))
    position = {str(f): i for i, f in enumerate(order)}
    rows.sort(key=lambda r: (position[r.artifact], r.batch_size or 0))
    if flops is None:
        notes.append("GFLOP/s needs a checkpoint (the model's FLOPs are counted on it); none was given")
    notes += _standard_notes(settings)[1:]
    if video is not None:
        notes.append(_video_note(video.record()))
    notes.insert(0, f"accuracy is measured once per file (batch {ACCURACY_BATCH}) against {reference.name} and "
                    "repeated in each batch-size row; dice_drop = 1 - Dice vs the reference mask")
    with reporter.task("CPU peak (f32, bf16, int8)"):
        peaks = measure_peaks(rows, options.threads, env["cpu"]["flags"], notes)
    notes += _contention_notes(rows)
    env["cpu_peak"] = peaks
    add_speedups(rows, flops, peaks)
    record = {"model": str(reference), "default_model": False,
              "checkpoint_sha256": ckpt.sha256 if ckpt is not None else None, "image_size": list(pre.size),
              "files": [str(f) for f in order], "backends": list(dict.fromkeys(r.backend for r in rows)),
              "precisions": list(dict.fromkeys(r.precision for r in rows)),
              "batch_sizes": list(settings.batch_sizes), "warmup_s": settings.warmup_s,
              "duration_s": settings.duration_s, "threads": settings.threads, "device": options.device,
              "accuracy_batch": ACCURACY_BATCH, "min_iterations": MIN_ITERATIONS,
              "gflop_per_image": flops / 1e9 if flops else None}
    if video is not None:
        record["video"] = video.record()
    return BenchResult(env, record, {**evaluation.record(), "with_masks": all(m is not None for m in data.masks)},
                       None, None, rows, notes, time.perf_counter() - started,
                       reference=f"{reference.name} ({ref_backend} {ref_precision})")


def _artifacts(options: BenchOptions, setup: _Setup, targets: list[Target], reporter: Reporter,
               notes: list[str]) -> ArtifactSet | None:
    wanted = {t.artifact for t in targets if t.artifact is not None}
    if not wanted:
        return None
    key, fields = artifact_key(setup.ckpt, setup.pre, setup.images.calibration)
    folder = Path(options.artifacts) if options.artifacts else default_cache_root() / key
    try:
        return ensure_artifacts(setup.ckpt_path, folder, key, fields, wanted, setup.images, options.image_size,
                                reporter)
    except Exception as e:  # noqa: BLE001 - the torch rows still run; the others say why they cannot
        notes.append(f"export failed, rows that need an exported artifact are marked failed: {_one_line(e)}")
        return ArtifactSet(folder, key, {}, {w: f"export failed: {_one_line(e)}" for w in wanted}, [], [], None)


def _contention_notes(rows: Sequence[BenchRow]) -> list[str]:
    busy = [(r, r.details.get("other_processes_cpu_pct")) for r in rows if r.ok]
    busy = [(r, pct) for r, pct in busy if pct is not None and pct > BUSY_PCT]
    if not busy:
        return []
    worst = max(pct for _, pct in busy)
    names = ", ".join(f"{r.label} b{r.batch_size} ({pct:.0f}%)" for r, pct in busy)
    return [f"other processes used up to {worst:.0f}% of the CPU while these rows were timed: {names}; their "
            "speed is not comparable with an idle machine's (rerun when the machine is idle)"]


def _standard_notes(settings: Settings) -> list[str]:
    return [
        f"accuracy is measured once per artifact (batch {ACCURACY_BATCH}) against the torch fp32 reference and "
        "repeated in each batch-size row; dice_drop = 1 - Dice vs the reference mask",
        f"latency: the runtime's own call (session.run, OpenVINO infer request, torch forward) on pre-made arrays, "
        f"{settings.warmup_s:g} s warm-up then {settings.duration_s:g} s, interleaved with Engine.infer; "
        "overhead_pct = Engine.infer p50 over the runtime's p50, minus one",
        "throughput: OpenVINO with the THROUGHPUT hint and an AsyncInferQueue; the others batch / mean latency; "
        "end_to_end_ips: resunetpp infer's pipeline (decode, preprocess, infer, restore, write PNG) on the "
        "evaluation images, end_to_end_ratio = end_to_end_ips / model-only rate",
    ]


def _settings_record(options: BenchOptions, settings: Settings, setup: _Setup) -> dict:
    return {"model": str(setup.ckpt_path), "default_model": setup.default_model,
            "checkpoint_sha256": setup.ckpt.sha256, "image_size": list(setup.pre.size),
            "backends": list(options.backends or backends()), "precisions": list(options.precisions or precisions()),
            "batch_sizes": list(settings.batch_sizes), "warmup_s": settings.warmup_s,
            "duration_s": settings.duration_s, "threads": settings.threads, "device": options.device,
            "accuracy_batch": ACCURACY_BATCH, "min_iterations": MIN_ITERATIONS}


def _evaluation_record(setup: _Setup, data: EvalData) -> dict:
    ev = setup.images.evaluation
    return {**ev.record(), "with_masks": all(m is not None for m in data.masks)}


__all__ = ["ARTIFACT_OF", "BACKENDS", "MATRIX", "PRECISIONS", "REFERENCE", "BenchOptions", "BenchResult", "BenchRow",
           "EvalData", "NonFiniteResult", "Settings", "Target", "artifact_of", "backends", "bench_engine",
           "end_to_end_rate", "gate_failures", "matrix", "measure_accuracy", "measure_latency", "openvino_throughput",
           "is_checkpoint", "plan_images", "plan_targets", "precisions", "run_bench", "run_bench_files"]
