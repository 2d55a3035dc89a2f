"""A small on-disk cache of arrays computed from a model and an image set (INT8 calibration statistics,
reference outputs), so that a repeated export skips the passes that made them.

An entry is one ``.npz`` file (``np.savez``, read back with ``allow_pickle=False``) named after the
SHA-256 of its *key*: a JSON-able dict naming everything the arrays depend on (model hash, image-set
digest, method, recipe). The key is stored inside the entry too, with the names, shapes and dtypes of
its arrays; :func:`load` checks all of it (the stored key equals the one asked for, every array the
caller expects is there with a float/int dtype and finite values) and, on any mismatch or read
error, warns in one line and returns ``None`` so the caller recomputes -- an entry is never trusted
because of its file name. Entries are written atomically (:func:`resunetpp.atomic.atomic_path`).

Location: ``$RESUNETPP_CACHE_DIR``, else ``$XDG_CACHE_HOME/resunetpp``, else ``~/.cache/resunetpp``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from resunetpp.atomic import atomic_path
from resunetpp.errors import OutputWriteError

#: Bump when the layout of entries changes: older entries then miss instead of being misread.
FORMAT = 1
_META = "__meta__"


def cache_dir() -> Path:
    """Where entries live (see the module docstring)."""
    if os.environ.get("RESUNETPP_CACHE_DIR"):
        return Path(os.environ["RESUNETPP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "resunetpp"


def _canonical(key: Mapping) -> str:
    return json.dumps({"format": FORMAT, **key}, sort_keys=True, separators=(",", ":"), default=str)


def entry_path(kind: str, key: Mapping) -> Path:
    digest = hashlib.sha256(f"{kind}\n{_canonical(key)}".encode()).hexdigest()[:32]
    return cache_dir() / f"{kind}-{digest}.npz"


def store(kind: str, key: Mapping, arrays: Mapping[str, np.ndarray]) -> Path | None:
    """Write ``arrays`` under ``key``; returns the path, or ``None`` when the cache folder is not
    writable (the export goes on without a cache)."""
    path = entry_path(kind, key)
    arrays = {name: np.require(a, requirements='C') for name, a in arrays.items()}  # 0-d stays 0-d
    if _META in arrays:
        raise ValueError(f"array name {_META!r} is reserved")
    meta = {"kind": kind, "key": json.loads(_canonical(key)),
            "arrays": {n: {"shape": list(a.shape), "dtype": a.dtype.str} for n, a in arrays.items()}}
    try:
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays, **{_META: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)})
    except (OSError, OutputWriteError):  # a cache is optional: go on without it
        return None
    return path


def load(kind: str, key: Mapping, *, warn: Callable[[str], None] | None = None,
         expect: Callable[[dict[str, np.ndarray]], str | None] | None = None) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key``, or ``None`` (absent, or invalid: then ``warn`` gets one line).

    ``expect(arrays)`` is the caller's own check of the content (names, shapes); it returns a
    problem to report, or ``None`` when the arrays are what the caller needs.
    """
    path = entry_path(kind, key)
    if not path.is_file():
        return None

    def bad(why: str) -> None:
        if warn is not None:
            warn(f"{path}: ignoring a {kind} cache entry ({why}); recomputing")
        return None

    try:
        with np.load(path, allow_pickle=False) as z:
            if _META not in z.files:
                return bad("no record of its key")
            meta = json.loads(z[_META].tobytes().decode())
            if not isinstance(meta, dict) or meta.get("kind") != kind:
                return bad("not an entry of this kind")
            if meta.get("key") != json.loads(_canonical(key)):
                return bad("made for other inputs")
            listed = meta.get("arrays")
            names = [n for n in z.files if n != _META]
            if not isinstance(listed, dict) or sorted(listed) != sorted(names):
                return bad("its arrays do not match its record")
            arrays = {}
            for n in names:
                a = z[n]
                rec = listed[n]
                if not isinstance(rec, dict) or list(a.shape) != rec.get("shape") or a.dtype.str != rec.get("dtype"):
                    return bad(f"array {n!r} does not match its record")
                if a.dtype.kind not in "fiub":
                    return bad(f"array {n!r} has type {a.dtype}")
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    return bad(f"array {n!r} holds non-finite values")
                arrays[n] = a
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as e:
        return bad(f"unreadable: {type(e).__name__}")
    if expect is not None:
        problem = expect(arrays)
        if problem:
            return bad(problem)
    return arrays


__all__ = ["FORMAT", "cache_dir", "entry_path", "load", "store"]
