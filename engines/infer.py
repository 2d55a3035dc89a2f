"""``resunetpp infer``: segment the items of a source (image files, folders, globs) with any engine.

Pipeline (one process, three stages overlapping)::

    reader threads  : decode + preprocess  --(bounded window)-->  main thread: batch + engine
    writer threads  : restore to the original size, threshold, encode PNG / .npy (atomic)

Decoding and PNG encoding release the GIL (PIL, numpy), so with a few threads the end-to-end
rate approaches the model-only rate. Consecutive images of equal network input size are
batched. Per item of the source (:mod:`resunetpp.sources`; an image file's key is its stem) the
outputs are ``<key>_mask.png`` at the original resolution (binary: 0/255; several classes: class
indices in a palette PNG), optionally ``<key>_overlay.png`` (translucent fill and contour over the
image) and ``<key>_probs.npy`` (``K, H, W``); see :mod:`resunetpp.outputs`. An image that cannot
be read, or whose prediction is not finite, is reported in one line and skipped; the others are
written.

``tta``: the mean of the original, horizontally flipped and vertically flipped predictions
(the test-time augmentation of the ResUNet++ authors' follow-up work), in one engine call.

The output folder: created with a one-line error when it cannot be (a file, a dangling symbolic
link, a path under a file, a read-only place), locked for the run (``OUT/.infer.lock``,
:mod:`resunetpp.locking`: a second infer into it waits, so every file comes from one run), and
swept of the temporaries a killed run left there (:func:`resunetpp.atomic.clean_stale_temporaries`).
No output is written over a file that is an input of the run (same file, through any path or
symbolic link): such a run is refused, naming the file, before that item's outputs are written.

Memory is bounded by design, whatever the images' size (each at most the ``RESUNETPP_MAX_PIXELS``
limit of :mod:`resunetpp.imageio`, 100 Mpx by default):

* a batch holds at most :data:`MAX_BATCH_PIXELS` network-input pixels (a batch is flushed early
  rather than exceed it); ``pad`` mode runs images of at most 4096 a side
  (:data:`~resunetpp.model.MAX_INPUT_SIZE`);
* an image is kept decoded for its overlay only up to :data:`KEEP_DECODED_PIXELS`; a larger one
  is decoded again by the writer, so waiting items hold only their network input;
* the overlay is blended in bands of rows (:func:`resunetpp.outputs.overlay_image`).

Budget: with ``P`` the largest image's pixels and ``T`` the threads (``--threads``, 2 by
default), about ``T x 27P`` bytes whatever the batch size and the number of images (per reader
thread ~7 bytes a pixel: PIL's decoded image and its array; per writer thread ~20: the restored
probabilities, 4 a pixel a class, the mask and its PNG, the image decoded again, the overlay and
PIL's copy of it), plus the engine and ``(2 x batch + 2T)`` network inputs in flight (12 bytes a
network-input pixel). Measured: eight 10000x10000 PNGs (100 Mpx, the default limit) with
``--overlay --batch-size 4`` peak at 5.3 GB RSS (12.3 GB before issue 20); Kvasir-SEG-sized
images (at most 2 Mpx) need about 0.1 GB besides the engine.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp import engines
from resunetpp.atomic import clean_stale_temporaries, make_output_folder
from resunetpp.engines.base import Engine, NonFiniteOutputError
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.imageio import write_png_atomic
from resunetpp.locking import INFER_LOCK_NAME, OutLock
from resunetpp.model_config import MAX_INPUT_SIZE
from resunetpp.outputs import mask_image, overlay_image, save_npy_atomic
from resunetpp.preprocess import Preprocessing, probs_to_mask
from resunetpp.sources import Item, Source, open_source
from resunetpp.sources.video import VideoFiles

PROBS_DTYPES = ("float16", "float32")
#: Network-input pixels one batch may hold (one 4096x4096 input, or 256 of 256x256); a batch that
#: would exceed it is run first.
MAX_BATCH_PIXELS = MAX_INPUT_SIZE * MAX_INPUT_SIZE
#: Images up to this many pixels stay decoded for their overlay; larger ones are decoded again.
KEEP_DECODED_PIXELS = 4_000_000
#: The files each item writes into ``--out``: ``<key><suffix>``.
OUTPUT_SUFFIXES = {"mask": "_mask.png", "overlay": "_overlay.png", "probs": "_probs.npy"}


# ---- the pipeline -------------------------------------------------------------------------------------
@dataclass
class InferOptions:
    """What ``resunetpp infer`` writes and how it batches; see the module docstring."""

    out: Path
    batch_size: int = 1
    overlay: bool = False
    save_probs: bool = False
    probs_dtype: str = "float16"
    tta: bool = False
    save_masks: bool = False  # videos: also <stem>_masks/NNNNNN.png (images always get <stem>_mask.png)
    threshold: float = 0.5
    threads: int = 2  # reader threads, and as many writer threads
    input_warnings: bool = True  # warn once for a grayscale or tiny image (resunetpp.input_checks)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ResUNetError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ResUNetError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.threads < 1:
            raise ResUNetError(f"--threads must be at least 1, got {self.threads}")
        if self.probs_dtype not in PROBS_DTYPES:
            raise ResUNetError(f"--probs-dtype must be one of {', '.join(PROBS_DTYPES)}, got {self.probs_dtype!r}")
        if self.out.exists() and not self.out.is_dir():
            raise InputFileError(self.out, "--out exists and is not a folder")


@dataclass
class InferFailure:
    origin: Any  # the item's origin (an image file's path)
    message: str


@dataclass
class InferResult:
    """Counts and rates of one run; ``model_seconds`` is the time spent inside the engine."""

    images: int
    written: int
    failures: list[InferFailure] = field(default_factory=list)
    inferred: int = 0  # images that went through the engine
    model_seconds: float = 0.0
    total_seconds: float = 0.0
    engine: dict = field(default_factory=dict)

    @property
    def model_images_per_second(self) -> float:
        return self.inferred / self.model_seconds if self.model_seconds > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return self.written / self.total_seconds if self.total_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"images": self.images, "written": self.written, "failed": len(self.failures),
                "model_images_per_second": round(self.model_images_per_second, 3),
                "end_to_end_images_per_second": round(self.images_per_second, 3),
                "failures": [{"image": str(f.origin), "error": f.message} for f in self.failures],
                "engine": self.engine}


@dataclass
class _Loaded:
    item: Item
    x: np.ndarray  # (C, h, w) float32, preprocessed
    size: tuple[int, int]  # original (H, W)
    image: np.ndarray | None  # kept for the overlay only, up to KEEP_DECODED_PIXELS


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()  # follows symbolic links: the file that would be written over
    except OSError:
        return None
    return st.st_dev, st.st_ino


class InputGuard:
    """Refuses outputs that would be written over an input file of the run.

    Inputs are identified by device and inode, so the same file reached through another path,
    a symbolic link or a hard link counts; an output that does not exist yet cannot be an input.
    """

    def __init__(self, inputs: Iterable[str | Path]) -> None:
        self.ids = {i for i in (_file_id(Path(p)) for p in inputs) if i is not None}

    def add(self, path: str | Path) -> None:
        file_id = _file_id(Path(path))
        if file_id is not None:
            self.ids.add(file_id)

    def check(self, output: Path, option: str = "--out") -> None:
        if self.ids and _file_id(output) in self.ids:
            raise InputFileError(output, f"is an input of this run; writing there would overwrite it "
                                         f"(choose another {option})")


def tta_predict(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """Mean of the predictions on ``x``, its horizontal and its vertical flip (one call of 3N)."""
    n = x.shape[0]
    probs = predict(np.concatenate([x, x[..., ::-1], x[..., ::-1, :]]))
    return (probs[:n] + probs[n:2 * n, ..., ::-1] + probs[2 * n:, ..., ::-1, :]) * np.float32(1.0 / 3.0)


def prefetch(items: Iterable[Any], load: Callable[[Any], object], pool: ThreadPoolExecutor,
             depth: int) -> Iterator[tuple[Any, object | ResUNetError]]:
    """``(item, load(item))`` in input order, at most ``depth`` items loaded or loading and not
    yet consumed (a bounded queue; ``items`` is consumed as it goes, so it may be a stream); a
    :class:`ResUNetError` raised by ``load`` is yielded in place of the result."""
    window: deque[tuple[Any, Future]] = deque()
    it = iter(items)
    end = object()
    try:
        for item in it:
            window.append((item, pool.submit(load, item)))
            if len(window) >= depth:
                break
        while window:
            item, fut = window.popleft()
            try:
                got = fut.result()
            except ResUNetError as e:
                got = e
            yield item, got  # while the consumer holds this one, depth - 1 more are loading
            nxt = next(it, end)
            if nxt is not end:
                window.append((nxt, pool.submit(load, nxt)))
    finally:
        for _, fut in window:
            fut.cancel()


class _Run:
    """State of one :func:`run_inference` call (kept small: the stages are its methods)."""

    def __init__(self, engine: Engine, options: InferOptions, progress: Callable[[int], None] | None,
                 on_error: Callable[[str], None] | None, on_warning: Callable[[str], None] | None = None) -> None:
        from resunetpp.input_checks import InputWarner

        self.engine = engine
        self.opt = options
        self.pre: Preprocessing = engine.preprocessing
        self.num_classes: int = engine.num_classes
        self.progress = progress or (lambda n: None)
        self.on_error = on_error or (lambda msg: None)
        self.failures: list[InferFailure] = []
        self.images = 0
        self.written = 0
        self.inferred = 0
        self.model_seconds = 0.0
        self.writes: deque[tuple[_Loaded, Future]] = deque()
        self.input_warner = InputWarner(on_warning or (lambda line: None), engine.preprocessing.channels,
                                        enabled=options.input_warnings and on_warning is not None,
                                        silence_hint="; --no-input-warnings silences it")

    def fail(self, origin: Any, message: str) -> None:
        self.failures.append(InferFailure(origin, message))
        self.on_error(message)
        self.progress(1)

    def outputs(self, key: str) -> list[Path]:
        """The files an item of this key writes."""
        kinds = ["mask"] + (["overlay"] if self.opt.overlay else []) + (["probs"] if self.opt.save_probs else [])
        return [self.opt.out / f"{key}{OUTPUT_SUFFIXES[k]}" for k in kinds]

    def items(self, source: Source) -> Iterator[Item]:
        """The source's items, counted; a key seen twice would overwrite outputs, so it raises, and
        so does an item whose outputs would be written over an input file (:class:`InputGuard`)."""
        keys: set[str] = set()
        guard = InputGuard(source.files())
        for item in source:
            if item.key in keys:
                raise ValueError(f"{item.origin}: the {type(source).__name__} source yields the key "
                                 f"{item.key!r} twice; outputs would overwrite each other")
            keys.add(item.key)
            if isinstance(item.origin, (str, Path)):
                guard.add(item.origin)
            for path in self.outputs(item.key):
                guard.check(path)
            self.images += 1
            yield item

    def load(self, item: Item) -> _Loaded:
        image = item.load(self.pre.channels)
        self.input_warner.check(item.origin, image)
        try:
            x = self.pre.apply(image)
        except ValueError as e:
            raise InputFileError(item.origin, f"cannot preprocess ({e})") from None
        keep = self.opt.overlay and image.shape[0] * image.shape[1] <= KEEP_DECODED_PIXELS
        return _Loaded(item, x, image.shape[:2], image if keep else None)

    def predict(self, batch: list[_Loaded]) -> np.ndarray | None:
        x = np.stack([it.x for it in batch])
        start = time.perf_counter()
        try:
            probs = tta_predict(self.engine.predict, x) if self.opt.tta else self.engine.predict(x)
        except NonFiniteOutputError as e:
            for it in batch:
                self.fail(it.item.origin, f"{it.item.origin}: prediction is not finite ({e})")
            return None
        finally:
            self.model_seconds += time.perf_counter() - start
            self.inferred += len(batch)
        return probs

    def write(self, loaded: _Loaded, probs: np.ndarray) -> None:
        h, w = loaded.size
        full = self.pre.restore(probs, h, w)
        mask = probs_to_mask(full, self.opt.threshold)
        out, key = self.opt.out, loaded.item.key
        if self.opt.save_probs:
            save_npy_atomic(out / f"{key}_probs.npy", full.astype(self.opt.probs_dtype))
        del full  # 4 bytes a pixel a class: gone before the overlay decodes the image again
        if self.opt.overlay:
            image = loaded.image if loaded.image is not None else loaded.item.load(self.pre.channels)
            write_png_atomic(out / f"{key}_overlay.png", overlay_image(image, mask, self.num_classes))
            del image
        write_png_atomic(out / f"{key}_mask.png", mask_image(mask, self.num_classes))

    def drain(self, keep: int) -> None:
        """Wait for finished writes until at most ``keep`` are pending."""
        while len(self.writes) > keep:
            loaded, fut = self.writes.popleft()
            try:
                fut.result()
            except OSError as e:
                origin = loaded.item.origin
                self.fail(origin, f"{origin}: cannot write its outputs to {self.opt.out} ({e.strerror or e})")
                continue
            except ResUNetError as e:  # the image could not be decoded again for its overlay
                self.fail(loaded.item.origin, str(e))
                continue
            self.written += 1
            self.progress(1)

    def flush(self, batch: list[_Loaded], writer: ThreadPoolExecutor) -> None:
        probs = self.predict(batch)
        if probs is not None:
            for it, pr in zip(batch, probs):
                self.writes.append((it, writer.submit(self.write, it, pr)))
        batch.clear()
        self.drain(keep=2 * self.opt.threads + self.opt.batch_size)

    def run(self, source: Source) -> None:
        depth = max(2 * self.opt.batch_size, 2 * self.opt.threads)
        batch: list[_Loaded] = []
        with ThreadPoolExecutor(self.opt.threads, thread_name_prefix="infer-read") as reader, \
                ThreadPoolExecutor(self.opt.threads, thread_name_prefix="infer-write") as writer:
            try:
                for item, got in prefetch(self.items(source), self.load, reader, depth):
                    if isinstance(got, ResUNetError):
                        self.fail(item.origin, str(got))
                        continue
                    assert isinstance(got, _Loaded)
                    if batch and (len(batch) >= self.opt.batch_size or batch[0].x.shape != got.x.shape
                                  or (len(batch) + 1) * got.x[0].size > MAX_BATCH_PIXELS):
                        self.flush(batch, writer)
                    batch.append(got)
                if batch:
                    self.flush(batch, writer)
                self.drain(keep=0)
            except BaseException:
                reader.shutdown(wait=True, cancel_futures=True)
                writer.shutdown(wait=True, cancel_futures=True)
                raise


def run_inference(engine: Engine, source: Source, options: InferOptions, *,
                  progress: Callable[[int], None] | None = None,
                  on_error: Callable[[str], None] | None = None,
                  on_wait: Callable[[str], None] | None = None, lock: bool = True,
                  on_warning: Callable[[str], None] | None = None) -> InferResult:
    """Segment the items of ``source`` with a loaded ``engine``, writing ``<key>_mask.png`` etc.

    ``source`` is a :class:`~resunetpp.sources.Source`: :func:`~resunetpp.sources.open_source`
    over command-line inputs, or e.g. ``ImageFiles(paths)`` (:mod:`resunetpp.sources.images`) for
    these exact files, repeats kept. The caller closes it. ``progress(n)`` is called as images
    finish (written or failed); ``on_error(line)`` once per failed image with a one-line message
    naming it; ``on_wait(line)`` once if another infer holds ``--out`` (this one waits for it);
    ``on_warning(line)`` once for the first grayscale or tiny image (``options.input_warnings``).
    Engine problems other than a non-finite prediction (a wrong input size for a static engine,
    a runtime error) raise, and so does an output that would be written over an input file.
    ``lock=False``: the caller already holds ``--out`` (:func:`claim_output_folder`), as the Ray
    driver does for its workers (each worker runs this over its chunk).
    """
    if not isinstance(source, Source):
        raise TypeError(f"run_inference takes a resunetpp.sources.Source (e.g. ImageFiles(paths)), "
                        f"not {type(source).__name__}")
    options.validate()
    if isinstance(source, VideoFiles):
        return _run_videos(engine, source, options, progress, on_error, on_wait, lock, on_warning)
    with claim_output_folder(options.out, on_wait) if lock else contextlib.nullcontext():
        make_output_folder(options.out)
        start = time.perf_counter()
        run = _Run(engine, options, progress, on_error, on_warning)
        run.run(source)
        return InferResult(run.images, run.written, run.failures, run.inferred, run.model_seconds,
                           time.perf_counter() - start, engine.describe())


@dataclass
class VideoInferResult(InferResult):
    """:class:`InferResult` of a run over videos: ``images`` counts the frames decoded, ``written``
    those encoded into the overlays; ``videos`` one entry per video (its outputs, frames, error)."""

    videos: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "videos": self.videos}


def _run_videos(engine: Engine, source: "VideoFiles", options: InferOptions, progress, on_error, on_wait, lock,
                on_warning) -> VideoInferResult:
    """Video files: :class:`~resunetpp.engines.video_infer.VideoRun` under the same lock, sweep and
    input guard as images (see :mod:`resunetpp.engines.video_infer` for the outputs)."""
    from resunetpp.engines.video_infer import VideoRun

    def predict(x: np.ndarray) -> np.ndarray:
        return tta_predict(engine.predict, x) if options.tta else engine.predict(x)

    run = VideoRun(engine, options, predict, progress, on_error, on_warning)
    run.check_options()
    guard = InputGuard(source.files())
    for key in source.keys:
        for path in run.outputs(key):
            guard.check(path)
    with claim_output_folder(options.out, on_wait) if lock else contextlib.nullcontext():
        make_output_folder(options.out)
        start = time.perf_counter()
        run.run(source)
        videos = [{"source": str(v.source), "frames": v.frames, "fps": round(v.fps, 3),
                   "overlay": str(v.overlay) if v.overlay else None,
                   "frames_json": str(v.frames_json) if v.frames_json else None, "error": v.error}
                  for v in run.videos]
        return VideoInferResult(run.images, run.written, [InferFailure(o, m) for o, m in run.failures],
                                run.inferred, run.model_seconds, time.perf_counter() - start, engine.describe(),
                                videos=videos)


@contextlib.contextmanager
def claim_output_folder(out: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """``--out`` made (one-line errors), held against other infers (``OUT/.infer.lock``; a second run
    waits) and swept of the temporaries a killed run left there, for the duration of the block."""
    make_output_folder(out)
    with OutLock(out, INFER_LOCK_NAME, what="infer", on_wait=on_wait):
        clean_stale_temporaries(out)
        yield


def infer_path(model: str | Path, inputs: Sequence[str | Path], options: InferOptions, *,
               backend: str = "auto", device: str = "cpu", engine_options: dict | None = None,
               progress_factory: Callable[[int | None], tuple[Callable[[int], None], Callable[[], None]]]
               | None = None,
               on_error: Callable[[str], None] | None = None,
               on_wait: Callable[[str], None] | None = None,
               other_outputs: Sequence[str | Path] = (),
               on_warning: Callable[[str], None] | None = None) -> InferResult:
    """Open ``inputs`` with :func:`~resunetpp.sources.open_source`, ``model`` with
    :func:`engines.open`, and run :func:`run_inference`.

    ``progress_factory(total)`` returns ``(advance, finish)`` callbacks (e.g. a rich progress bar);
    ``total`` is ``None`` for a source of unknown length (a stream). ``other_outputs`` (the CLI's
    ``--json``) are refused up front when they are input files, like the masks.
    """
    options.validate()
    with open_source(inputs) as source:
        if source.count == 0:
            raise ResUNetError("no images found in the given inputs (" + ", ".join(str(i) for i in inputs) + ")")
        guard = InputGuard(source.files())
        for path in other_outputs:
            guard.check(Path(path), "path")
        with engines.open(model, backend=backend, device=device, **(engine_options or {})) as engine:
            advance, finish = progress_factory(source.count) if progress_factory else (None, lambda: None)
            try:
                return run_inference(engine, source, options, progress=advance, on_error=on_error, on_wait=on_wait,
                                     on_warning=on_warning)
            finally:
                finish()


def summary_table(result: InferResult, title: str = "inference"):
    """A rich table: images, written, failed, model-only and end-to-end images/s."""
    from rich.table import Table

    from resunetpp.engines.base import engine_line

    table = Table(title=f"{title}: {engine_line(result.engine)}",
                  title_justify="left")
    video = isinstance(result, VideoInferResult)
    names = ("videos", "frames", "written", "failed", "model-only fps", "end-to-end fps") if video else \
        ("images", "written", "failed", "model-only img/s", "end-to-end img/s")
    for name in names:
        table.add_column(name, justify="right")
    cells = [str(result.images), str(result.written), str(len(result.failures)),
             f"{result.model_images_per_second:.1f}", f"{result.images_per_second:.1f}"]
    table.add_row(*([str(len(result.videos))] if video else []), *cells)
    return table
