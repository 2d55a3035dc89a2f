"""Video files (``.mp4``, ``.mkv``, ``.avi``, ``.mov``, ``.webm`` ...): their frames, decoded by FFmpeg.

Claims the inputs when any of them names a video file by its suffix (:data:`~resunetpp.video.VIDEO_SUFFIXES`,
a quoted glob such as ``'clips/*.mp4'`` too); ahead of the image-file source. Mixing videos and
images in one run is refused. Each video is probed when the source opens
(:func:`resunetpp.video.probe`), so a missing file, a file that is not a video, a video without a
video stream or with a codec FFmpeg cannot decode is refused there, in one line naming it, before
any model is loaded.

``resunetpp infer`` runs a video through its own pipeline (:mod:`resunetpp.engines.video_infer`:
one overlay video, a frames record, optional mask PNGs per video); :meth:`VideoFiles.reader` gives
its frames as arrays from :class:`~resunetpp.video.VideoReader` (decoded, and resized to the
model's input, in the reader's thread; no temporary image files). Iterating the source yields one
:class:`~resunetpp.sources.Item` per frame, keyed ``<stem>_<index>`` (index zero-padded to six
digits), for code that treats frames as images.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.sources import Item, Source, register_source, unique_keys
from resunetpp.video import VIDEO_SUFFIXES, VideoInfo, VideoReader, is_video_path, probe

GLOB_CHARS = "*?["


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("L"))[:, :, None]


@register_source
class VideoFiles(Source):
    """These video files, in order (keys: their stems, ``-2`` ... for repeats); see the module doc."""

    name = "video"
    priority = 10

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ResUNetError("no video files given")
        self.keys = unique_keys(p.stem for p in self.paths)
        self.infos: list[VideoInfo] = [probe(p) for p in self.paths]

    @classmethod
    def claims(cls, inputs: Sequence[str]) -> bool:
        return any(is_video_path(i) for i in inputs)

    @classmethod
    def from_inputs(cls, inputs: Sequence[str]) -> "VideoFiles":
        others = [i for i in inputs if not is_video_path(i)]
        if others:
            raise ResUNetError(f"{others[0]}: cannot mix images and videos in one run (videos: "
                               f"{', '.join(i for i in inputs if is_video_path(i))}); run them separately")
        paths: list[Path] = []
        seen: set[Path] = set()
        for text in inputs:
            path = Path(text)
            if any(c in text for c in GLOB_CHARS) and not path.exists():
                found = sorted(Path(m) for m in glob.glob(text, recursive=True))
                found = [m for m in found if m.is_file() and m.suffix.lower() in VIDEO_SUFFIXES]
                if not found:
                    raise InputFileError(text, "the pattern matches no video file")
            elif not path.exists():
                raise InputFileError(path, "no such file")
            else:
                found = [path]
            for p in found:
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    paths.append(p)
        return cls(paths)

    @property
    def count(self) -> int | None:
        """The frames of all videos, when every container says how many it holds."""
        counts = [i.frames for i in self.infos]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]

    def files(self) -> list[Path]:
        return list(self.paths)

    def reader(self, index: int, **options) -> VideoReader:
        """A :class:`~resunetpp.video.VideoReader` over the ``index``-th video (``options`` go to it)."""
        return VideoReader(self.paths[index], **options)

    def __iter__(self) -> Iterator[Item]:
        for i, key in enumerate(self.keys):
            with self.reader(i) as reader:
                for frame in reader:
                    yield Item(f"{key}_{frame.index:06d}", f"{self.paths[i]}#frame{frame.index}",
                               _frame_decoder(frame.image))


def _frame_decoder(image: np.ndarray) -> Callable[[int], np.ndarray]:
    return lambda channels: _to_channels(image, channels)
