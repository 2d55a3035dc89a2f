"""Every range of the INT8 recipe from one pass (export/channel_tails.py): exact percentiles of the
equalized tensors from the FP32 graph's per-channel tails, checked against numpy and against a pass
over the equalized graph itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resunetpp.errors import ResUNetError
from resunetpp.export.channel_tails import ChannelTails, TailTooShort, graph_channel_tails, supports, tail_count

pytestmark = pytest.mark.usefixtures("torch_threads")


def _stream(seed: int, batches: int = 10, shape=(3, 5, 7, 6)) -> list[np.ndarray]:
    """Batches whose channels differ in scale and tail (one heavy-tailed channel), with exact zeros and
    ties (values on a 1/8 grid), signed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        x = rng.standard_normal(shape) * np.array([0.5, 1.0, 3.0, 0.2, 1.5]).reshape(1, -1, 1, 1)
        x[:, 1] = rng.standard_t(2, size=x[:, 1].shape)  # heavy tail
        x[:, 3] = np.maximum(x[:, 3], 0.0)  # half zeros (a ReLU output)
        out.append((np.round(x * 8) / 8).astype(np.float32))
    return out


def _numpy_percentile(batches, percentile: float, scale=None) -> float:
    a = np.abs(np.concatenate(batches)).astype(np.float64)
    if scale is not None:
        a = a / np.asarray(scale, dtype=np.float64).reshape(1, -1, 1, 1)
    flat = np.sort(a.ravel())[::-1]
    return float(flat[tail_count(percentile, flat.size) - 1])


@pytest.mark.parametrize("percentile", [90.0, 99.0, 99.9, 100.0])
def test_percentile_is_exact_for_any_channel_scales(percentile: float) -> None:
    """The tensor's percentile with its channels divided by any positive scales -- known only after the
    pass -- equals numpy's over the whole stream ('higher' method); the channel maxima too. 90: a
    channel's tail is longer than several batches (merged whole); 99-100: the floors filter."""
    batches = _stream(0)
    tails = ChannelTails(percentile, images=sum(b.shape[0] for b in batches))
    for b in batches:
        tails.update(torch.from_numpy(b.copy()))
    rng = np.random.default_rng(1)
    for scale in (None, np.ones(5), rng.uniform(0.1, 10.0, 5), np.array([100.0, 0.01, 1.0, 0.5, 2.0])):
        got = tails.percentile(None if scale is None else torch.from_numpy(scale))
        assert got == pytest.approx(_numpy_percentile(batches, percentile, scale), rel=1e-12), scale
    np.testing.assert_array_equal(tails.channel_max().numpy(),
                                  np.abs(np.concatenate(batches)).max(axis=(0, 2, 3)))


@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_a_headroom_is_exact_when_it_says_so_and_refuses_otherwise(percentile: float) -> None:
    """Each channel keeping only ``headroom`` times its even share of the tail: wherever :meth:`exact`
    holds the percentile equals numpy's; where it does not, :meth:`percentile` refuses rather than
    answer. A scale that shrinks the heavy-tailed channel spreads the tail (exact); one that blows it
    up puts the whole tail in it (refused). With the headroom at the channel count it is always exact."""
    batches = _stream(3, batches=12)
    n = sum(b.shape[0] for b in batches)
    short, full = ChannelTails(percentile, images=n, headroom=1.5), ChannelTails(percentile, images=n, headroom=5)
    for b in batches:
        short.update(torch.from_numpy(b.copy()))
        full.update(torch.from_numpy(b.copy()))
    assert short.keep < short.k and full.keep == full.k
    spread = torch.tensor([0.5, 6.0, 3.0, 0.2, 1.5], dtype=torch.float64)  # the channels' own spread
    piled = torch.tensor([100.0, 0.01, 100.0, 100.0, 100.0], dtype=torch.float64)
    verdicts = {}
    for name, scale in (("none", None), ("spread", spread), ("piled", piled)):
        want = _numpy_percentile(batches, percentile, None if scale is None else scale.numpy())
        assert full.exact(scale) and full.percentile(scale) == pytest.approx(want, rel=1e-12)
        verdicts[name] = short.exact(scale)
        if verdicts[name]:
            assert short.percentile(scale) == pytest.approx(want, rel=1e-12), name
        else:
            with pytest.raises(TailTooShort):
                short.percentile(scale)
    assert verdicts["spread"] and not verdicts["piled"], verdicts
    with pytest.raises(ResUNetError, match="headroom"):
        ChannelTails(99.0, images=1, headroom=0.5)


