"""``resunetpp infer``: segment image files, folders or globs with any engine, writing masks.

Pipeline (one process, three stages overlapping)::

    reader threads  : decode + preprocess  --(bounded window)-->  main thread: batch + engine
    writer threads  : restore to the original size, threshold, encode PNG / .npy (atomic)

Decoding and PNG encoding release the GIL (PIL, numpy), so with a few threads the end-to-end
rate approaches the model-only rate. Consecutive images of equal network input size are
batched. Per image the outputs are ``<stem>_mask.png`` at the original resolution (binary:
0/255; several classes: class indices in a palette PNG), optionally ``<stem>_overlay.png``
(translucent fill and contour over the image) and ``<stem>_probs.npy`` (``K, H, W``). An image
that cannot be read, or whose prediction is not finite, is reported in one line and skipped;
the others are written.

``tta``: the mean of the original, horizontally flipped and vertically flipped predictions
(the test-time augmentation of the ResUNet++ authors' follow-up work), in one engine call.
"""

from __future__ import annotations

import functools
import glob
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from resunetpp.atomic import atomic_path
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.imageio import IMAGE_SUFFIXES, read_image, write_png_atomic
from resunetpp.preprocess import Preprocessing, probs_to_mask

PROBS_DTYPES = ("float16", "float32")
GLOB_CHARS = "*?["


# ---- inputs -----------------------------------------------------------------------------------------
def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files, folders (their images, not recursive) and globs (``**`` recurses), in order.

    Explicit files are kept whatever their suffix (an unreadable one is reported when read);
    duplicates are dropped. A path that does not exist or a glob that matches nothing raises
    :class:`InputFileError`.
    """
    seen: set[Path] = set()
    result: list[Path] = []

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            result.append(p)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            for p in _folder_images(path):
                add(p)
        elif path.is_file():
            add(path)
        elif any(c in text for c in GLOB_CHARS):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise InputFileError(text, "the pattern matches no image file")
            for p in files:
                add(p)
        else:
            raise InputFileError(path, "no such file or folder")
    return result


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A unique output stem per input: its stem, with ``-2``, ``-3`` ... for repeated stems."""
    used: set[str] = set()
    stems = []
    for p in paths:
        stem, k = p.stem, 1
        while stem in used:
            k += 1
            stem = f"{p.stem}-{k}"
        used.add(stem)
        stems.append(stem)
    return stems


# ---- outputs -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def palette(num_classes: int) -> np.ndarray:
    """``(max(K, 2), 3)`` uint8 colours: class 0 black; one class green; several: tab10 / tab20."""
    from matplotlib import colormaps

    if num_classes <= 2:
        colors = [(0.0, 0.0, 0.0), colormaps["tab10"](2)[:3]]
    else:
        cmap = colormaps["tab10" if num_classes <= 11 else "tab20"]
        colors = [(0.0, 0.0, 0.0)] + [cmap(i % cmap.N)[:3] for i in range(num_classes - 1)]
    return (np.asarray(colors) * 255 + 0.5).astype(np.uint8)


def mask_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """Binary: ``L`` image 0/255. Several classes: ``P`` image of class indices with a palette."""
    if num_classes == 1:
        return Image.fromarray((mask > 0).astype(np.uint8) * 255, "L")
    img = Image.fromarray(mask.astype(np.uint8), "P")
    img.putpalette(palette(num_classes).reshape(-1).tolist())
    return img


