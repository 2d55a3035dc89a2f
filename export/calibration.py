"""Calibration and held-out evaluation image sets for INT8 export (and export-time verification).

A set is a folder of images, or a dataset root in the Kvasir-SEG layout (``images/``,
``masks/``, split files ``train.txt`` / ``val.txt``) with a split. Calibration defaults to
:data:`DEFAULT_CALIB_COUNT` images of ``train``; evaluation to ``val``. When a set holds more
images than asked for, a fixed-seed random sample is taken (reproducible, and spread over the
whole set rather than its alphabetical head). Images go through the checkpoint's exact
:class:`~resunetpp.preprocess.Preprocessing`.

The two sets must never overlap -- accuracy measured on calibration images flatters INT8 --
which :func:`check_disjoint` enforces by file stem and by content hash. The calibration set's
identity is recorded as the SHA-256 over its sorted per-file hashes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resunetpp.data import list_images, read_split, resolve_split
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.imageio import read_image, read_mask
from resunetpp.preprocess import Preprocessing

DEFAULT_CALIB_COUNT = 300
#: Fewer calibration images than this draws a warning.
MIN_CALIB_COUNT = 100
DEFAULT_EVAL_COUNT = 100
SAMPLE_SEED = 0


@dataclass(frozen=True)
class ImageSet:
    """A selected list of images (and masks when the folder has them), with their hashes."""

    role: str
    source: Path
    split: str | None
    paths: tuple[Path, ...]
    mask_paths: tuple[Path | None, ...]
    file_hashes: tuple[str, ...]
    available: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def stems(self) -> list[str]:
        return [p.stem for p in self.paths]

    @property
    def has_masks(self) -> bool:
        return all(m is not None for m in self.mask_paths)

    @property
    def digest(self) -> str:
        """SHA-256 over the sorted per-file SHA-256 hashes: the set's identity, order-free."""
        return hashlib.sha256("\n".join(sorted(self.file_hashes)).encode()).hexdigest()

    def record(self) -> dict:
        return {
            "role": self.role,
            "source": str(self.source),
            "split": self.split,
            "count": len(self),
            "available": self.available,
            "sampling": "all" if len(self) == self.available else f"random, seed {SAMPLE_SEED}",
            "sha256": self.digest,
            "images": self.stems,
        }

    def load(self, i: int, channels: int = 3, num_classes: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
        image = read_image(self.paths[i], channels)
        mpath = self.mask_paths[i]
        if mpath is None:
            return image, None
        mask = read_mask(mpath, num_classes)
        if mask.shape != image.shape[:2]:
            raise InputFileError(mpath, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                        f"{self.paths[i].name} is {image.shape[1]}x{image.shape[0]}")
        return image, mask

    def inputs(self, pre: Preprocessing) -> Iterator[np.ndarray]:
        """Preprocessed ``(C, H, W)`` float32 inputs, decoded one at a time."""
        for path in self.paths:
            yield pre.apply(read_image(path, pre.channels))


def _dataset_files(root: Path, split: str | None) -> tuple[list[Path], list[Path | None]]:
    images = {p.stem: p for p in list_images(root / "images")}
    masks_dir = root / "masks"
    masks = {p.stem: p for p in list_images(masks_dir)} if masks_dir.is_dir() else {}
    split_path = resolve_split(root, split)
    if split_path is None:
        stems = sorted(images)
    else:
        stems = read_split(split_path)
        missing = [s for s in stems if s not in images]
        if missing:
            raise InputFileError(split_path, f"{len(missing)} listed image(s) not in {root / 'images'}, "
                                             f"e.g. {missing[0]!r}")
    return [images[s] for s in stems], [masks.get(s) for s in stems]


def _folder_files(folder: Path, split: str | None) -> list[Path]:
    files = list_images(folder)
    split_path = resolve_split(folder, split)
    if split_path is None:
        return files
    wanted = set(read_split(split_path))
    return [p for p in files if p.stem in wanted]


def select_images(path: str | Path, split: str | None = None, count: int | None = None, *,
                  role: str = "calibration", default_split: str | None = "train") -> ImageSet:
    """Pick the images of a folder or a dataset root (+ split), sampled down to ``count``.

    ``split`` is a split name (``train`` = ``ROOT/train.txt``) or a split file; with a dataset
    root and no split, ``default_split`` is used when its file exists, else every image.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputFileError(path, f"{role} images: not a folder")
    if count is not None and count < 1:
        raise ResUNetError(f"{role} image count must be positive, got {count}")
    if (path / "images").is_dir():
        if split is None and default_split and (path / f"{default_split}.txt").is_file():
            split = default_split
        paths, masks = _dataset_files(path, split)
    else:
        paths = _folder_files(path, split)
        masks = [None] * len(paths)
    if not paths:
        raise InputFileError(path, f"{role} images: the folder holds no images")
    available = len(paths)
    if count is not None and count < available:
        keep = sorted(random.Random(SAMPLE_SEED).sample(range(available), count))
        paths, masks = [paths[i] for i in keep], [masks[i] for i in keep]
    from resunetpp.checkpoint import file_sha256  # lazily: choosing images needs no torch

    hashes = tuple(file_sha256(p) for p in paths)
    return ImageSet(role, path, str(split) if split is not None else None, tuple(paths), tuple(masks),
                    hashes, available)


def check_disjoint(calibration: ImageSet, evaluation: ImageSet) -> None:
    """Refuse sets that share an image (same file stem, or same content under another name)."""
    same_stem = sorted(set(calibration.stems) & set(evaluation.stems))
    by_hash = dict(zip(evaluation.file_hashes, evaluation.stems))
    same_content = sorted({by_hash[h] for h in calibration.file_hashes if h in by_hash})
    overlap = sorted(set(same_stem) | set(same_content))
    if overlap:
        raise ResUNetError(
            f"calibration ({calibration.source}) and evaluation ({evaluation.source}) images overlap: "
            f"{len(overlap)} image(s), e.g. {overlap[0]!r}; INT8 accuracy must be measured on held-out images")
    assert not set(calibration.file_hashes) & set(evaluation.file_hashes)


def synthetic_images(pre: Preprocessing, count: int = 4, seed: int = SAMPLE_SEED) -> list[np.ndarray]:
    """A fixed sample of smooth random uint8 images at the preprocessing size (when no folder is given)."""
    rng = np.random.default_rng(seed)
    h, w = pre.size
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), pre.channels), dtype=np.uint8)
        img = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
        noise = rng.integers(-20, 21, size=img.shape)
        out.append(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return out
