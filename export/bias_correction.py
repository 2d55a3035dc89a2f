"""Empirical bias correction of INT8 convolutions.

M. Nagel, M. van Baalen, T. Blankevoort, M. Welling, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, section 4.2 (empirical bias correction).

Quantization shifts the *mean* of each convolution's output, not only its noise: rounded weights
against activations whose mean is not zero, activations clipped at the calibrated range, ReLUs
fed noisy inputs. In a simulation of exactly the export's INT8 (:class:`export.qat.QuantSim`:
each convolution's input per-tensor at the calibration percentile, its weight per output
channel), the convolutions are corrected one at a time in execution order: each gets the
per-channel difference between its simulated INT8 output mean and its FP32 output mean
subtracted from its bias, with every earlier convolution already corrected, so a correction also
absorbs what the layers before it left. The FP32 function moves by design (it is the INT8
artifact's source only); ranges are calibrated on the corrected model afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

#: Images the correction averages over (calibration images; means converge fast).
DEFAULT_IMAGES = 16


def _conv_means(model: nn.Module, convs: dict[str, nn.Conv2d], images: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    means: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, _args, out):
            m = out.detach().mean(dim=(0, 2, 3)) / len(images)
            means[name] = means[name] + m if name in means else m
        return record

    handles = [conv.register_forward_hook(hook(name)) for name, conv in convs.items()]
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return means


def bias_correct(model: nn.Module, calib_images: Sequence[np.ndarray], images: int = DEFAULT_IMAGES, *,
                 percentile: float = 99.99, keep_modules: Sequence[str] = (),
                 progress: Callable[[int], None] | None = None) -> dict:
    """Correct the biases of ``model``'s INT8 convolutions in place; returns a record.

    ``calib_images`` (``(N, C, H, W)`` arrays) set the simulated activation ranges, the first
    ``images`` of them the output means. Convolutions under ``keep_modules`` stay float and
    uncorrected. ``progress`` is called with 1 after each convolution.
    """
    from export.qat import QuantSim

    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    model.eval()
    tensors = [torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in calib_images]
    sample = tensors[:images]
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    reference = _conv_means(model, convs, sample)  # FP32 output means
    sim = QuantSim(model, keep_modules=keep_modules, percentile=percentile)
    convs = dict(sim.convs)
    try:
        sim.observe(len(tensors))
        with torch.no_grad():
            for x in tensors:
                model(x)
        sim.freeze()
        shifts = {}
        for name, conv in convs.items():
            simulated = _conv_means(model, {name: conv}, sample)[name]
            shift = simulated - reference[name]
            with torch.no_grad():
                conv.bias -= shift
            shifts[name] = float(shift.abs().max())
            if progress:
                progress(1)
    finally:
        sim.remove()
    worst = sorted(shifts.items(), key=lambda kv: -kv[1])[:5]
    return {"method": "empirical bias correction (sequential, simulated INT8)", "images": len(sample),
            "range_images": len(tensors), "convolutions": len(shifts),
            "largest_shifts": {k: round(v, 5) for k, v in worst}}
