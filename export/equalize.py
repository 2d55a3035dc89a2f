"""Cross-layer equalization of activation ranges before INT8 quantization.

M. Nagel, M. van Baalen, T. Blankevoort, M. Welling, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019; G. Xiao, J. Lin, M. Seznec, H. Wu, J. Demouth,
S. Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023.

INT8 activations get one scale per tensor (TensorRT's explicit quantization and OpenVINO's
CPU kernels take nothing else), weights one per output channel. In ResUNet++ the channels
of one activation tensor differ several-fold in range, so the small channels are quantized
with few levels. Dividing channel ``c`` of a tensor by ``s_c > 0`` where it is produced and
multiplying the weights that read it by ``s_c`` leaves the FP32 function unchanged, as long as
everything in between is per-channel positively homogeneous (BatchNorm, ReLU, max-pooling,
nearest upsampling, concatenation, a product with an unchanged map)::

    BN ─ ReLU ─ conv(W)         ->   BN(γ/s, β/s) ─ ReLU ─ conv(W·s)        (ReLU(x/s) = ReLU(x)/s)

    body ─┐                             body(/s) ─┐
          (+)─ SE ─> y ─ conv(W)  ->              (+)─ SE(fc₁·s) ─> y/s ─ conv(W·s)
    short ┘     BN(γ,μ) <─┘               short(/s) ┘   BN(γ·s, μ/s) <─┘

with ``s_c = r_c^α / w_c^(1-α)`` (SmoothQuant's migration strength ``α``): ``r_c`` is channel
``c``'s largest absolute value over the calibration images, ``w_c`` the largest weight any
quantized convolution applies to it. ``α = 1`` gives every channel the same range and moves all
of the spread into the per-channel-quantized weights; the default 0.8 leaves a little of it in the
activations, which gave the lowest INT8 logit error on the shipped model (benchmarks/INT8.md,
section 8: 0.169 unequalized, 0.092 at 0.8, 0.113 at 1, 0.121 at 0.65).

The equalized model is a different parametrization of the same function: the export checks that
it still matches the original (probabilities within 1e-4 on held-out images) before quantizing it,
and records the sites.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from resunetpp.export.quantize import DEFAULT_EQUALIZE_ALPHA as DEFAULT_ALPHA


@dataclass(frozen=True)
class Rescale:
    """One module touched by a site: ``out`` divides its output channels by ``s`` (BatchNorm,
    convolution); ``in`` multiplies its weights on input channels ``start:start+len(s)`` by ``s``
    (convolution, linear) or takes inputs divided by ``s`` (BatchNorm: ``γ·s``, ``μ/s``)."""

    module: str
    side: str  # "out" | "in"
    start: int = 0


@dataclass(frozen=True)
class Site:
    """A tensor whose channels are rescaled: measured at the input of ``measure`` (its first
    ``channels`` channels), produced by the ``out`` rescales, read by the ``in`` rescales."""

    name: str
    measure: str
    channels: int
    rescales: tuple[Rescale, ...]

    @property
    def readers(self) -> list[Rescale]:
        return [r for r in self.rescales if r.side == "in"]


def _bn_relu_conv_sites(model: nn.Module) -> list[Site]:
    sites = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        ch = list(seq.children())
        for i in range(len(ch) - 2):
            if isinstance(ch[i], nn.BatchNorm2d) and isinstance(ch[i + 1], nn.ReLU) and isinstance(ch[i + 2], nn.Conv2d):
                bn, conv = f"{name}.{i}", f"{name}.{i + 2}"
                sites.append(Site(conv + ":input", conv, ch[i].num_features,
                                  (Rescale(bn, "out"), Rescale(conv, "in"))))
    return sites


def _block_out(block: str, last_conv: int) -> tuple[Rescale, ...]:
    """A residual unit's output ``SE(body + shortcut)`` divided by ``s``: both summands, and the
    SE's first layer compensated so that its gate does not change."""
    return (Rescale(f"{block}.body.{last_conv}", "out"), Rescale(f"{block}.shortcut.1", "out"),
            Rescale(f"{block}.se.fc.0", "in"))