def _spy(monkeypatch, name: str) -> list:
    """Record what ``ChannelTails.<name>`` returns, call by call."""
    import resunetpp.export.channel_tails as module

    calls: list = []
    original = getattr(module.ChannelTails, name)

    def spied(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(module.ChannelTails, name, spied)
    return calls


@pytest.mark.parametrize("headroom", [None, 2.0])
def test_long_tails_take_the_shortcuts_and_stay_exact(monkeypatch, headroom) -> None:
    """Tensors the size of real feature maps take the fast paths: the first batch merged from the values
    above a sampled threshold, later batches searched only in blocks whose maximum passes the floor.
    The percentile, for any channel scales, and the maxima still equal numpy's."""
    first = _spy(monkeypatch, "_first")
    rng = np.random.default_rng(5)
    batches = []
    for _ in range(10):
        x = rng.standard_normal((8, 4, 32, 32)) * np.array([0.5, 1.0, 3.0, 0.2]).reshape(1, -1, 1, 1)
        x[:, 1] = rng.standard_t(3, size=x[:, 1].shape)
        batches.append(x.astype(np.float32))
    tails = ChannelTails(99.9, images=80, headroom=headroom)
    searched: list = []
    original_above = ChannelTails._above

    def above(self, a, floor=None, strict=True):
        values, ch = original_above(self, a, floor, strict)
        searched.append(values.numel() / a.numel())
        return values, ch

    monkeypatch.setattr(ChannelTails, "_above", above)
    for b in batches:
        tails.update(torch.from_numpy(b.copy()))
    assert first == [True]  # the first batch: the threshold left every channel at least its tail
    assert len(searched) >= 9 and max(searched[1:]) < 0.05  # later batches: a few per cent passed
    for scale in (None, np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.2, 3.0, 1.0, 0.05])):
        want = _numpy_percentile(batches, 99.9, scale)
        got = tails.exact_percentile(None if scale is None else torch.from_numpy(scale))
        if headroom is None:
            assert got == pytest.approx(want, rel=1e-12), scale
        elif got is not None:
            assert got == pytest.approx(want, rel=1e-12), scale
    np.testing.assert_array_equal(tails.channel_max().numpy(),
                                  np.abs(np.concatenate(batches)).max(axis=(0, 2, 3)))


def test_a_first_batch_the_sample_misjudges_is_merged_whole(monkeypatch) -> None:
    """Values large only where the first batch's sample looks (every 16th): the sampled threshold leaves
    fewer than the tail above it, so the batch is merged whole -- and the answer is still exact."""
    first = _spy(monkeypatch, "_first")
    rng = np.random.default_rng(6)
    batches = []
    for i in range(6):
        x = rng.uniform(0.0, 1.0, (8, 2, 32, 32))
        if i == 0:
            flat = x.transpose(1, 0, 2, 3).reshape(2, -1).copy()  # channel-major, as sampled
            flat[:, ::16] += 10.0
            x = flat.reshape(2, 8, 32, 32).transpose(1, 0, 2, 3)
        batches.append(np.ascontiguousarray(x, dtype=np.float32))
    tails = ChannelTails(99.0, images=48)
    for b in batches:
        tails.update(torch.from_numpy(b.copy()))
    assert first == [False]
    assert tails.percentile() == pytest.approx(_numpy_percentile(batches, 99.0), rel=1e-12)


