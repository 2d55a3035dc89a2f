"""Datasets in the Kvasir-SEG layout: ``images/`` and ``masks/`` with the same file stems.

An optional split file lists one stem a line. Images and masks may be jpg, png, tif or bmp
and of any size; a mask must have its image's size. Problems raise
:class:`~resunetpp.errors.InputFileError` naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resunetpp.errors import InputFileError
from resunetpp.imageio import list_images, read_image, read_mask


@dataclass(frozen=True)
class Sample:
    stem: str
    image_path: Path
    mask_path: Path | None


#: What an image stem in a split file may look like; anything else is never echoed in a message
#: (``--split /etc/passwd`` must not print the file's lines).
_STEM = re.compile(r"[\w.\-+,()\[\] ]{1,160}")


def looks_like_stem(name: str) -> bool:
    return _STEM.fullmatch(name) is not None and not name.startswith(".")


def read_split(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "split file not found")
    try:
        stems = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise InputFileError(path, "split file is not UTF-8 text") from None
    stems = [s for s in stems if s and not s.startswith("#")]
    if not stems:
        raise InputFileError(path, "split file lists no images")
    return stems


def resolve_split(root: Path, split: str | Path | None) -> Path | None:
    """``split`` may be a path, or a name such as ``val`` meaning ``ROOT/val.txt``."""
    if split is None:
        return None
    p = Path(split)
    if p.is_file():
        return p
    cand = root / (str(split) if str(split).endswith(".txt") else f"{split}.txt")
    if cand.is_file():
        return cand
    raise InputFileError(p, f"split file not found (also tried {cand})")


class SegmentationDataset:
    """Pairs of (image, mask) files; masks optional when ``require_masks`` is False."""

    def __init__(self, root: str | Path, split: str | Path | None = None, num_classes: int = 1,
                 require_masks: bool = True, channels: int = 3) -> None:
        self.root = Path(root)
        self.num_classes = num_classes
        self.channels = channels
        if not self.root.is_dir():
            raise InputFileError(self.root, "data folder not found")
        img_dir = self.root / "images"
        mask_dir = self.root / "masks"
        if not img_dir.is_dir():
            raise InputFileError(self.root, "no images/ folder (expected the Kvasir-SEG layout: images/ and masks/)")
        by_stem = {p.stem: p for p in list_images(img_dir)}
        masks = {p.stem: p for p in list_images(mask_dir)} if mask_dir.is_dir() else {}
        split_path = resolve_split(self.root, split)
        if split_path is not None:
            stems = read_split(split_path)
            missing = [(i, s) for i, s in enumerate(stems) if s not in by_stem]
            if len(missing) == len(stems):  # nothing matches: perhaps not a split file at all; echo none of it
                raise InputFileError(split_path, f"none of its {len(stems)} entries names an image in {img_dir} "
                                                 "(is this a split file? one image name a line)")
            if missing:
                line, name = missing[0]
                example = repr(name) if looks_like_stem(name) else f"entry {line + 1}"
                raise InputFileError(split_path, f"{len(missing)} listed image(s) not in {img_dir}, e.g. {example}")
        else:
            stems = sorted(by_stem)
        if not stems:
            raise InputFileError(img_dir, "folder holds no images")
        samples = []
        for s in stems:
            m = masks.get(s)
            if m is None and require_masks:
                raise InputFileError(by_stem[s], f"image has no mask in {mask_dir}")
            samples.append(Sample(s, by_stem[s], m))
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        s = self.samples[i]
        image = read_image(s.image_path, self.channels)
        if s.mask_path is None:
            return image, None
        mask = read_mask(s.mask_path, self.num_classes)
        if mask.shape != image.shape[:2]:
            raise InputFileError(s.mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                              f"{s.image_path.name} is {image.shape[1]}x{image.shape[0]}")
        return image, mask

    def __iter__(self) -> Iterator[tuple[Sample, np.ndarray, np.ndarray | None]]:
        for i, s in enumerate(self.samples):
            img, mask = self.load(i)
            yield s, img, mask
