"""Batched, on-device augmentation for segmentation (image and mask move together).

Runs on whatever device the batch is on, so a GPU is never starved by a CPU data loader:
random horizontal/vertical flips, 90-degree rotations, an affine warp (rotation, scale,
translation) and colour jitter (brightness, contrast, saturation, hue).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _flip_rot(images: torch.Tensor, masks: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = images.shape[0]
    dev = images.device
    hflip = torch.rand(n, device="cpu", generator=g) < 0.5
    vflip = torch.rand(n, device="cpu", generator=g) < 0.5
    rot = torch.randint(0, 4, (n,), generator=g)
    out_i, out_m = [], []
    for i in range(n):
        im, ms = images[i], masks[i]
        dims = []
        if hflip[i]:
            dims.append(-1)
        if vflip[i]:
            dims.append(-2)
        if dims:
            im, ms = im.flip(dims), ms.flip(dims)
        if rot[i] and im.shape[-1] == im.shape[-2]:
            im, ms = torch.rot90(im, int(rot[i]), (-2, -1)), torch.rot90(ms, int(rot[i]), (-2, -1))
        out_i.append(im)
        out_m.append(ms)
    del dev
    return torch.stack(out_i), torch.stack(out_m)


def _affine(images: torch.Tensor, masks: torch.Tensor, g: torch.Generator | None,
            max_rot_deg: float = 25.0, scale: tuple[float, float] = (0.8, 1.25), max_shift: float = 0.1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    n = images.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(max_rot_deg)
    s = torch.exp(torch.empty(n).uniform_(math.log(scale[0]), math.log(scale[1]), generator=g))
    tx = (torch.rand(n, generator=g) * 2 - 1) * max_shift * 2
    ty = (torch.rand(n, generator=g) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return images, masks


def _colour(images: torch.Tensor, g: torch.Generator | None, strength: float = 0.2) -> torch.Tensor:
    """``images`` in [0, 1], (N, C, H, W)."""
    n, c = images.shape[:2]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=g).to(images.device, images.dtype)

    images = images * u(1 - strength, 1 + strength)  # brightness
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * u(1 - strength, 1 + strength) + mean  # contrast
    if c == 3:
        gray = (0.299 * images[:, :1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
        images = (images - gray) * u(1 - strength, 1 + strength) + gray  # saturation
        # hue: rotate the chroma plane a little (YIQ rotation)
        h = (torch.rand(n, generator=g) * 2 - 1) * 0.1 * math.pi
        y = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        i_ = 0.596 * images[:, 0] - 0.274 * images[:, 1] - 0.322 * images[:, 2]
        q = 0.211 * images[:, 0] - 0.523 * images[:, 1] + 0.312 * images[:, 2]
        ch = torch.cos(h).to(images)[:, None, None]
        sh = torch.sin(h).to(images)[:, None, None]
        i2, q2 = i_ * ch - q * sh, i_ * sh + q * ch
        images = torch.stack([y + 0.956 * i2 + 0.621 * q2, y - 0.272 * i2 - 0.647 * q2, y - 1.106 * i2 + 1.703 * q2], 1)
    return images.clamp(0, 1)


def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None,
            p_affine: float = 0.7, p_colour: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` float (N, C, H, W) in [0, 1]; ``masks`` float (N, K, H, W) in [0, 1] (one-hot or binary).

    Returns augmented copies; masks stay soft after warping (threshold or use as soft targets).
    """
    images, masks = _flip_rot(images, masks, generator)
    if float(torch.rand(1, generator=generator)) < p_affine:
        images, masks = _affine(images, masks, generator)
    if float(torch.rand(1, generator=generator)) < p_colour:
        images = _colour(images, generator)
    return images, masks
