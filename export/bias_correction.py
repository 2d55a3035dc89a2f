"""Bias correction of INT8 convolutions.

M. Nagel, M. van Baalen, T. Blankevoort, M. Welling, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, section 4.2; the per-layer form NNCF calls fast
bias correction.

Quantization shifts the *mean* of each convolution's output, not only its noise: rounded weights
against activations whose mean is not zero, activations clipped at the calibrated range. In a
simulation of exactly the export's INT8 (:class:`resunetpp.export.quantsim.QuantSim`: each convolution's input
per-tensor at the calibration percentile, its weight per output channel), every convolution's
simulated output is compared with the float convolution of the *same* input (the INT8 model's
own activations), and the per-channel mean difference is subtracted from its bias. The float
convolution's mean needs no convolution: it is linear, so the mean is its bias plus the weights times
the input's window sums (:func:`window_sums`). Only each
layer's own shift is corrected: matching every layer's output mean to the FP32 model's instead
(the sequential, global variant) moved the FP32 function far more than it helped INT8 on the
shipped model (benchmarks/INT8.md, section 8). The FP32 function moves by design (the corrected
model is only the INT8 artifacts' source); ranges are calibrated on it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

#: Images the correction averages over (calibration images; means converge fast).
DEFAULT_IMAGES = 32
#: Images per PyTorch pass (resunetpp.export.equalize.PASS_BATCH).
PASS_BATCH = 8


def bias_correct(model: nn.Module, calib_images: Sequence[np.ndarray], images: int = DEFAULT_IMAGES, *,
                 percentile: float = 99.99, method: str = "percentile", keep_modules: Sequence[str] = (),
                 progress: Callable[[int], None] | None = None, amax: dict[str, float] | None = None,
                 batch: int = PASS_BATCH, state: dict | None = None) -> dict:
    """Correct the biases of ``model``'s INT8 convolutions in place; returns a record.

    ``calib_images`` (``(N, C, H, W)`` arrays) set the simulated activation ranges (``method``
    and ``percentile`` as :class:`resunetpp.export.quantsim.QuantSim` takes them), the first ``images`` of them
    the mean shifts. Convolutions under ``keep_modules`` stay float and uncorrected. ``progress``
    is called with the number of images after each pass (the range pass over every calibration
    image, then the ``images`` of the correction). ``amax``: the ranges of that first pass, given
    (e.g. from a cache), for every convolution (``"<module>:in"``). ``state``, a dict, receives
    ``"amax"`` (those ranges, for every convolution whatever ``keep_modules`` says) and ``"shifts"``
    (``{module: per-channel shift subtracted from its bias}``), what a cache keeps. Passes run ``batch``
    images at a time (NHWC when more than one; results equal to one at a time up to float rounding).
    """
    import torch.nn.functional as F

    from resunetpp.export.equalize import nhwc, stacked
    from resunetpp.export.quantsim import QuantSim

    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    model.eval()
    sample = list(calib_images[:images])
    n_sample = sum(int(np.asarray(x).shape[0]) for x in sample)
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
    if amax is None:  # the float model's ranges at every convolution input, whatever is kept in float
        observer = QuantSim(model, percentile=percentile, method=method)
        try:
            observer.observe(sum(int(np.asarray(x).shape[0]) for x in calib_images))
            with torch.no_grad(), nhwc(model, batch > 1) as tensor:
                for x in stacked(calib_images, batch):
                    model(tensor(x))
                    if progress:
                        progress(int(x.shape[0]))
            amax = observer.freeze()
        finally:
            observer.remove()
    sim = QuantSim(model, keep_modules=keep_modules, percentile=percentile, method=method)
    missing = [f"{name}:in" for name in sim.convs if f"{name}:in" not in amax]
    if missing:
        sim.remove()
        raise ValueError(f"no simulated range for {missing[0]}")
    sim.amax = {f"{name}:in": float(amax[f"{name}:in"]) for name in sim.convs}
    raw: dict[str, torch.Tensor] = {}
    shift: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args):
            x = args[0]  # the INT8 model's activation before its input quantization
            raw[name] = window_sums(module, x) if linear_mean(module) else x
        return hook

    def compare(name: str):
        def hook(module, _args, out):
            w = module.parametrizations.weight.original  # the float weight
            got = raw.pop(name)
            if linear_mean(module):  # the float convolution's mean from the input's window sums
                positions = out.shape[0] * out.shape[2] * out.shape[3]
                ref = torch.einsum("ocij,cij->o", w.double(), got) / positions
                d = (out.sum(dim=(0, 2, 3)).double() / positions - ref - module.bias.double()).float()
            else:
                ref = F.conv2d(got, w, module.bias, module.stride, module.padding, module.dilation, module.groups)
                d = (out - ref).mean(dim=(0, 2, 3))
            d = d * (out.shape[0] / n_sample)
            shift[name] = shift[name] + d if name in shift else d
        return hook

    handles = []
    try:
        for name, conv in sim.convs.items():
            handles.append(conv.register_forward_pre_hook(capture(name), prepend=True))
            handles.append(conv.register_forward_hook(compare(name)))
        with torch.no_grad(), nhwc(model, batch > 1) as tensor:
            for x in stacked(sample, batch):
                model(tensor(x))
                if progress:
                    progress(int(x.shape[0]))
    finally:
        for h in handles:
            h.remove()
        sim.remove()
    apply_shifts(model, shift)
    if state is not None:
        state["amax"] = dict(amax)
        state["shifts"] = {k: v.detach().clone() for k, v in shift.items()}
    worst = sorted(((k, float(v.abs().max())) for k, v in shift.items()), key=lambda kv: -kv[1])[:5]
    return {"method": "bias correction (per convolution, simulated INT8 vs float on the same input)",
            "simulated_ranges": method if method == "mse" else f"percentile {percentile:g}",
            "images": n_sample, "range_images": sum(int(np.asarray(x).shape[0]) for x in calib_images),
            "convolutions": len(shift), "largest_shifts": {k: round(v, 5) for k, v in worst}}


def linear_mean(conv: nn.Conv2d) -> bool:
    """Whether :func:`window_sums` gives ``conv``'s output mean: one group, zero padding given as numbers."""
    return (conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.bias is not None)