def test_per_image_percentiles_are_each_images_own() -> None:
    batches = _stream(2, batches=4)
    tails = ChannelTails(99.0, images=12, per_image=True)
    for b in batches:
        tails.update(torch.from_numpy(b.copy()))
    scale = np.array([2.0, 0.3, 1.0, 5.0, 0.7])
    images = [x[None] for b in batches for x in b]
    np.testing.assert_allclose(tails.per_image(torch.from_numpy(scale)),
                               [_numpy_percentile([x], 99.0, scale) for x in images], rtol=1e-12)
    np.testing.assert_allclose(tails.per_image(), [_numpy_percentile([x], 99.0) for x in images], rtol=1e-12)


def test_refuses_what_it_cannot_answer_exactly() -> None:
    tails = ChannelTails(99.0, images=2)
    with pytest.raises(ResUNetError, match="no calibration data"):
        tails.percentile()
    tails.update(torch.zeros(1, 2, 4, 4))
    tails.update(torch.ones(1, 2, 8, 8))  # larger than the first image: the tail it kept is too short
    with pytest.raises(ResUNetError, match="size changed"):
        tails.percentile()
    tails = ChannelTails(99.0, images=1)
    tails.update(torch.ones(1, 2, 4, 4))
    with pytest.raises(ResUNetError, match="channels"):
        tails.update(torch.ones(1, 3, 4, 4))
    with pytest.raises(ResUNetError, match="positive channel scales"):
        tails.percentile(torch.tensor([1.0, 0.0]))
    with pytest.raises(ResUNetError, match="per-image"):
        tails.per_image()
    with pytest.raises(ResUNetError, match="percentile"):
        ChannelTails(0.0, images=1)


def test_supports_only_one_pass_recipes() -> None:
    assert supports("percentile", True, False) and supports("minmax", True, False)
    assert not supports("mse", True, False) and not supports("entropy", True, False)
    assert not supports("percentile", False, False) and not supports("percentile", True, True)


@pytest.mark.parametrize("alpha", [0.8, None])
def test_one_pass_ranges_equal_a_pass_over_the_equalized_graph(tiny_onnx, alpha) -> None:
    """The export's one pass: channel maxima and tails on the FP32 graph, the model equalized with those
    maxima, each convolution input's percentile divided by its equalization scales -- equal, to float32
    rounding, to the exact percentile measured on the equalized model's own graph (what the bias
    correction simulated before); the maxima equal to the equalization's own measurement."""
    import copy

    from resunetpp.export.equalize import (default_sites, equalize, graph_channel_ranges, input_scales,
                                           stacked)
    from resunetpp.export.fast_calibration import conv_inputs
    from resunetpp.export.onnx_graph import ShapeSpec, export_onnx
    from resunetpp.export.quantsim import graph_sim_ranges
    from resunetpp.model import WithActivation

    model, fp32, _path, images = tiny_onnx
    model = copy.deepcopy(model)
    n = len(images)
    convs = sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    tensors = conv_inputs(fp32, convs)
    tails = graph_channel_tails(fp32, list(tensors.values()), stacked(images, 8), images=n, percentile=99.9)
    sites = default_sites(model) if alpha is not None else []
    scales = {c: None for c in convs}
    if sites:
        maxima = {s.name: tails[tensors[s.measure]].channel_max()[:s.channels] for s in sites}
        measured = graph_channel_ranges(fp32, sites, images)
        for s in sites:
            torch.testing.assert_close(maxima[s.name], measured[s.name], rtol=0, atol=0)
        result = equalize(model, [], alpha, sites, ranges=maxima)
        scales = input_scales(model, sites, result.scales)
        assert any(bool((v != 1).any()) for v in scales.values())
    one_pass = {f"{c}:in": tails[tensors[c]].percentile(scales[c]) for c in convs}
    equalized = export_onnx(WithActivation(model), ShapeSpec(3, 1, (32, 32)))
    direct = graph_sim_ranges(equalized, convs, stacked(images, 8), images=n, percentile=99.9)
    assert one_pass.keys() == direct.keys()
    for k, v in direct.items():
        assert one_pass[k] == pytest.approx(v, rel=2e-5, abs=1e-6), k
