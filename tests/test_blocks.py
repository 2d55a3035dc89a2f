"""Building blocks: output shapes over several configurations, and every bad argument refused."""

from __future__ import annotations

import pytest
import torch

from resunetpp.blocks import ASPP, AttentionBlock, ResidualBlock, SqueezeExcitation, StemBlock

pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# (block factory, input shapes, expected output shape)
SHAPES = [
    ("se 16/8", lambda: SqueezeExcitation(16, 8), [(2, 16, 8, 8)], (2, 16, 8, 8)),
    ("se 8/8", lambda: SqueezeExcitation(8, 8), [(1, 8, 5, 7)], (1, 8, 5, 7)),
    ("se 12/4", lambda: SqueezeExcitation(12, 4), [(3, 12, 1, 1)], (3, 12, 1, 1)),
    ("stem 3->16 s1", lambda: StemBlock(3, 16), [(2, 3, 32, 32)], (2, 16, 32, 32)),
    ("stem 1->8 s2", lambda: StemBlock(1, 8, stride=2), [(1, 1, 16, 24)], (1, 8, 8, 12)),
    ("res 16->32 s2", lambda: ResidualBlock(16, 32, stride=2), [(2, 16, 32, 32)], (2, 32, 16, 16)),
    ("res 8->8 s1", lambda: ResidualBlock(8, 8), [(1, 8, 8, 16)], (1, 8, 8, 16)),
    ("res 24->16 s1 r4", lambda: ResidualBlock(24, 16, 1, se_reduction=4), [(2, 24, 8, 8)], (2, 16, 8, 8)),
    ("res odd s2", lambda: ResidualBlock(8, 16, stride=2), [(1, 8, 7, 9)], (1, 16, 4, 5)),
    ("aspp 16->32", lambda: ASPP(16, 32), [(2, 16, 8, 8)], (2, 32, 8, 8)),
    ("aspp 1 rate", lambda: ASPP(8, 4, rates=(2,)), [(1, 8, 5, 5)], (1, 4, 5, 5)),
    ("aspp tiny map", lambda: ASPP(8, 8), [(1, 8, 1, 1)], (1, 8, 1, 1)),
    ("attention 8/16", lambda: AttentionBlock(8, 16), [(2, 8, 16, 16), (2, 16, 8, 8)], (2, 16, 8, 8)),
    ("attention 32/8 rect", lambda: AttentionBlock(32, 8), [(1, 32, 8, 12), (1, 8, 4, 6)], (1, 8, 4, 6)),
    ("attention sigmoid", lambda: AttentionBlock(4, 8, gate="sigmoid"), [(1, 4, 4, 4), (1, 8, 2, 2)], (1, 8, 2, 2)),
]


@pytest.mark.parametrize("factory,inputs,expected", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_output_shape(factory, inputs, expected) -> None:
    block = factory().eval()
    out = block(*(torch.randn(s) for s in inputs))
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()


# (factory with a bad argument, the constraint the message must name)
BAD = [
    ("se channels 0", lambda: SqueezeExcitation(0), "channels must be a positive integer"),
    ("se reduction 0", lambda: SqueezeExcitation(16, 0), "reduction must be a positive integer"),
    ("se too narrow", lambda: SqueezeExcitation(4, 8), r"channels // reduction must be >= 1"),
    ("se float", lambda: SqueezeExcitation(16.0), "channels must be a positive integer"),
    ("se bool", lambda: SqueezeExcitation(True), "channels must be a positive integer"),
    ("stem stride 3", lambda: StemBlock(3, 16, stride=3), "stride must be 1 or 2"),
    ("stem in 0", lambda: StemBlock(0, 16), "in_channels must be a positive integer"),
    ("stem out -1", lambda: StemBlock(3, -1), "out_channels must be a positive integer"),
    ("res stride 0", lambda: ResidualBlock(8, 8, stride=0), "stride must be 1 or 2"),
    ("res se 0", lambda: ResidualBlock(8, 8, se_reduction=0), "se_reduction must be a positive integer"),
    ("res narrow se", lambda: ResidualBlock(8, 4), r"channels // reduction must be >= 1"),
    ("aspp no rates", lambda: ASPP(8, 8, rates=()), "at least one dilation rate"),
    ("aspp rate 0", lambda: ASPP(8, 8, rates=(1, 0)), "each dilation rate must be a positive integer"),
    ("aspp out 0", lambda: ASPP(8, 0), "out_channels must be a positive integer"),
    ("attention skip 0", lambda: AttentionBlock(0, 8), "skip_channels must be a positive integer"),
    ("attention decoder 0", lambda: AttentionBlock(8, 0), "decoder_channels must be a positive integer"),
    ("attention gate", lambda: AttentionBlock(8, 8, gate="relu"), "gate must be one of"),
]


@pytest.mark.parametrize("factory,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_argument_raises_value_error(factory, message) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize("g_shape,x_shape", [((1, 8, 16, 16), (1, 8, 16, 16)), ((1, 8, 16, 16), (1, 8, 4, 8)),
                                             ((1, 8, 15, 16), (1, 8, 8, 8))])
def test_attention_refuses_mismatched_sizes(g_shape, x_shape) -> None:
    block = AttentionBlock(8, 8)
    with pytest.raises(ValueError, match="exactly twice the size"):
        block(torch.randn(g_shape), torch.randn(x_shape))


def test_se_only_scales_channels_down() -> None:
    se = SqueezeExcitation(16, 8).eval()
    x = torch.randn(2, 16, 6, 6)
    y = se(x)
    ratio = y / x  # one gate per (image, channel), in (0, 1)
    gate = ratio[:, :, :1, :1]
    assert torch.allclose(ratio, gate.expand_as(ratio), atol=1e-5)
    assert ((gate > 0) & (gate < 1)).all()


def test_attention_default_is_the_unbounded_product_and_sigmoid_variant_is_bounded() -> None:
    g, x = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)
    plain = AttentionBlock(4, 8).eval()
    gated = AttentionBlock(4, 8, gate="sigmoid").eval()
    gated.load_state_dict(plain.state_dict())
    a = plain.out_conv(plain.skip_conv(g) + plain.x_conv(x))
    assert torch.allclose(plain(g, x), a * x, atol=1e-6)
    assert torch.allclose(gated(g, x), torch.sigmoid(a) * x, atol=1e-6)
    assert (gated(g, x).abs() <= x.abs() + 1e-6).all()


def test_aspp_sums_its_branches() -> None:
    aspp = ASPP(4, 6, rates=(1, 2)).eval()
    x = torch.randn(1, 4, 9, 9)
    expected = aspp.project(aspp.branches[0](x) + aspp.branches[1](x))
    assert torch.allclose(aspp(x), expected, atol=1e-6)
    assert [b[0].dilation for b in aspp.branches] == [(1, 1), (2, 2)]


def test_residual_shortcut_is_projected_and_blocks_are_pre_activation() -> None:
    block = ResidualBlock(8, 16, stride=2)
    assert isinstance(block.body[0], torch.nn.BatchNorm2d) and isinstance(block.body[1], torch.nn.ReLU)
    assert block.shortcut[0].kernel_size == (1, 1) and block.shortcut[0].stride == (2, 2)
    stem = StemBlock(3, 8)
    assert isinstance(stem.body[0], torch.nn.Conv2d)  # no pre-activation on the raw image