def window_sums(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``S[c, i, j]``: the sum, over every image and output position of ``conv``, of the input value its
    kernel tap ``(i, j)`` reads in channel ``c`` (zero padding reads 0), in float64. A convolution is
    linear, so its output's mean over images and positions is ``bias + sum(weight * S) / positions``:
    the float convolution's mean without computing the convolution (the bias correction's reference)::

        x (N, C, H, W) --sum over N--> Z (C, H, W) --rows tap i reads (R_i), columns tap j reads (K_j)-->
        S[c, i, j] = sum_{h in R_i, w in K_j} Z[c, h, w]
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():  # NHWC: sum in its order
        z = x.permute(0, 2, 3, 1).sum(dim=0).permute(2, 0, 1).double()
    else:
        z = x.sum(dim=0).double()  # (C, H, W)
    _, height, width = z.shape
    out_h = (height + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    out_w = (width + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1

    def taps(axis: int, size: int, out: int) -> torch.Tensor:
        """``(kernel, size)``: 1 where kernel tap ``i`` reads input row (or column) ``h`` at some output."""
        read = torch.zeros(conv.kernel_size[axis], size, dtype=torch.float64)
        at = torch.arange(out) * conv.stride[axis] - conv.padding[axis]
        for i in range(conv.kernel_size[axis]):
            rows = at + i * conv.dilation[axis]
            rows = rows[(rows >= 0) & (rows < size)]
            read[i, rows] = 1.0
        return read

    return torch.einsum("ih,chw,jw->cij", taps(0, height, out_h), z, taps(1, width, out_w))


@torch.no_grad()
def apply_shifts(model: nn.Module, shifts: dict[str, torch.Tensor]) -> None:
    """Subtract each convolution's per-channel ``shifts[module]`` from its bias (creating a zero bias
    where it has none): the correction :func:`bias_correct` computed, replayed (e.g. from a cache)."""
    modules = dict(model.named_modules())
    for name, d in shifts.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or tuple(d.shape) != (conv.out_channels,):
            raise ValueError(f"bias shift for {name!r} does not fit the model")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
        conv.bias -= d.to(conv.bias.dtype)
