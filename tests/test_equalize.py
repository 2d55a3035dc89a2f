"""Cross-layer equalization: same FP32 function, equal channel ranges, every site found."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from resunetpp.export.equalize import channel_ranges, equalize, resunetpp_sites
from resunetpp.export.quantize import QDQRecipe
from resunetpp.errors import ResUNetError
from resunetpp.model import ModelConfig, ResUNetPlusPlus

CONFIG = ModelConfig(filters=(8, 16, 16, 32), bridge=32)


def _model(architecture: str = "resunetpp", seed: int = 0) -> ResUNetPlusPlus:
    """A model whose BatchNorms carry non-trivial statistics, so rescaling them is tested."""
    torch.manual_seed(seed)
    model = ResUNetPlusPlus(CONFIG if architecture == "resunetpp"
                            else ModelConfig(**{**CONFIG.to_dict(), "architecture": architecture}))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def _batches(seed: int = 1, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, 3, 32, 32)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("architecture", ["resunetpp", "resunetpp-sigmoid-attention"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_equalization_keeps_the_fp32_function(architecture, alpha):
    model = _model(architecture)
    x = torch.as_tensor(_batches(seed=7, n=1)[0])
    with torch.no_grad():
        before = model(x)
    result = equalize(model, _batches(), alpha)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert len(result.sites) == len(set(result.sites))
    # The sigmoid-gated variant's attention product is not homogeneous in the gate: those sites are left out.
    assert len(result.sites) == (33 if architecture == "resunetpp" else 30)


def test_alpha_one_gives_every_channel_of_every_site_the_same_range():
    model = _model()
    batches = _batches()
    sites = resunetpp_sites(model)
    before = channel_ranges(model, sites, batches)
    result = equalize(model, batches, 1.0, sites=sites)
    after = channel_ranges(model, sites, batches)
    spread_before = [float(r.min() / r.max()) for r in before.values()]
    for name, r in after.items():
        live = before[name] > 1e-6 * before[name].max()
        torch.testing.assert_close(r[live], torch.ones_like(r[live]), rtol=1e-3, atol=0, msg=name)
    assert min(spread_before) < 0.2  # there was something to equalize
    lo, hi = result.median_channel_range["head:input"]
    assert hi == pytest.approx(1.0, abs=1e-3) and lo < 1.0


def test_every_convolution_input_that_is_not_the_image_is_equalized():
    model = _model()
    measured = {s.measure for s in resunetpp_sites(model)}
    readers = {r.module for s in resunetpp_sites(model) for r in s.readers}
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    image_convs = {"stem.body.0", "stem.shortcut.0"}
    assert convs - image_convs <= readers  # every conv reading a feature map gets rescaled weights
    assert measured <= convs


def test_alpha_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        equalize(copy.deepcopy(_model()), _batches(), 1.5)
    with pytest.raises(ResUNetError, match=r"equalization alpha must be in \[0, 1\]"):
        QDQRecipe(equalize_alpha=-0.1)


# ---- bias correction ------------------------------------------------------------------------------------
def _conv_means(model, convs: dict, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    means: dict[str, torch.Tensor] = {}
    handles = [c.register_forward_hook(lambda _m, _a, out, n=n: means.__setitem__(
        n, means.get(n, 0) + out.detach().mean(dim=(0, 2, 3)) / len(xs))) for n, c in convs.items()]
    with torch.no_grad():
        for x in xs:
            model(x)
    for h in handles:
        h.remove()
    return means


def _int8_mean_shift(model: ResUNetPlusPlus, ref: ResUNetPlusPlus, batches: list[np.ndarray]) -> float:
    """Sum over convolutions of the largest per-channel |mean(simulated INT8 out) - mean(FP32 out)|."""
    from resunetpp.export.quantsim import QuantSim

    xs = [torch.as_tensor(b) for b in batches]
    reference = _conv_means(ref, {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Conv2d)}, xs)
    sim = QuantSim(model)
    sim.observe(len(xs))
    with torch.no_grad():
        for x in xs:
            model(x)
    sim.freeze()
    try:
        means = _conv_means(model, sim.convs, xs)
    finally:
        sim.remove()
    return sum(float((means[n] - reference[n]).abs().max()) for n in means)


def test_bias_correction_removes_the_int8_mean_shift():
    from resunetpp.export.bias_correction import bias_correct

    ref = _model(seed=3)
    batches = _batches(seed=5, n=4)
    before = _int8_mean_shift(copy.deepcopy(ref), ref, batches)
    corrected = copy.deepcopy(ref)
    record = bias_correct(corrected, batches, images=4)
    after = _int8_mean_shift(corrected, ref, batches)
    assert record["convolutions"] == sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules())
    assert after < 0.5 * before, (before, after)
    with pytest.raises(ValueError, match="images must be >= 1"):
        bias_correct(copy.deepcopy(ref), batches, images=0)
    # convolutions kept in float are simulated in float and keep their biases
    kept = ("stem.body.0", "stem.shortcut.0")
    partial = copy.deepcopy(ref)
    record = bias_correct(partial, batches, images=2, keep_modules=kept)
    assert record["convolutions"] == sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules()) - 2
    for name in kept:
        before, after = ref.get_submodule(name).bias, partial.get_submodule(name).bias.detach()
        assert torch.equal(after, torch.zeros_like(after) if before is None else before.detach()), name


def test_a_site_that_is_all_zero_keeps_its_scale_and_the_function():
    model = _model()
    with torch.no_grad():  # the stem's BatchNorm outputs 0, so stem.body.3 reads an all-zero tensor
        model.stem.body[1].weight.zero_()
        model.stem.body[1].bias.zero_()
    x = torch.as_tensor(_batches(seed=9, n=1)[0])
    with torch.no_grad():
        before = model(x)
    weight = model.stem.body[3].weight.detach().clone()
    result = equalize(model, _batches(), 0.8)
    assert result.median_channel_range["stem.body.3:input"] == (0.0, 0.0)
    # s = 1 on its input channels: the conv's weights only changed per *output* channel (another site's scale)
    ratio = (model.stem.body[3].weight.detach() / weight).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=6, dilation=6),
    dict(kernel_size=1, stride=2, padding=0),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(2, 0)),
    dict(kernel_size=5, stride=3, padding=0),
])
def test_window_sums_give_the_convolutions_mean(geometry, layout):
    """The bias correction's float reference, a convolution's output mean over images and positions,
    from its input's window sums (bias + sum(weight * S) / positions) without computing it: equal to the
    convolution's own mean, whatever the stride, dilation, padding, kernel shape and memory layout."""
    from resunetpp.export.bias_correction import linear_mean, window_sums

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, **geometry).double()
    x = torch.randn(3, 5, 19, 22, dtype=torch.float64) + 0.7
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    out = conv(x)
    positions = out.shape[0] * out.shape[2] * out.shape[3]
    got = conv.bias + torch.einsum("ocij,cij->o", conv.weight, window_sums(conv, x)) / positions
    assert linear_mean(conv)
    torch.testing.assert_close(got, out.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    assert not linear_mean(torch.nn.Conv2d(4, 4, 3, groups=2)) and not linear_mean(torch.nn.Conv2d(4, 4, 3, padding="same"))
    assert not linear_mean(torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


def test_the_fast_fake_quantization_is_pytorchs_bit_for_bit():
    """``quantsim.fake_quantize`` (the bias correction's simulation, no gradient) returns exactly the
    values, and zero signs, of ``torch.fake_quantize_per_tensor_affine``: random values, values near the
    rounding ties, saturated ones and small negatives (which round to zero), NCHW and NHWC."""
    from resunetpp.export.quantsim import QMAX, QMIN, fake_quantize

    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1 / 127, 0.0372, 12.05 / 127, 1e-8, 0.5):
        s32 = float(np.float32(scale))
        cases = [torch.randn(2, 6, 16, 16, generator=g) * scale * 80,
                 (torch.randint(-140, 140, (2, 6, 16, 16), generator=g).float() + 0.5) * s32,
                 -torch.rand(2, 6, 16, 16, generator=g) * s32 * 0.49]
        cases.append(cases[0].contiguous(memory_format=torch.channels_last))
        for x in cases:
            want = torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)
            got = fake_quantize(x, scale)
            assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want)), scale