def resunetpp_sites(model: nn.Module, attention_product: bool = True) -> list[Site]:
    """Every equalization site of a :class:`resunetpp.model.ResUNetPlusPlus`.

    BN-ReLU-conv inside every unit; the sums the two ASPP projections read; the head's input;
    the encoder outputs (read by the next unit's shortcut, the attention skip path and the
    decoder concatenation) and the last decoder's output (read by the head ASPP); and the
    attention product's channels of each decoder concatenation (off for the sigmoid-gated
    variant, where the product is not homogeneous in the gate's input).
    """
    m = dict(model.named_modules())
    sites = _bn_relu_conv_sites(model)
    for aspp in ("bridge", "head_aspp"):
        n = len(m[f"{aspp}.branches"])
        c = m[f"{aspp}.project"].in_channels
        sites.append(Site(f"{aspp}.project:input", f"{aspp}.project", c,
                          tuple(Rescale(f"{aspp}.branches.{k}.1", "out") for k in range(n))
                          + (Rescale(f"{aspp}.project", "in"),)))
    sites.append(Site("head:input", "head", m["head"].in_channels,
                      (Rescale("head_aspp.project", "out"), Rescale("head", "in"))))
    # Encoder outputs c1..c3: the next unit (BN in, shortcut conv in), the decoder that takes them
    # as skip (attention skip path BN, concatenation channels after the decoder's own).
    chain = [("stem", 3, "encoder1", "decoder3"), ("encoder1", 5, "encoder2", "decoder2"),
             ("encoder2", 5, "encoder3", "decoder1")]
    for block, last, nxt, dec in chain:
        c = m[f"{nxt}.shortcut.0"].in_channels
        cd = m[f"{dec}.block.shortcut.0"].in_channels - c
        sites.append(Site(f"{block}:output", f"{nxt}.shortcut.0", c, _block_out(block, last) + (
            Rescale(f"{nxt}.body.0", "in"), Rescale(f"{nxt}.shortcut.0", "in"),
            Rescale(f"{dec}.attention.skip_conv.0", "in"),
            Rescale(f"{dec}.block.body.0", "in", cd), Rescale(f"{dec}.block.shortcut.0", "in", cd))))
    n = len(m["bridge.branches"])
    sites.append(Site("encoder3:output", "bridge.branches.0.0", m["bridge.branches.0.0"].in_channels,
                      _block_out("encoder3", 5) + tuple(Rescale(f"bridge.branches.{k}.0", "in") for k in range(n))))
    n = len(m["head_aspp.branches"])
    sites.append(Site("decoder3:output", "head_aspp.branches.0.0", m["head_aspp.branches.0.0"].in_channels,
                      _block_out("decoder3.block", 5)
                      + tuple(Rescale(f"head_aspp.branches.{k}.0", "in") for k in range(n))))
    if attention_product:
        for dec in ("decoder1", "decoder2", "decoder3"):
            cd = m[f"{dec}.attention.out_conv.2"].out_channels
            sites.append(Site(f"{dec}.attention:output", f"{dec}.block.shortcut.0", cd, (
                Rescale(f"{dec}.attention.out_conv.2", "out"), Rescale(f"{dec}.block.body.0", "in"),
                Rescale(f"{dec}.block.shortcut.0", "in"))))
    return sites


#: Images per PyTorch pass of the calibration steps (equalization, bias correction): batches of 8 in
#: NHWC (channels_last) memory format cost about half the CPU seconds per image of one NCHW image at a
#: time on the 2-core box; the results differ only by float rounding inside the convolutions.
PASS_BATCH = 8


