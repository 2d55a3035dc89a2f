"""What ``resunetpp infer`` writes per image: the mask PNG, the overlay PNG and the probabilities.

Masks at the original resolution are binary ``L`` images (0/255) for one-class models and ``P``
images of class indices with a palette for several classes; the overlay fills each class region
translucently over the image and outlines it; probabilities are saved as ``.npy`` (``K, H, W``).
Files are written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from resunetpp.atomic import atomic_path


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


#: Rows of the image :func:`overlay_image` blends at a time: its float temporaries are
#: ``OVERLAY_BAND_ROWS x W x 3`` float32, whatever the image's height.
OVERLAY_BAND_ROWS = 256


def overlay_image(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.4) -> Image.Image:
    """``image`` (H, W, C uint8) with each class region filled translucently and outlined.

    Computed in bands of :data:`OVERLAY_BAND_ROWS` rows (each band's outline filter sees its
    neighbours' rows) and pasted into the result, so beyond the result itself (PIL's 4 bytes a
    pixel) it needs ``O(band x W)`` memory, not ~40 bytes a pixel of whole-image temporaries; the
    pixels are the same.
    """
    height = mask.shape[0]
    colors = palette(num_classes).astype(np.float32)
    width = 3 if min(mask.shape) < 512 else 5
    halo = width // 2
    result = Image.new("RGB", (mask.shape[1], height))  # filled band by band: no whole-image array
    for r0 in range(0, height, OVERLAY_BAND_ROWS):
        r1 = min(height, r0 + OVERLAY_BAND_ROWS)
        band = image[r0:r1]
        rgb = np.repeat(band, 3, axis=2) if band.shape[2] == 1 else band[:, :, :3]
        out = rgb.astype(np.float32)
        m_band = mask[r0:r1]
        inside = m_band > 0
        out[inside] = out[inside] * (1.0 - alpha) + colors[m_band[inside]] * alpha
        lo_row, hi_row = max(0, r0 - halo), min(height, r1 + halo)
        m = Image.fromarray(mask[lo_row:hi_row].astype(np.uint8), "L")
        keep = slice(r0 - lo_row, r0 - lo_row + (r1 - r0))
        hi = np.asarray(m.filter(ImageFilter.MaxFilter(width)))[keep]
        lo = np.asarray(m.filter(ImageFilter.MinFilter(width)))[keep]
        edge = (hi != lo) & (hi > 0)
        out[edge] = colors[hi[edge]]
        result.paste(Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB"), (0, r0))
    return result


def overlay_array(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.4) -> np.ndarray:
    """:func:`overlay_image` as an ``(H, W, 3)`` uint8 array (a video frame to encode)."""
    return np.asarray(overlay_image(image, mask, num_classes, alpha))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
