"""Batch inference over a Ray cluster: ``resunetpp infer MODEL INPUT... --out DIR --ray ADDRESS``.

The same inference as the local ``resunetpp infer`` (:mod:`resunetpp.engines.infer`), spread over
the workers of a Ray cluster with `Ray Data <https://docs.ray.io/en/latest/data/data.html>`_:

* the driver lists the source's items (image files: a key and a path each) and leaves out those
  whose outputs already exist and are complete (:func:`is_complete`), so a rerun of a preempted
  job resumes where it stopped;
* Ray Data cuts the rest into chunks (``chunk`` images, one Ray task each) and hands them to a
  fixed pool of ``workers`` actors (``map_batches`` with a callable class and
  ``compute=ActorPoolStrategy(size=workers)``); each actor opens one engine, once, with
  ``threads_per_worker`` CPU threads, and runs the local pipeline over its chunk -- decoding,
  preprocessing, the engine, restoring to the original size, thresholding and writing the PNGs
  (atomically: a temporary name, then a rename) all happen in the worker;
* the driver streams the workers' per-image results back for the progress bar and lists the
  throughput and the failures at the end.

Fault tolerance is Ray Data's: its actor pool restarts a worker that dies (``max_restarts=-1``)
and retries the tasks it held (``max_task_retries=-1``; both Ray Data's defaults for actor pools).
A retried chunk is idempotent here: the worker skips every image whose outputs are already
complete (written by the attempt that died), and a file is only ever under its final name once it
is whole, so nothing is written twice or half. The ``.partial`` temporary files a killed worker
leaves behind are removed when the run ends.

Every node must see MODEL, the inputs and ``--out`` at the same paths (a shared filesystem), and
have ``resunetpp[ray]`` installed (the same version as the driver). ``ray`` is imported only here,
inside functions, so nothing else in the toolkit needs it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resunetpp import engines
from resunetpp.engines import registry
from resunetpp.engines.infer import (OUTPUT_SUFFIXES, InferFailure, InferOptions, InferResult, InputGuard,
                                    claim_output_folder, run_inference)
from resunetpp.errors import ResUNetError
from resunetpp.imageio import read_image
from resunetpp.sources import Item, Source, open_source

__all__ = ["RAY_INSTALL_HINT", "RayBatchResult", "RayOptions", "SegmentWorker", "complete_keys", "expected_outputs",
           "is_complete", "remove_partials", "run_ray_batch"]

RAY_INSTALL_HINT = "pip install 'resunetpp[ray]' (Ray Data)"
#: ``--ray local``: start a Ray on this machine for the run; ``auto``: join the running cluster.
LOCAL = "local"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray run is.

    ``address``: ``"local"`` starts a Ray on this machine for the run (and stops it after);
    ``"auto"`` joins the cluster this node belongs to (or ``RAY_ADDRESS``); ``"ray://HOST:10001"``
    joins a remote cluster through Ray Client (a KubeRay head service, for example); ``HOST:6379``
    joins a cluster's GCS directly. When Ray is already initialised in this process (a notebook,
    a test), that session is used and ``address`` is ignored.
    """

    address: str = LOCAL
    workers: int = 2  # actors, one engine each
    threads_per_worker: int = 1  # CPUs each actor reserves; the engine's compute threads
    chunk: int = 16  # images per Ray task (the unit of retry)
    #: For a local Ray only: the CPUs it offers (``None``: this machine's, or workers x threads if more).
    num_cpus: int | None = None

    def validate(self) -> None:
        if not self.address or not self.address.strip():
            raise ResUNetError("--ray needs an address: 'local', 'auto', 'ray://HOST:10001' or HOST:PORT")
        if self.workers < 1:
            raise ResUNetError(f"--workers must be at least 1, got {self.workers}")
        if self.threads_per_worker < 1:
            raise ResUNetError(f"--threads-per-worker must be at least 1, got {self.threads_per_worker}")
        if self.chunk < 1:
            raise ResUNetError(f"the chunk size must be at least 1, got {self.chunk}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ResUNetError(f"num_cpus must be at least 1, got {self.num_cpus}")


@dataclass
class RayBatchResult(InferResult):
    """:class:`~resunetpp.engines.infer.InferResult` of a Ray run, plus what only it has.

    ``images`` counts every image of the inputs; ``skipped`` those complete before the run;
    ``written`` those written by this run (``retried``: by a retried task, after the first
    attempt's worker died); ``model_seconds`` is the engine time summed over all workers.
    """

    skipped: int = 0
    retried: int = 0
    workers: int = 0  # distinct worker processes that returned results
    address: str = ""
    startup_seconds: float = 0.0  # ray.init (starting or joining the cluster)
    partials_removed: int = 0

    def as_dict(self) -> dict:
        return {**super().as_dict(), "skipped": self.skipped, "retried": self.retried,
                "ray": {"address": self.address, "workers": self.workers,
                        "startup_seconds": round(self.startup_seconds, 3),
                        "total_seconds": round(self.total_seconds, 3),
                        "partials_removed": self.partials_removed}}


# ---- completeness ------------------------------------------------------------------------------------
def expected_outputs(out: Path, key: str, options: InferOptions) -> list[Path]:
    """The files the local ``infer`` writes for ``key`` with these options (mask last)."""
    kinds = (["probs"] if options.save_probs else []) + (["overlay"] if options.overlay else []) + ["mask"]
    return [out / f"{key}{OUTPUT_SUFFIXES[kind]}" for kind in kinds]


def is_complete(out: Path, key: str, options: InferOptions) -> bool:
    """Whether every output of ``key`` exists. A file under its final name is whole: every output
    is written under a temporary name and renamed (:mod:`resunetpp.atomic`)."""
    return all(p.is_file() for p in expected_outputs(out, key, options))


def complete_keys(out: Path, keys: Sequence[str], options: InferOptions) -> set[str]:
    """The ``keys`` whose outputs all exist: :func:`is_complete` for many keys with one listing of
    ``out`` (a stat per file would be slow over 100,000s of images on a network filesystem)."""
    try:
        names = {e.name for e in os.scandir(out) if e.is_file()}
    except FileNotFoundError:
        return set()
    return {k for k in keys if all(p.name in names for p in expected_outputs(out, k, options))}




def remove_partials(out: Path, keys: set[str]) -> int:
    """Remove the temporary files (``.<name>.<random>.partial``) of ``keys``' outputs in ``out``,
    left behind by a worker killed while writing; returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(out))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".partial")):
            continue
        for suffix in OUTPUT_SUFFIXES.values():
            at = name.find(suffix + ".", 1)
            if at > 1 and name[1:at] in keys:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
                break
    return removed


# ---- the worker -----------------------------------------------------------------------------------------
class _KeyedFiles(Source):
    """Image files with the keys the driver gave them (unique over the whole run, not the chunk)."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = list(pairs)

    @property
    def count(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Item]:
        for key, path in self.pairs:
            p = Path(path)
            yield Item(key, p, lambda channels, p=p: read_image(p, channels))


class SegmentWorker:
    """The Ray Data callable class: one engine per actor, opened once, reused for every chunk.

    ``__call__`` takes a chunk (``{"key": [...], "path": [...]}``) and returns one row per image:
    ``status`` is ``written``, ``failed`` (``error`` says why) or ``existing`` (already complete:
    a retried chunk whose first attempt wrote it before its worker died).
    """

    def __init__(self, model: str, backend: str, device: str, engine_options: dict, options: InferOptions,
                 threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the torch backend, and torch ops anywhere in the worker
        engine_options = dict(engine_options)
        threads_option = registry.get(backend).bench.threads_option
        if threads_option and threads_option not in engine_options:
            engine_options[threads_option] = threads
        self.engine = engines.open(model, backend=backend, device=device, **engine_options).load()
        self.options = options
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        keys = [str(k) for k in batch["key"]]
        paths = [str(p) for p in batch["path"]]
        out = self.options.out
        todo = [(k, p) for k, p in zip(keys, paths) if not is_complete(out, k, self.options)]
        failed: dict[str, str] = {}
        share = 0.0
        if todo:
            result = run_inference(self.engine, _KeyedFiles(todo), self.options, lock=False)  # the driver holds --out
            failed = {str(f.origin): f.message for f in result.failures}
            share = result.model_seconds / len(todo)
        pending = {k for k, _ in todo}
        rows: dict[str, list] = {"key": [], "path": [], "status": [], "error": [], "worker": [],
                                 "model_seconds": []}
        for k, p in zip(keys, paths):
            status = ("failed" if p in failed else "written") if k in pending else "existing"
            rows["key"].append(k)
            rows["path"].append(p)
            rows["status"].append(status)
            rows["error"].append(failed.get(p, "") if k in pending else "")
            rows["worker"].append(self.worker)
            rows["model_seconds"].append(share if k in pending else 0.0)
        return rows

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.close()


# ---- the driver -----------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ResUNetError(f"--ray needs Ray Data, which is not installed here ({e}); {RAY_INSTALL_HINT}") from None
    return ray


def _files(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(key, path)`` of every item of the inputs' source; only sources of files can be spread."""
    pairs: list[tuple[str, str]] = []
    keys: set[str] = set()
    with open_source(inputs) as source:
        for item in source:
            if not isinstance(item.origin, (str, os.PathLike)):
                raise ResUNetError(f"--ray segments image files; the {type(source).__name__} source yields "
                                   f"{type(item.origin).__name__} items ({item.origin})")
            if item.key in keys:
                raise ResUNetError(f"{item.origin}: the {type(source).__name__} source yields the key "
                                   f"{item.key!r} twice; outputs would overwrite each other")
            keys.add(item.key)
            pairs.append((item.key, str(item.origin)))
    if not pairs:
        raise ResUNetError("no images found in the given inputs (" + ", ".join(str(i) for i in inputs) + ")")
    return pairs


@contextlib.contextmanager
def _ray_session(ray, ray_options: RayOptions) -> Iterator[str]:
    """Initialise Ray (unless this process already has), yield the address, shut down what it started."""
    if ray.is_initialized():
        yield "(this process's Ray session)"
        return
    address = ray_options.address.strip()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address == LOCAL:
        need = ray_options.workers * ray_options.threads_per_worker
        kwargs.update(address="local", include_dashboard=False,
                      num_cpus=ray_options.num_cpus or max(os.cpu_count() or 1, need))
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ResUNetError(f"--ray {address}: cannot start or join a Ray cluster ({e})") from None
    try:
        yield address
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_ray_data(ray) -> Iterator[None]:
    """Ray Data's own progress bars and INFO lines off: the caller reports progress (restored after)."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    loggers = [logging.getLogger(n) for n in ("ray.data", "ray.data._internal.progress")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars = before
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _user_error(exc: BaseException) -> ResUNetError | None:
    """The :class:`ResUNetError` a worker raised, found in the chain of Ray's wrappers, if any.

    Ray re-raises a task's exception as a class deriving from both its own error and the original
    one; the original (its ``cause``, without the remote traceback) is preferred."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    found: ResUNetError | None = None
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ResUNetError):
            if not isinstance(e, RayError):
                return e
            found = found or e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return found


def run_ray_batch(model: str | Path, inputs: Sequence[str | Path], options: InferOptions,
                  ray_options: RayOptions = RayOptions(), *, backend: str = "auto", device: str = "cpu",
                  engine_options: dict | None = None,
                  progress_factory: Callable[[int | None], tuple[Callable[[int], None], Callable[[], None]]]
                  | None = None,
                  on_error: Callable[[str], None] | None = None,
                  on_row: Callable[[dict], None] | None = None,
                  on_wait: Callable[[str], None] | None = None) -> RayBatchResult:
    """Segment ``inputs`` (files, folders, globs) with ``model`` on a Ray cluster; see the module doc.

    ``options`` are the local ``infer``'s (outputs, batch size, threshold, TTA; ``threads`` are each
    worker's reader/writer threads). ``progress_factory(total)`` returns ``(advance, finish)`` over
    the images still to do; ``on_error(line)`` is called once per failed image; ``on_row(row)``
    with every per-image result row as it arrives (``key``, ``path``, ``status``, ``error``,
    ``worker`` = ``host:pid``, ``model_seconds``).
    """
    start = time.perf_counter()
    options.validate()
    ray_options.validate()
    model = str(model)
    engine_options = dict(engine_options or {})
    # Fail here, before any cluster starts, on a model or options no worker could open (nothing loads).
    probe = engines.open(model, backend=backend, device=device, **engine_options)
    backend = probe.name
    describe = probe.describe()
    pairs = _files(inputs)
    guard = InputGuard(p for _, p in pairs)  # no output of any chunk may land on an input of the run
    for key, _ in pairs:
        for path in expected_outputs(options.out, key, options):
            guard.check(path)
    with claim_output_folder(options.out, on_wait):  # one run into --out at a time, local or on Ray
        return _run_claimed(model, pairs, options, ray_options, backend, device, engine_options, describe,
                            progress_factory, on_error, on_row, start)


def _run_claimed(model, pairs, options, ray_options, backend, device, engine_options, describe,
                 progress_factory, on_error, on_row, start) -> RayBatchResult:
    done = complete_keys(options.out, [k for k, _ in pairs], options)
    todo = [(k, p) for k, p in pairs if k not in done]
    result = RayBatchResult(images=len(pairs), written=0, skipped=len(pairs) - len(todo), engine=describe,
                            address=ray_options.address)
    if not todo:
        result.address = f"{ray_options.address} (not started: every output is complete)"
        result.total_seconds = time.perf_counter() - start
        return result

    ray = _import_ray()
    chunk = max(ray_options.chunk, options.batch_size)
    advance, finish = progress_factory(len(todo)) if progress_factory else (None, lambda: None)
    seen: set[str] = set()
    workers: set[str] = set()
    try:
        t0 = time.perf_counter()
        with _ray_session(ray, ray_options) as address, _quiet_ray_data(ray):
            result.address = address
            result.startup_seconds = time.perf_counter() - t0
            ds = ray.data.from_items([{"key": k, "path": p} for k, p in todo],
                                     override_num_blocks=max(1, math.ceil(len(todo) / chunk)))
            ds = ds.map_batches(
                SegmentWorker, batch_size=chunk, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=ray_options.workers),
                num_cpus=ray_options.threads_per_worker,
                fn_constructor_kwargs={"model": model, "backend": backend, "device": device,
                                       "engine_options": engine_options, "options": options,
                                       "threads": ray_options.threads_per_worker})
            try:
                for row in ds.iter_rows():
                    row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
                    key = str(row["key"])
                    if key in seen:  # a chunk returns its rows once; guard against a duplicate anyway
                        continue
                    seen.add(key)
                    workers.add(str(row["worker"]))
                    status = row["status"]
                    if status == "failed":
                        result.failures.append(InferFailure(Path(row["path"]), str(row["error"])))
                        if on_error:
                            on_error(str(row["error"]))
                    else:
                        result.written += 1
                        result.retried += status == "existing"
                    result.inferred += status != "existing"
                    result.model_seconds += float(row["model_seconds"])
                    if on_row:
                        on_row(row)
                    if advance:
                        advance(1)
            except Exception as e:  # Ray wraps what a worker raised (an engine that cannot run ...)
                user = _user_error(e)
                if user is not None:
                    raise ResUNetError(f"{user} ({len(seen)} of {len(todo)} image(s) done)") from None
                raise ResUNetError(f"the Ray run failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                                   f"{len(seen)} of {len(todo)} image(s) done, rerun to resume") from e
    finally:
        finish()
    missing = [p for k, p in todo if k not in seen]
    for p in missing:  # not expected: every chunk answers or the run raises; listed, never silent
        msg = f"{p}: no result came back from the workers"
        result.failures.append(InferFailure(Path(p), msg))
        if on_error:
            on_error(msg)
    result.partials_removed = remove_partials(options.out, {k for k, _ in todo})
    result.workers = len(workers)
    result.total_seconds = time.perf_counter() - start
    return result


def summary_table(result: RayBatchResult, title: str = "inference on Ray"):
    """A rich table: images, skipped, written, failed, model-only and end-to-end images/s (the
    model-only rate is per worker: engine time is summed over the workers)."""
    from rich.table import Table

    from resunetpp.engines.base import engine_line

    table = Table(title=f"{title}: {engine_line(result.engine)}, "
                        f"Ray {result.address}, {result.workers} worker(s)", title_justify="left")
    for name in ("images", "skipped", "written", "failed", "model-only img/s", "end-to-end img/s"):
        table.add_column(name, justify="right")
    table.add_row(str(result.images), str(result.skipped), str(result.written), str(len(result.failures)),
                  f"{result.model_images_per_second:.1f}", f"{result.images_per_second:.1f}")
    return table