def stacked(images: Iterable[np.ndarray], size: int = PASS_BATCH) -> Iterator[np.ndarray]:
    """Consecutive ``(N, C, H, W)`` arrays of one shape concatenated into batches of up to ``size`` images."""
    pending: list[np.ndarray] = []
    count = 0
    for x in images:
        x = np.asarray(x, dtype=np.float32)
        if pending and (count + x.shape[0] > size or pending[0].shape[1:] != x.shape[1:]):
            yield np.concatenate(pending)
            pending, count = [], 0
        pending.append(x)
        count += x.shape[0]
    if pending:
        yield np.concatenate(pending)


@contextlib.contextmanager
def nhwc(model: nn.Module, enabled: bool = True) -> Iterator[Callable[[np.ndarray], torch.Tensor]]:
    """``model`` in channels_last memory format for the block (restored after); yields the function
    that turns an array into an NHWC input tensor. ``enabled=False``: NCHW as it is."""
    if not enabled:
        yield lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32))
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32)).contiguous(memory_format=torch.channels_last)
    finally:
        model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def channel_ranges(model: nn.Module, sites: list[Site], batches: Iterable[np.ndarray], *,
                   progress: Callable[[int], None] | None = None, batch: int = PASS_BATCH) -> dict[str, torch.Tensor]:
    """Largest absolute value of each site's channels over ``batches`` (FP32 forward passes, ``batch``
    images at a time: :func:`stacked`; NHWC when more than one)."""
    modules = dict(model.named_modules())
    ranges: dict[str, torch.Tensor] = {}

    def hook(site: Site):
        def record(_module, inputs):
            x = inputs[0][:, :site.channels]
            r = x.detach().abs().amax(dim=(0, 2, 3)).float()
            ranges[site.name] = torch.maximum(ranges[site.name], r) if site.name in ranges else r
        return record

    handles = [modules[s.measure].register_forward_pre_hook(hook(s)) for s in sites]
    try:
        model.eval()
        with nhwc(model, batch > 1) as tensor:
            for x in stacked(batches, batch):
                model(tensor(x))
                if progress:
                    progress(int(x.shape[0]))
    finally:
        for h in handles:
            h.remove()
    return ranges


def graph_channel_ranges(graph, sites: list[Site], batches: Iterable[np.ndarray], *,
                         progress: Callable[[int], None] | None = None, batch: int = PASS_BATCH) -> dict[str, torch.Tensor]:
    """:func:`channel_ranges` of the model ``graph`` (an ``onnx.ModelProto``) was exported from, measured
    by ONNX Runtime on the graph (:class:`resunetpp.engines.graph_taps.GraphTaps`; about twice as fast as
    PyTorch on the 2-core box, equal to float32 rounding): each site's ``measure`` convolution input
    found by the exporter's node metadata."""
    from resunetpp.engines.graph_taps import GraphTaps
    from resunetpp.export.fast_calibration import conv_inputs

    tensors = conv_inputs(graph, [s.measure for s in sites])
    readers: dict[str, list[Site]] = {}
    for s in sites:
        readers.setdefault(tensors[s.measure], []).append(s)
    ranges: dict[str, torch.Tensor] = {}

    def update(tensor: str, x: torch.Tensor) -> None:
        for s in readers[tensor]:
            r = x[:, :s.channels].abs().amax(dim=(0, 2, 3)).float()
            ranges[s.name] = torch.maximum(ranges[s.name], r) if s.name in ranges else r

    GraphTaps(graph, list(readers)).observe(stacked(batches, batch), update, progress)
    return ranges


def _reader_weight_range(module: nn.Module, start: int, n: int) -> torch.Tensor:
    w = module.weight.detach()[:, start:start + n]
    return w.abs().amax(dim=tuple(d for d in range(w.ndim) if d != 1))


