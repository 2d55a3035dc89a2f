"""Every activation range the INT8 recipe needs, from one pass over the FP32 graph.

The recipe needs three sets of ranges: each equalization site's per-channel maxima on the FP32 model
(:mod:`resunetpp.export.equalize`), then the ``percentile`` of |x| at every convolution input of the
*equalized* model (the bias correction's simulated ranges and the Q/DQ ranges). Equalization divides
channel ``c`` of each rescaled tensor by ``s_c > 0`` and changes nothing else, so the equalized
tensor's percentile is the percentile of ``|x_c| / s_c`` over the FP32 tensor's values -- with
``s`` known only after the pass, from its own maxima.

:class:`ChannelTails` keeps, for each channel of one tensor, its ``K`` largest |x| over the pass,
``K`` the number of values the percentile reaches into the whole tensor (``ceil(tail * n)``, ``n``
every value of every channel of every image). Whatever the scales, the tensor's ``K`` largest
rescaled values are among the channels' ``K`` largest (a rescaled channel keeps its order), so
:meth:`ChannelTails.percentile` is exact for any ``s``: the same number a pass over the equalized
graph gives, up to float32 rounding of the division::

    FP32 graph ──> conv input (N, C, H, W) ──> |x| ≥ floor_c ? ──> per channel: K largest
                                                                   │   max  -> equalization scales s
                                                                   └── K-th largest of |x_c| / s_c
                                                                           -> simulated + Q/DQ range

Each channel's ``floor_c`` is a value it already has ``K`` values at or above (its ``K``-th largest
so far), so only values that can still enter are gathered: after the first batch, a small share, found by
searching only the 64-value blocks whose maximum passes the floor. The first batch keeps the values
above a threshold sampled from every 16th value (all of them when the sample misjudges).
For calibration sets below :data:`resunetpp.export.ranges.SMALL_SET_IMAGES` images the per-image
percentiles are kept the same way (each image's ``ceil(tail * C*H*W)`` largest per channel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from resunetpp.errors import ResUNetError


class Scratch:
    """Working tensors reused from call to call, one per name, grown when a larger one is asked for.

    A fresh 100 MB tensor for every batch costs the kernel a zeroed page every 4 KiB -- more time than
    the arithmetic on it; the :class:`ChannelTails` of one pass share one of these."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` (its values whatever was left in it)."""
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(*shape)


def tail_count(percentile: float, values: int) -> int:
    """How many of ``values`` values lie at or above their ``percentile`` (numpy's 'higher' method:
    the ``ceil(tail * n)``-th largest; ``0.01 * 10000`` is 100, not 100.0000001)."""
    return max(1, math.ceil(round((1.0 - percentile / 100.0) * values, 6)))


#: Values per block of :meth:`ChannelTails.update`'s prefilter (a block's maximum decides whether its
#: values are searched; 256x256 feature maps: a quarter row).
BLOCK = 64
#: The first batch's threshold is taken from every ``FIRST_STRIDE``-th value (at most), from at least
#: ``FIRST_MIN_SAMPLE`` values above it a channel.
FIRST_STRIDE = 16
FIRST_MIN_SAMPLE = 64


