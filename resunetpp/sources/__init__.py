"""Sources: where the images to segment come from (files, folders, globs; later video, streams).

A :class:`Source` yields :class:`Item` objects. Each item has

* ``key``: a string unique within the source; the outputs are named from it
  (``<key>_mask.png``, ``<key>_overlay.png``, ``<key>_probs.npy``);
* ``origin``: where it came from (a path; for a video the file and frame), named in messages;
* ``load(channels)``: the image as an ``(H, W, channels)`` uint8 array, so its original size is
  known once it is loaded. Image files decode here, in the caller's reader threads; a source that
  decodes in its own thread (video, a camera) hands over arrays that ``load`` only returns.

:func:`open_source` asks the registered sources, highest :attr:`Source.priority` first, which one
claims the inputs, and opens it. A source registers itself where it is implemented, with the
:func:`register_source` decorator, in a module of this package: every module here whose name does
not start with ``_`` is imported (:mod:`pkgutil`) before the first lookup. A new source is one new
module (e.g. ``resunetpp/sources/video.py``) and its tests; no list elsewhere names it. Such a
module imports its heavy decoder inside functions, as the engines do their runtimes.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import numpy as np

from resunetpp.errors import ResUNetError

__all__ = ["Item", "Source", "open_source", "register_source", "registered_sources", "unique_keys"]


@dataclass(frozen=True)
class Item:
    """One image of a source: its output ``key``, its ``origin`` and how to get its pixels.

    ``decode(channels)`` returns the image as ``(H, W, channels)`` uint8 (``channels`` is 1 or
    3, the model's); it may raise :class:`~resunetpp.errors.ResUNetError` (a corrupt file), which
    fails this item only.
    """

    key: str
    origin: Any
    decode: Callable[[int], np.ndarray]

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key or self.key in (".", "..") or "\0" in self.key \
                or "/" in self.key or os.sep in self.key:
            raise ValueError(f"{self.origin}: source key {self.key!r} cannot name an output file")

    def load(self, channels: int = 3) -> np.ndarray:
        """The image, ``(H, W, channels)`` uint8 (its original size is ``shape[:2]``)."""
        image = self.decode(channels)
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == channels and image.shape[0] > 0 and image.shape[1] > 0):
            got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise TypeError(f"{self.origin}: the source gave {got}, expected (H, W, {channels}) uint8")
        return image


class Source(ABC):
    """Items to segment, in order. Subclasses set :attr:`name`, implement :meth:`__iter__` and, to
    be found by :func:`open_source`, :meth:`claims` and :meth:`from_inputs`.

    A source is a context manager; :meth:`close` releases what it holds (a stream, a decoder
    thread). Iterating it twice is allowed for finite sources (image files) only.
    """

    #: The registry name (``register_source`` requires one).
    name: ClassVar[str] = ""
    #: Sources with a higher priority are asked first; the image-file source (0) takes the rest.
    priority: ClassVar[int] = 0

    @classmethod
    def claims(cls, inputs: Sequence[str]) -> bool:
        """Whether this source reads ``inputs`` (the command line's INPUT... strings)."""
        return False

    @classmethod
    def from_inputs(cls, inputs: Sequence[str]) -> "Source":
        """Open the source over ``inputs``; problems raise :class:`~resunetpp.errors.ResUNetError`."""
        raise NotImplementedError(f"{cls.__name__} cannot be opened from inputs")

    @abstractmethod
    def __iter__(self) -> Iterator[Item]:
        """The items, in order; keys unique within the source."""

    @property
    def count(self) -> int | None:
        """How many items it yields, or ``None`` when that is not known ahead (a live stream)."""
        return None

    def files(self) -> Sequence[Path]:
        """The files this source reads (known ahead), which ``infer`` never writes over; the base
        reads none. Items whose ``origin`` is a path are protected as they come, too."""
        return ()

    def close(self) -> None:
        """Release what the source holds; the base holds nothing."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


S = TypeVar("S", bound=type[Source])

_SOURCES: dict[str, type[Source]] = {}
_discovered = False


def register_source(cls: S) -> S:
    """Class decorator: make ``cls`` (a :class:`Source` with a ``name``) known to :func:`open_source`."""
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise TypeError(f"register_source takes a Source subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a registered source needs a name")
    known = _SOURCES.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"source name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    _SOURCES[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every public module of this package once (each registers its sources)."""
    global _discovered
    if _discovered:
        return
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if not module.startswith("_"):
            importlib.import_module(f"{__name__}.{module}")
    _discovered = True


def registered_sources() -> list[type[Source]]:
    """The registered sources in the order :func:`open_source` asks them (priority, then name)."""
    _discover()
    return sorted(_SOURCES.values(), key=lambda c: (-c.priority, c.name))


def open_source(inputs: Iterable[str | Path]) -> Source:
    """The source that claims ``inputs`` (the first, by priority), opened over them."""
    texts = [str(i) for i in inputs]
    for cls in registered_sources():
        if cls.claims(texts):
            return cls.from_inputs(texts)
    raise ResUNetError("no source reads these inputs (" + ", ".join(texts) + ")")


def unique_keys(names: Iterable[str]) -> list[str]:
    """One unique key per name: the name, then ``-2``, ``-3`` ... for names already used."""
    used: set[str] = set()
    keys = []
    for name in names:
        key, k = name, 1
        while key in used:
            k += 1
            key = f"{name}-{k}"
        used.add(key)
        keys.append(key)
    return keys