@torch.no_grad()
def _apply(module: nn.Module, r: Rescale, s: torch.Tensor) -> None:
    n = s.numel()
    sl = slice(r.start, r.start + n)
    if isinstance(module, nn.BatchNorm2d):
        if r.side == "out":
            module.weight[sl] /= s
            module.bias[sl] /= s
        else:
            module.weight[sl] *= s
            module.running_mean[sl] /= s
    elif isinstance(module, nn.Conv2d | nn.Linear):
        if r.side == "out":
            module.weight[sl] /= s.view(-1, *([1] * (module.weight.ndim - 1)))
            if module.bias is not None:
                module.bias[sl] /= s
        else:
            module.weight[:, sl] *= s.view(1, -1, *([1] * (module.weight.ndim - 2)))
    else:
        raise TypeError(f"cannot rescale {r.module} ({type(module).__name__})")


def _median_share(r: torch.Tensor) -> float:
    """Median over channels of (channel range / tensor range); 0 for a tensor that is all zero."""
    top = float(r.max())
    return float((r / top).median()) if top > 0 else 0.0


@dataclass
class EqualizationResult:
    alpha: float
    sites: list[str] = field(default_factory=list)
    #: Per site: the median over channels of (channel range / tensor range), before and after.
    median_channel_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The measured per-channel ranges of each site (what a cache keeps).
    ranges: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: Per site: the per-channel divisor ``s`` its tensor got.
    scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def record(self) -> dict:
        return {"method": "cross-layer equalization (SmoothQuant-style, per-channel max ranges)",
                "alpha": self.alpha, "sites": len(self.sites),
                "median_channel_range_before_after": {k: [round(a, 3), round(b, 3)]
                                                      for k, (a, b) in self.median_channel_range.items()}}


@torch.no_grad()
def equalize(model: nn.Module, batches: Iterable[np.ndarray], alpha: float = DEFAULT_ALPHA,
             sites: list[Site] | None = None, *, ranges: dict[str, torch.Tensor] | None = None,
             progress: Callable[[int], None] | None = None) -> EqualizationResult:
    """Equalize ``model`` in place (FP32 function unchanged) from ranges measured on ``batches``
    (or given: ``ranges``, :func:`channel_ranges` of the same model and images, e.g. from a cache;
    ``result.ranges`` holds them either way)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if sites is None:
        sites = default_sites(model)
    modules = dict(model.named_modules())
    if ranges is None:
        ranges = channel_ranges(model, sites, batches, progress=progress)
    result = EqualizationResult(alpha, ranges=dict(ranges))
    for site in sites:
        r = ranges[site.name].to(torch.float64)
        w = torch.stack([_reader_weight_range(modules[q.module], q.start, site.channels).to(torch.float64)
                         for q in site.readers if isinstance(modules[q.module], nn.Conv2d)]).amax(0)
        live = (r > 1e-6 * r.max()) & (w > 0)
        s = torch.ones_like(r)
        s[live] = r[live] ** alpha / w[live] ** (1.0 - alpha)
        s = s.float()
        for rescale in site.rescales:
            _apply(modules[rescale.module], rescale, s)
        after = r / s.double()
        result.scales[site.name] = s
        result.sites.append(site.name)
        result.median_channel_range[site.name] = (_median_share(r), _median_share(after))
    return result


def input_scales(model: nn.Module, sites: list[Site], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{convolution: per-input-channel divisor}``: how equalizing ``sites`` with ``scales``
    (:attr:`EqualizationResult.scales`) divided each convolution's input, channel by channel (ones where
    no site touched it). The equalized model's convolution input is the original's divided by it."""
    out = {name: torch.ones(m.in_channels) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for site in sites:
        s = scales[site.name].to(torch.float32)
        for r in site.readers:
            if r.module in out:
                out[r.module][r.start:r.start + s.numel()] *= s
    return out


def default_sites(model: nn.Module) -> list[Site]:
    """The equalization sites of ``model`` (:func:`resunetpp_sites`, attention product for the authors' variant)."""
    architecture = getattr(getattr(model, "config", None), "architecture", "resunetpp")
    return resunetpp_sites(model, attention_product=architecture == "resunetpp")
