"""Image files: explicit files, folders (their images, not recursive) and globs (``**`` recurses).

The fallback source: it claims any inputs, so a path that is neither a file, a folder nor a
matching glob is refused here, naming it. Each file is an item keyed by its stem (``-2``, ``-3``
... for repeated stems), decoded by :func:`~resunetpp.imageio.read_image` when loaded.
"""

from __future__ import annotations

import functools
import glob
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from resunetpp.errors import InputFileError
from resunetpp.imageio import IMAGE_SUFFIXES, list_images, read_image
from resunetpp.sources import Item, Source, register_source, unique_keys

GLOB_CHARS = "*?["


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
            for p in list_images(path):
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


@register_source
class ImageFiles(Source):
    """These image files, in this order; a file listed twice is two items (keys ``a``, ``a-2``).

    ``ImageFiles(paths)`` takes the files as given; :meth:`from_inputs` expands files, folders and
    globs first (:func:`expand_inputs`, which drops duplicates).
    """

    name = "images"
    priority = 0

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.keys = unique_keys(p.stem for p in self.paths)

    @classmethod
    def claims(cls, inputs: Sequence[str]) -> bool:
        return True

    @classmethod
    def from_inputs(cls, inputs: Sequence[str]) -> "ImageFiles":
        return cls(expand_inputs(inputs))

    @property
    def count(self) -> int:
        return len(self.paths)

    def files(self) -> list[Path]:
        return list(self.paths)

    def __iter__(self) -> Iterator[Item]:
        for path, key in zip(self.paths, self.keys):
            yield Item(key, path, functools.partial(read_image, path))