def overlay_image(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.4) -> Image.Image:
    """``image`` (H, W, C uint8) with each class region filled translucently and outlined."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    colors = palette(num_classes).astype(np.float32)
    out = rgb.astype(np.float32)
    inside = mask > 0
    out[inside] = out[inside] * (1.0 - alpha) + colors[mask[inside]] * alpha
    width = 3 if min(mask.shape) < 512 else 5
    m = Image.fromarray(mask.astype(np.uint8), "L")
    hi = np.asarray(m.filter(ImageFilter.MaxFilter(width)))
    lo = np.asarray(m.filter(ImageFilter.MinFilter(width)))
    edge = (hi != lo) & (hi > 0)
    out[edge] = colors[hi[edge]]
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


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
    threshold: float = 0.5
    threads: int = 2  # reader threads, and as many writer threads

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
    path: Path
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
                "failures": [{"image": str(f.path), "error": f.message} for f in self.failures],
                "engine": self.engine}


@dataclass
class _Item:
    path: Path
    stem: str
    x: np.ndarray  # (C, h, w) float32, preprocessed
    size: tuple[int, int]  # original (H, W)
    image: np.ndarray | None  # kept for the overlay only


def tta_predict(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """Mean of the predictions on ``x``, its horizontal and its vertical flip (one call of 3N)."""
    n = x.shape[0]
    probs = predict(np.concatenate([x, x[..., ::-1], x[..., ::-1, :]]))
    return (probs[:n] + probs[n:2 * n, ..., ::-1] + probs[2 * n:, ..., ::-1, :]) * np.float32(1.0 / 3.0)


def prefetch(paths: Sequence[Path], load: Callable[[Path], object], pool: ThreadPoolExecutor,
             depth: int) -> Iterator[tuple[Path, object | ResUNetError]]:
    """``(path, load(path))`` in input order, at most ``depth`` items loaded or loading and not
    yet consumed (a bounded queue); a :class:`ResUNetError` raised by ``load`` is yielded in place
    of the result."""
    window: deque[tuple[Path, Future]] = deque()
    it = iter(paths)
    try:
        for p in it:
            window.append((p, pool.submit(load, p)))
            if len(window) >= depth:
                break
        while window:
            p, fut = window.popleft()
            try:
                got = fut.result()
            except ResUNetError as e:
                got = e
            yield p, got  # while the consumer holds this one, depth - 1 more are loading
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, pool.submit(load, nxt)))
    finally:
        for _, fut in window:
            fut.cancel()


class _Run:
    """State of one :func:`run_inference` call (kept small: the stages are its methods)."""

    def __init__(self, engine, options: InferOptions, progress: Callable[[int], None] | None,
                 on_error: Callable[[str], None] | None) -> None:
        self.engine = engine
        self.opt = options
        self.pre: Preprocessing = engine.preprocessing
        self.num_classes: int = engine.num_classes
        self.progress = progress or (lambda n: None)
        self.on_error = on_error or (lambda msg: None)
        self.failures: list[InferFailure] = []
        self.written = 0
        self.inferred = 0
        self.model_seconds = 0.0
        self.writes: deque[tuple[_Item, Future]] = deque()

    def fail(self, path: Path, message: str) -> None:
        self.failures.append(InferFailure(path, message))
        self.on_error(message)
        self.progress(1)

    def load(self, item: tuple[Path, str]) -> _Item:
        path, stem = item
        image = read_image(path, channels=self.pre.channels)
        try:
            x = self.pre.apply(image)
        except ValueError as e:
            raise InputFileError(path, f"cannot preprocess ({e})") from None
        return _Item(path, stem, x, image.shape[:2], image if self.opt.overlay else None)

    def predict(self, batch: list[_Item]) -> np.ndarray | None:
        from resunetpp.engines.base import NonFiniteOutputError

        x = np.stack([it.x for it in batch])
        start = time.perf_counter()
        try:
            probs = tta_predict(self.engine.predict, x) if self.opt.tta else self.engine.predict(x)
        except NonFiniteOutputError as e:
            for it in batch:
                self.fail(it.path, f"{it.path}: prediction is not finite ({e})")
            return None
        finally:
            self.model_seconds += time.perf_counter() - start
            self.inferred += len(batch)
        return probs

    def write(self, item: _Item, probs: np.ndarray) -> None:
        h, w = item.size
        full = self.pre.restore(probs, h, w)
        mask = probs_to_mask(full, self.opt.threshold)
        out = self.opt.out
        if self.opt.save_probs:
            save_npy_atomic(out / f"{item.stem}_probs.npy", full.astype(self.opt.probs_dtype))
        if self.opt.overlay and item.image is not None:
            write_png_atomic(out / f"{item.stem}_overlay.png", overlay_image(item.image, mask, self.num_classes))
        write_png_atomic(out / f"{item.stem}_mask.png", mask_image(mask, self.num_classes))

    def drain(self, keep: int) -> None:
        """Wait for finished writes until at most ``keep`` are pending."""
        while len(self.writes) > keep:
            item, fut = self.writes.popleft()
            try:
                fut.result()
            except OSError as e:
                self.fail(item.path, f"{item.path}: cannot write its outputs to {self.opt.out} ({e.strerror or e})")
                continue
            self.written += 1
            self.progress(1)

    def flush(self, batch: list[_Item], writer: ThreadPoolExecutor) -> None:
        probs = self.predict(batch)
        if probs is not None:
            for it, pr in zip(batch, probs):
                self.writes.append((it, writer.submit(self.write, it, pr)))
        batch.clear()
        self.drain(keep=2 * self.opt.threads + self.opt.batch_size)

    def run(self, paths: Sequence[Path]) -> None:
        depth = max(2 * self.opt.batch_size, 2 * self.opt.threads)
        items = list(zip(paths, output_stems(paths)))
        batch: list[_Item] = []
        with ThreadPoolExecutor(self.opt.threads, thread_name_prefix="infer-read") as reader, \
                ThreadPoolExecutor(self.opt.threads, thread_name_prefix="infer-write") as writer:
            try:
                for (path, _stem), got in prefetch(items, self.load, reader, depth):  # type: ignore[arg-type]
                    if isinstance(got, ResUNetError):
                        self.fail(path, str(got))
                        continue
                    if batch and (len(batch) >= self.opt.batch_size or batch[0].x.shape != got.x.shape):
                        self.flush(batch, writer)
                    batch.append(got)
                if batch:
                    self.flush(batch, writer)
                self.drain(keep=0)
            except BaseException:
                reader.shutdown(wait=True, cancel_futures=True)
                writer.shutdown(wait=True, cancel_futures=True)
                raise


def run_inference(engine, inputs: Sequence[Path], options: InferOptions, *,
                  progress: Callable[[int], None] | None = None,
                  on_error: Callable[[str], None] | None = None) -> InferResult:
    """Segment ``inputs`` (already expanded: see :func:`expand_inputs`) with a loaded ``engine``.

    ``progress(n)`` is called as images finish (written or failed); ``on_error(line)`` once per
    failed image with a one-line message naming it. Engine problems other than a non-finite
    prediction (a wrong input size for a static engine, a runtime error) raise.
    """
    options.validate()
    options.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = _Run(engine, options, progress, on_error)
    run.run(list(inputs))
    return InferResult(len(inputs), run.written, run.failures, run.inferred, run.model_seconds,
                       time.perf_counter() - start, engine.describe())


def infer_path(model: str | Path, inputs: Sequence[str | Path], options: InferOptions, *,
               backend: str = "auto", device: str = "cpu", engine_options: dict | None = None,
               progress_factory: Callable[[int], tuple[Callable[[int], None], Callable[[], None]]] | None = None,
               on_error: Callable[[str], None] | None = None) -> InferResult:
    """Open ``model`` with :func:`engines.open`, expand ``inputs`` and run :func:`run_inference`.

    ``progress_factory(total)`` returns ``(advance, finish)`` callbacks (e.g. a rich progress bar).
    """
    from resunetpp import engines

    options.validate()
    paths = expand_inputs(inputs)
    if not paths:
        raise ResUNetError("no images found in the given inputs (" + ", ".join(str(i) for i in inputs) + ")")
    with engines.open(model, backend=backend, device=device, **(engine_options or {})) as engine:
        advance, finish = progress_factory(len(paths)) if progress_factory else (None, lambda: None)
        try:
            return run_inference(engine, paths, options, progress=advance, on_error=on_error)
        finally:
            finish()


def summary_table(result: InferResult, title: str = "inference"):
    """A rich table: images, written, failed, model-only and end-to-end images/s."""
    from rich.table import Table

    e = result.engine
    table = Table(title=f"{title}: {e.get('backend', '?')} on {e.get('device', '?')} ({e.get('precision', '?')})",
                  title_justify="left")
    for name in ("images", "written", "failed", "model-only img/s", "end-to-end img/s"):
        table.add_column(name, justify="right")
    table.add_row(str(result.images), str(result.written), str(len(result.failures)),
                  f"{result.model_images_per_second:.1f}", f"{result.images_per_second:.1f}")
    return table