def test_the_exports_equalization_check_uses_the_reference_and_refuses_a_changed_function():
    """The export checks the equalized model against the FP32 reference it already holds (one model run,
    channels-last, one batch per input shape): the equalized model passes and the record says against
    what; a model computing another function is refused with the --no-equalize hint."""
    import contextlib
    import types

    from resunetpp.errors import ResUNetError
    from resunetpp.export.equalize import default_sites, equalize
    from resunetpp.export.inputs import VerificationSet
    from resunetpp.export.int8_source import EQUALIZATION_CHECK_IMAGES, _check_equalized
    from resunetpp.model import WithActivation

    original = _model()
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(3, 32, 32)).astype(np.float32) for _ in range(3)]
    inputs += [rng.normal(size=(3, 48, 32)).astype(np.float32) for _ in range(3)]  # a second input shape
    with torch.no_grad():
        reference = [WithActivation(original).eval()(torch.from_numpy(x[None]))[0].numpy() for x in inputs]
    vset = VerificationSet.__new__(VerificationSet)
    vset.inputs, vset.reference, vset.reference_record = inputs, reference, {"reference": "PyTorch FP32 (test)"}
    run = types.SimpleNamespace(vset=vset, equalization_record={"alpha": 0.5},
                                r=types.SimpleNamespace(task=lambda label: contextlib.nullcontext()))
    equalized = _model()
    equalize(equalized, [], 0.5, default_sites(equalized),
             ranges={s.name: torch.rand(s.channels) + 0.1 for s in default_sites(equalized)})
    _check_equalized(run, equalized)
    rec = run.equalization_record
    assert rec["checked_on_images"] == EQUALIZATION_CHECK_IMAGES and rec["checked_against"] == "PyTorch FP32 (test)"
    assert 0 < rec["fp32_max_abs_difference"] <= 1e-4 and rec["alpha"] == 0.5
    with pytest.raises(ResUNetError, match="equalization changed the FP32 model.*--no-equalize"):
        _check_equalized(run, _model(seed=9))
