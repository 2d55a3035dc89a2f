"""What ``resunetpp infer`` writes per image: the mask PNG, the overlay PNG and the probabilities.

Masks at the original resolution are binary ``L`` images (0/255) for one-class models and ``P``
images of class indices with a palette for several classes; the overlay fills each class region
translucently over the image and outlines it; probabilities are saved as ``.npy`` (``K, H, W``).
Files are written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

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


def square_filter(mask: np.ndarray, size: int, op: np.ufunc) -> np.ndarray:
    """The max (``np.maximum``) or min (``np.minimum``) of each ``size x size`` square of a 2-D
    uint8 array, edges replicated: the pixels of PIL's ``MaxFilter``/``MinFilter`` (which expand
    the image by its edge pixels first), computed separably -- rows, then columns -- in
    ``2 (size - 1)`` array operations instead of a per-pixel rank sort (a 720p mask: ~2 ms
    against ~170 ms)."""
    half = size // 2
    padded = np.pad(mask, half, mode="edge")
    h, w = mask.shape
    rows = padded[:, 0:w].copy()
    for dx in range(1, size):
        op(rows, padded[:, dx:dx + w], out=rows)
    out = rows[0:h].copy()
    for dy in range(1, size):
        op(out, rows[dy:dy + h], out=out)
    return out


def overlay_image(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.4) -> Image.Image:
    """``image`` (H, W, C uint8) with each class region filled translucently and outlined.

    Computed in bands of :data:`OVERLAY_BAND_ROWS` rows (each band's outline filter sees its
    neighbours' rows) and pasted into the result, so beyond the result itself (PIL's 4 bytes a
    pixel) it needs ``O(band x W)`` memory, not ~40 bytes a pixel of whole-image temporaries; the
    pixels are the same.
    """
    result = Image.new("RGB", (mask.shape[1], mask.shape[0]))  # filled band by band: no whole-image array
    for r0, band in _overlay_bands(image, mask, num_classes, alpha):
        result.paste(Image.fromarray(band, "RGB"), (0, r0))
    return result


def overlay_array(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.4) -> np.ndarray:
    """:func:`overlay_image`'s pixels as an ``(H, W, 3)`` uint8 array (a video frame to encode),
    filled band by band without going through a PIL image."""
    result = np.empty((*mask.shape[:2], 3), np.uint8)
    for r0, band in _overlay_bands(image, mask, num_classes, alpha):
        result[r0:r0 + band.shape[0]] = band
    return result


@functools.lru_cache(maxsize=16)
def _blend_table(num_classes: int, alpha: float) -> np.ndarray:
    """``(3, K x 256)`` uint8: channel ``c`` of a pixel of value ``v`` in class ``k`` blends to
    ``table[c, k * 256 + v]`` (``round(v (1 - alpha) + colour alpha)`` in float32; class 0 keeps ``v``)."""
    colors = palette(num_classes).astype(np.float32)
    v = np.arange(256, dtype=np.float32)
    table = np.clip(v[None, :, None] * (1.0 - alpha) + colors[:, None, :] * alpha + 0.5, 0, 255).astype(np.uint8)
    table[0] = np.arange(256, dtype=np.uint8)[:, None]
    table = np.ascontiguousarray(table.transpose(2, 0, 1).reshape(3, -1))
    table.setflags(write=False)
    return table


def _overlay_bands(image: np.ndarray, mask: np.ndarray, num_classes: int,
                   alpha: float) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, uint8 RGB band)`` of the overlay, :data:`OVERLAY_BAND_ROWS` rows at a time.

    A band with no foreground within the outline's reach is the image's rows as they are (a video
    frame is mostly background); elsewhere the work is done only in the box of rows and columns
    the foreground spans (plus the outline's halo), the rest of the band being a copy (the cost
    follows the polyp's area, not the frame's): each pixel's blended value
    is looked up in :func:`_blend_table` by (class, value) -- the float32 blend's own results,
    tabulated, so the pixels are the same as computing it (about 5x faster on a 720p frame).
    """
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
    height, width = mask.shape[:2]
    colors = palette(num_classes)
    lut = _blend_table(num_classes, float(alpha))
    size = 3 if min(mask.shape) < 512 else 5
    halo = size // 2
    for r0 in range(0, height, OVERLAY_BAND_ROWS):
        r1 = min(height, r0 + OVERLAY_BAND_ROWS)
        band = image[r0:r1]
        rgb = np.repeat(band, 3, axis=2) if band.shape[2] == 1 else band[:, :, :3]
        lo_row, hi_row = max(0, r0 - halo), min(height, r1 + halo)
        m = mask[lo_row:hi_row].astype(np.uint8)
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            yield r0, np.ascontiguousarray(rgb)
            continue
        cols = np.flatnonzero(m.any(axis=0))
        # the box the fill and the outline can reach (band coordinates), and the box the outline's
        # square filter reads for it (``m`` coordinates; a crop's replicated edge is only used where
        # it is the image's edge)
        y0, y1 = max(0, lo_row + int(rows[0]) - halo - r0), min(r1 - r0, lo_row + int(rows[-1]) + 1 + halo - r0)
        x0, x1 = max(0, int(cols[0]) - halo), min(width, int(cols[-1]) + 1 + halo)
        out = np.array(rgb, dtype=np.uint8, order="C")
        py0, py1 = max(0, r0 + y0 - halo - lo_row), min(hi_row - lo_row, r0 + y1 + halo - lo_row)
        px0, px1 = max(0, x0 - halo), min(width, x1 + halo)
        sub = out[y0:y1, x0:x1]
        idx = mask[r0 + y0:r0 + y1, x0:x1].astype(np.uint16)[:, :, None] * np.uint16(256) + rgb[y0:y1, x0:x1]
        for ch, table in enumerate(lut):  # (class, value) -> the blended value; class 0 keeps it
            np.take(table, idx[:, :, ch], out=sub[:, :, ch])
        keep = (slice(r0 + y0 - lo_row - py0, r0 + y1 - lo_row - py0), slice(x0 - px0, x1 - px0))
        crop = m[py0:py1, px0:px1]
        hi = square_filter(crop, size, np.maximum)[keep]
        lo = square_filter(crop, size, np.minimum)[keep]
        edge = (hi != lo) & (hi > 0)
        sub[edge] = colors[hi[edge]]
        yield r0, out


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