def _slots(ch: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For values grouped by channel (``ch``, increasing): how many each channel has, and each value's
    place among its channel's."""
    per_channel = torch.bincount(ch, minlength=channels)
    start = torch.cumsum(per_channel, 0) - per_channel
    return per_channel, torch.arange(ch.numel()) - start[ch]


def _dense(values: torch.Tensor, ch: torch.Tensor, slot: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
    """``(C, most values a channel has)``: each channel's values in a row, -1 after them."""
    dense = torch.full((per_channel.numel(), int(per_channel.max())), -1.0)
    dense[ch, slot] = values
    return dense


class TailTooShort(ResUNetError):
    """A channel dropped values the rescaled percentile may need (:attr:`ChannelTails.headroom`)."""


class ChannelTails:
    """Each channel's largest |x| of one ``(N, C, H, W)`` tensor over ``images`` images, enough for the
    exact ``percentile`` of the tensor with its channels rescaled by positive scales.

    ``update(x)`` takes one batch; ``per_image=True`` keeps each image's own tail as well
    (:meth:`per_image`). ``scratch``: working memory shared with other instances updated one at a time.

    ``headroom=None`` keeps ``K`` values a channel (the whole tensor's tail): exact for *any* scales.
    ``headroom=h`` keeps ``ceil(h * K / C)``: ``h`` times a channel's share if the tail were spread
    evenly. That is exact whenever no channel dropped a value that could still reach the rescaled
    tail -- every channel's floor, rescaled, at or below the answer -- which :meth:`exact` checks and
    :meth:`percentile` enforces (:class:`TailTooShort`); a channel holding more than ``h`` times its
    share of the rescaled tail is what breaks it. Kept small, the floors rise after the first batch
    and the gathering and merging cost a tenth as much.
    """

    def __init__(self, percentile: float, images: int, per_image: bool = False,
                 scratch: Scratch | None = None, headroom: float | None = None) -> None:
        if not 0 < percentile <= 100:
            raise ResUNetError(f"percentile must be in (0, 100], got {percentile}")
        if images < 1:
            raise ResUNetError(f"images must be >= 1, got {images}")
        if headroom is not None and not headroom >= 1:
            raise ResUNetError(f"headroom must be >= 1, got {headroom}")
        self.headroom = headroom
        self.q = percentile
        self.images = images
        self.keep_per_image = per_image
        self.k = 0  # the tail of the whole tensor over every image
        self.keep = 0  # values kept per channel: k, or fewer with a headroom
        self.seen = 0  # values seen (every channel)
        self.buffer: torch.Tensor | None = None  # (C, capacity): kept values, -1 where none
        self.count: torch.Tensor | None = None  # (C,) kept values per channel
        self.floor: torch.Tensor | None = None  # (C,) every value >= floor is kept; -1: everything
        self.image_tops: list[torch.Tensor] = []  # per batch: (N, C, k_image) largest per channel
        self.scratch = scratch if scratch is not None else Scratch()

    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ResUNetError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        per_image = c * h * w
        if self.buffer is None:
            self.k = tail_count(self.q, per_image * self.images)
            self.keep = self.k if self.headroom is None else min(self.k, math.ceil(self.headroom * self.k / c))
            self.buffer = torch.full((c, 2 * self.keep), -1.0)
            self.count = torch.zeros(c, dtype=torch.long)
            self.floor = torch.full((c,), -1.0)
        elif c != self.buffer.shape[0]:
            raise ResUNetError(f"tensor had {self.buffer.shape[0]} channels, now {c}")
        self.seen += x.numel()
        # |x| channel-major, (C, N*H*W), into a buffer reused from batch to batch (no fresh pages)
        a = self.scratch.get("abs", (c, n, h, w), torch.float32)
        torch.abs(x.detach().float().transpose(0, 1), out=a)
        a = a.view(c, -1)
        if self.keep_per_image:
            flat = a.view(c, n, h * w).transpose(0, 1)
            k_image = min(tail_count(self.q, per_image), h * w)
            self.image_tops.append(torch.topk(flat, k_image, dim=2).values)
        if bool((self.floor < 0).any()):  # a channel without K values yet
            if not (bool((self.count == 0).all()) and self._first(a)):
                self._merge(a)  # merge the batch whole
            return
        values, ch = self._above(a)
        if values.numel() == 0:
            return
        self._gather(values, ch)

    def _above(self, a: torch.Tensor, floor: torch.Tensor | None = None,
               strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The values of ``a`` ``(C, M)`` above each channel's ``floor`` (``strict=False``: at or above), and
        their channels, channel-major as ``a`` holds them. Where ``M`` splits into :data:`BLOCK` values,
        each block's maximum is taken first and only the blocks above the floor are searched: after the
        first batches a few per cent of them (exactly the same values, fewer passes over all of them)."""
        c, m = a.shape
        floor = (self.floor if floor is None else floor).view(c, 1)
        compare = torch.gt if strict else torch.ge
        if m % BLOCK == 0 and m > BLOCK:
            blocks = m // BLOCK
            top = self.scratch.get("block_max", (c, blocks), torch.float32)
            torch.amax(a.view(c, blocks, BLOCK), dim=2, out=top)
            which = compare(top, floor).view(-1).nonzero().squeeze(1)  # channel-major block numbers
            if which.numel() < c * blocks // 2:
                chosen = torch.index_select(a.view(-1, BLOCK), 0, which)
                block_channel = which // blocks
                inside = compare(chosen, floor.view(-1)[block_channel].view(-1, 1)).view(-1).nonzero().squeeze(1)
                return chosen.view(-1)[inside], block_channel[inside // BLOCK]
        mask = self.scratch.get("mask", a.shape, torch.bool)
        compare(a, floor, out=mask)
        idx = mask.view(-1).nonzero().squeeze(1)  # channel-major order
        return a.view(-1)[idx], idx // m

    def _gather(self, values: torch.Tensor, ch: torch.Tensor) -> None:
        """Add ``values`` (channel ``ch`` each, grouped by channel in increasing order) to the kept ones,
        merging when a channel's buffer would overflow."""
        per_channel, slot = _slots(ch, self.buffer.shape[0])
        if int((self.count + per_channel).max()) > self.buffer.shape[1]:  # full: keep each channel's K largest
            self._merge(_dense(values, ch, slot, per_channel))
            return
        self.buffer[ch, self.count[ch] + slot] = values
        self.count += per_channel

    def _first(self, a: torch.Tensor) -> bool:
        """The first batch of a long tail (``a``: ``(C, M)``, nothing kept yet) without sorting all of it:
        a threshold per channel from every ``stride``-th value, low enough to leave about twice ``keep``
        values above it; when every channel has at least ``keep`` values at or above its threshold, its
        ``keep`` largest are among them and only those are merged -- the same values a whole merge keeps.
        ``False`` (nothing done) when the batch is too short for it or a threshold came out too high."""
        c, m = a.shape
        stride = min(FIRST_STRIDE, (2 * self.keep) // FIRST_MIN_SAMPLE)
        if stride < 2 or m < 4 * self.keep:
            return False
        sample = a[:, ::stride]
        k = min(sample.shape[1], math.ceil(2 * self.keep / stride))
        threshold = torch.topk(sample, k, dim=1, sorted=False).values.amin(dim=1)
        if not bool((threshold > 0).all()):  # mostly zeros (a ReLU): nothing to save
            return False
        values, ch = self._above(a, threshold, strict=False)
        per_channel, slot = _slots(ch, c)
        if int(per_channel.min()) < self.keep:
            return False
        self._merge(_dense(values, ch, slot, per_channel))
        return True

    def _merge(self, new: torch.Tensor) -> None:
        """Keep each channel's ``keep`` largest of its kept values and ``new`` ``(C, m)`` (-1: no value);
        ``floor`` becomes that ``keep``-th largest (-1 while a channel has fewer)."""
        both = torch.cat([self.buffer[:, :int(self.count.max())], new], dim=1)
        top = torch.topk(both, min(self.keep, both.shape[1]), dim=1, sorted=False).values
        self.count = (top >= 0).sum(dim=1)
        self.buffer = torch.full((top.shape[0], 2 * self.keep), -1.0)
        self.buffer[:, :top.shape[1]] = top
        # the kept values are each channel's first ``count`` slots: sort the invalid (-1) ones last
        if bool((self.count < top.shape[1]).any()):
            self.buffer[:, :top.shape[1]] = torch.sort(top, dim=1, descending=True).values
        floor = top.amin(dim=1)
        self.floor = torch.where(self.count >= self.keep, floor, torch.full_like(floor, -1.0))

    def _check(self) -> None:
        if self.buffer is None:
            raise ResUNetError("no calibration data reached this tensor")
        if tail_count(self.q, self.seen) > self.k:
            raise ResUNetError(f"the tensor's size changed between calibration images: kept {self.k} values a "
                               f"channel, the percentile needs {tail_count(self.q, self.seen)}")

    def channel_max(self) -> torch.Tensor:
        """Each channel's largest |x|."""
        self._check()
        return self.buffer[:, :max(1, int(self.count.max()))].amax(dim=1).clamp_min(0.0)

    def percentile(self, scale: torch.Tensor | None = None) -> float:
        """The ``percentile`` of |x| over every channel, channel ``c`` divided by ``scale[c]`` first;
        :class:`TailTooShort` when a channel may have dropped a value it needs (:meth:`exact`)."""
        value = self.exact_percentile(scale)
        if value is None:
            raise TailTooShort(f"a channel holds more than {self.headroom:g} times its share of the rescaled tail")
        return value

    def exact(self, scale: torch.Tensor | None = None) -> bool:
        """Whether :meth:`percentile` with ``scale`` is exact (:meth:`exact_percentile`)."""
        return self.exact_percentile(scale) is not None

    def exact_percentile(self, scale: torch.Tensor | None = None) -> float | None:
        """:meth:`percentile`, or ``None`` when it may not be exact: every value a channel dropped is at
        most its floor, so when each floor, rescaled, is at or below the kept values' percentile, no
        dropped value lies above it and the kept values' percentile is the tensor's."""
        self._check()
        kept = self.buffer[:, :int(self.count.max())].double()
        floor = self.floor.double()
        if scale is not None:
            s = self._scale(scale)
            kept, floor = kept / s.view(-1, 1), floor / s
        values = kept[self.buffer[:, :kept.shape[1]] >= 0]
        k = tail_count(self.q, self.seen)
        value = float(torch.topk(values, k).values[-1])
        dropped = self.floor >= 0  # channels that reached ``keep`` values: they may have dropped some
        return value if not bool(dropped.any()) or float(floor[dropped].max()) <= value else None

    def per_image(self, scale: torch.Tensor | None = None) -> np.ndarray:
        """Each image's own ``percentile`` of |x| (channels divided by ``scale`` first), in the order seen."""
        if not self.keep_per_image:
            raise ResUNetError("per-image tails were not kept")
        self._check()
        tops = torch.cat(self.image_tops).double()  # (N, C, k_image)
        if scale is not None:
            tops = tops / self._scale(scale).view(1, -1, 1)
        k = tail_count(self.q, self.seen // max(1, tops.shape[0]))
        return torch.topk(tops.flatten(1), k, dim=1).values[:, -1].numpy()

    def _scale(self, scale: torch.Tensor) -> torch.Tensor:
        scale = torch.as_tensor(scale, dtype=torch.float64).flatten()
        if scale.numel() != self.buffer.shape[0] or not bool((scale > 0).all()):
            raise ResUNetError(f"expected {self.buffer.shape[0]} positive channel scales, got {scale.numel()}")
        return scale


#: Methods whose ranges come from the channel tails: the percentile, and ``minmax`` (its 100th; the
#: conv-only recipe is symmetric, so the signed min/max give the same range). ``mse`` and ``entropy``
#: need the whole distribution of the equalized tensor: they are measured on its graph instead.
METHODS = ("percentile", "minmax")


def supports(method: str, conv_only: bool, quantize_outputs: bool) -> bool:
    """Whether a recipe's ranges all come from one pass: convolution inputs only, a :data:`METHODS` method."""
    return method in METHODS and conv_only and not quantize_outputs


def graph_channel_tails(graph, tensors: Sequence[str], batches: Iterable[np.ndarray], *, images: int,
                        percentile: float, per_image: bool = False, headroom: float | None = None,
                        prune: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, ChannelTails]:
    """:class:`ChannelTails` of ``tensors`` (ONNX tensor names) of ``graph`` (an ``onnx.ModelProto``) over
    ``batches`` (``(N, C, H, W)`` arrays, ``images`` images in all), run by ONNX Runtime with the tensors
    as extra outputs (:class:`resunetpp.engines.graph_taps.GraphTaps`; ``prune``: only the part of the
    graph they depend on); ``headroom`` as in :class:`ChannelTails`."""
    from resunetpp.engines.graph_taps import GraphTaps

    taps = GraphTaps(graph, tensors, prune=prune)
    scratch = Scratch()
    tails = {t: ChannelTails(percentile, images, per_image, scratch, headroom) for t in taps.tensors}
    taps.observe(batches, lambda t, x: tails[t].update(x), progress)
    return tails


__all__ = ["METHODS", "ChannelTails", "Scratch", "TailTooShort", "graph_channel_tails", "supports", "tail_count"]
