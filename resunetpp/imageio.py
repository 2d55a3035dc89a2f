"""Reading images and masks of any common kind into ``uint8`` arrays, with clear errors.

Grayscale, RGBA, CMYK, palette and 16-bit images are converted, not refused; a file that is
not an image, is truncated, or is larger than the decompression-bomb limit raises
:class:`~resunetpp.errors.InputFileError` naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from resunetpp.errors import InputFileError, ResUNetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

#: Largest image accepted, in pixels (env ``RESUNETPP_MAX_PIXELS`` overrides). 20000x20000 is refused.
DEFAULT_MAX_PIXELS = 100_000_000


def max_pixels() -> int:
    """The decompression-bomb limit: ``RESUNETPP_MAX_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`."""
    text = os.environ.get("RESUNETPP_MAX_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ResUNetError(f"RESUNETPP_MAX_PIXELS must be a positive integer (pixels), got {text!r}")
    return value


def list_images(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (by suffix; not recursive, hidden files skipped), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    limit = max_pixels()
    # PIL's own bomb check uses our limit (it warns above it and refuses above twice it), so
    # RESUNETPP_MAX_PIXELS governs and every refusal below carries the same message.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        w, h = img.size
        if w * h > limit:
            raise InputFileError(path, f"image is {w}x{h}, over the {limit}-pixel limit "
                                       "(set RESUNETPP_MAX_PIXELS to raise it)")
        if w < 2 or h < 2:
            raise InputFileError(path, f"image is {w}x{h}; at least 2x2 pixels are needed")
        img.load()
    except InputFileError:
        raise
    except UnidentifiedImageError:
        raise InputFileError(path, "not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"image has {found.group(1)} pixels" if found else "image is too large"
        raise InputFileError(path, f"{size}, over the {limit}-pixel limit (set RESUNETPP_MAX_PIXELS to "
                                   "raise it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputFileError(path, f"corrupt or truncated image ({e})") from None
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(arr.astype(np.float32) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    arr = arr.astype(np.float32)
    top = 1.0 if arr.max(initial=0) <= 1.0 else float(arr.max())
    return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Return ``(H, W, channels)`` uint8; ``channels`` is 3 (RGB) or 1 (grayscale)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _open(path)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_uint8(np.asarray(img))
        img = Image.fromarray(arr, "L")
    elif mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba)
    target = "L" if channels == 1 else "RGB"
    try:
        arr = np.asarray(img.convert(target))
    except (OSError, ValueError) as e:
        raise InputFileError(path, f"cannot convert {mode} image to {target} ({e})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def read_mask(path: str | Path, num_classes: int = 1) -> np.ndarray:
    """Return an ``(H, W)`` uint8 mask: 0/1 for binary (threshold 127), class indices otherwise.

    Multi-class masks are read as indices (``L`` or palette ``P`` images); values must be
    below ``num_classes``.
    """
    img = _open(path)
    if num_classes == 1:
        arr = _to_uint8(np.asarray(img.convert("L") if img.mode not in ("I;16", "I", "F") else img))
        if arr.ndim == 3:
            arr = arr[..., 0]
        return (arr > 127).astype(np.uint8)
    if img.mode == "P":
        arr = np.asarray(img)
    else:
        arr = np.asarray(img.convert("L"))
    if arr.max(initial=0) >= num_classes:
        raise InputFileError(path, f"mask holds class index {int(arr.max())}, but the model has "
                                   f"{num_classes} classes")
    return arr.astype(np.uint8)


def write_png_atomic(path: str | Path, image: Image.Image) -> None:
    from resunetpp.atomic import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
