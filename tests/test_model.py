"""The whole model: parameter count, heads, accepted sizes, config, and the official-port weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resunetpp import ModelConfig, ResUNetPlusPlus, WithActivation, count_parameters
from resunetpp.checkpoint import load_checkpoint
from resunetpp.errors import CheckpointError
from resunetpp.model import SIZE_MULTIPLE, map_official_state_dict

pytestmark = pytest.mark.usefixtures("torch_threads")

TINY = ModelConfig(filters=(8, 8, 16, 16), bridge=16)


def test_default_is_the_official_configuration_with_4062993_parameters() -> None:
    model = ResUNetPlusPlus()
    assert model.config == ModelConfig()
    assert model.config.filters == (16, 32, 64, 128) and model.config.bridge == 256
    assert count_parameters(model) == 4_062_993
    assert model.activation == "sigmoid"


@pytest.mark.parametrize("config,size", [
    (TINY, (32, 32)),
    (TINY, (8, 8)),
    (TINY, (24, 40)),
    (ModelConfig(in_channels=1, num_classes=3, filters=(8, 16, 16, 24), bridge=32), (16, 48)),
    (ModelConfig(filters=(8, 8, 16, 16), bridge=8, se_reduction=4, aspp_rates=(1, 2)), (32, 16)),
    (ModelConfig(filters=(8, 8, 16, 16), bridge=16, architecture="resunetpp-sigmoid-attention"), (32, 32)),
])
def test_output_has_the_input_size(config: ModelConfig, size: tuple[int, int]) -> None:
    model = ResUNetPlusPlus(config).eval()
    x = torch.randn(2, config.in_channels, *size)
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (2, config.num_classes, *size)


def test_binary_head_is_a_sigmoid_in_0_1() -> None:
    torch.manual_seed(0)
    model = ResUNetPlusPlus(TINY).eval()
    x = torch.randn(2, 3, 32, 32) * 3
    with torch.no_grad():
        probs = WithActivation(model)(x)
        logits = model(x)
    assert model.activation == "sigmoid"
    assert ((probs >= 0) & (probs <= 1)).all()
    assert torch.allclose(probs, torch.sigmoid(logits))
    assert torch.allclose(model.probabilities(x), probs)


@pytest.mark.parametrize("classes", [2, 4])
def test_multiclass_head_is_a_softmax_summing_to_1(classes: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig(num_classes=classes, filters=(8, 8, 16, 16), bridge=16)
    model = ResUNetPlusPlus(config).eval()
    with torch.no_grad():
        probs = WithActivation(model)(torch.randn(2, 3, 16, 16))
    assert config.activation == "softmax"
    assert probs.shape == (2, classes, 16, 16)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert torch.allclose(probs.sum(1), torch.ones(2, 16, 16), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 30, 32), (1, 3, 32, 36), (1, 3, 7, 7), (1, 3, 0, 8)])
def test_sizes_not_multiple_of_8_are_refused(shape) -> None:
    model = ResUNetPlusPlus(TINY)
    with pytest.raises(ValueError, match=f"multiples of {SIZE_MULTIPLE}"):
        model(torch.randn(shape))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32)])
def test_wrong_rank_or_channels_are_refused(shape) -> None:
    with pytest.raises(ValueError, match=r"input must be \(N, 3, H, W\)"):
        ResUNetPlusPlus(TINY)(torch.randn(shape))


@pytest.mark.parametrize("kwargs,message", [
    ({"filters": (16, 32, 64)}, "filters must hold 4 widths"),
    ({"filters": (16, 32, 0, 64)}, "each filter width must be a positive integer"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"in_channels": 0}, "in_channels must be a positive integer"),
    ({"bridge": -8}, "bridge must be a positive integer"),
    ({"architecture": "unet"}, "architecture must be one of"),
])
def test_bad_config_raises_value_error(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_config_round_trip_and_unknown_keys() -> None:
    config = ModelConfig(in_channels=1, num_classes=3, filters=(8, 8, 16, 16), bridge=16, aspp_rates=(1, 3))
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="either a ModelConfig or keyword overrides"):
        ResUNetPlusPlus(config, bridge=8)
    assert ResUNetPlusPlus(num_classes=2, filters=(8, 8, 16, 16), bridge=16).config.num_classes == 2


# --------------------------------------------------------------------------------------------
# The authors' official PyTorch port (DebeshJha/ResUNetPlusPlus, resunet++_pytorch.py), written
# out by hand from its module layout -- independent of resunetpp.model's mapping table.
# --------------------------------------------------------------------------------------------
def _conv(sd: dict, key: str, cin: int, cout: int, k: int, bias: bool = True) -> None:
    sd[f"{key}.weight"] = torch.randn(cout, cin, k, k) * (1.0 / (cin * k * k)) ** 0.5
    if bias:
        sd[f"{key}.bias"] = torch.randn(cout) * 0.05


def _bn(sd: dict, key: str, c: int) -> None:
    sd[f"{key}.weight"] = 1 + 0.1 * torch.randn(c)
    sd[f"{key}.bias"] = 0.1 * torch.randn(c)
    sd[f"{key}.running_mean"] = 0.1 * torch.randn(c)
    sd[f"{key}.running_var"] = 0.5 + torch.rand(c)
    sd[f"{key}.num_batches_tracked"] = torch.tensor(100)


def _se(sd: dict, key: str, c: int) -> None:  # Squeeze_Excitation: self.net = Linear, ReLU, Linear, Sigmoid
    sd[f"{key}.net.0.weight"] = torch.randn(c // 8, c) * c ** -0.5
    sd[f"{key}.net.2.weight"] = torch.randn(c, c // 8) * (c // 8) ** -0.5


def _stem(sd: dict, p: str, cin: int, cout: int) -> None:  # Stem_Block
    _conv(sd, f"{p}.c1.0", cin, cout, 3), _bn(sd, f"{p}.c1.1", cout), _conv(sd, f"{p}.c1.3", cout, cout, 3)
    _conv(sd, f"{p}.c2.0", cin, cout, 1), _bn(sd, f"{p}.c2.1", cout)
    _se(sd, f"{p}.attn", cout)


def _resnet(sd: dict, p: str, cin: int, cout: int) -> None:  # ResNet_Block
    _bn(sd, f"{p}.c1.0", cin), _conv(sd, f"{p}.c1.2", cin, cout, 3)
    _bn(sd, f"{p}.c1.3", cout), _conv(sd, f"{p}.c1.5", cout, cout, 3)
    _conv(sd, f"{p}.c2.0", cin, cout, 1), _bn(sd, f"{p}.c2.1", cout)
    _se(sd, f"{p}.attn", cout)


def _aspp(sd: dict, p: str, cin: int, cout: int) -> None:  # ASPP: c1..c4 (conv, BN), c5 conv1x1
    for k in range(1, 5):
        _conv(sd, f"{p}.c{k}.0", cin, cout, 3), _bn(sd, f"{p}.c{k}.1", cout)
    _conv(sd, f"{p}.c5", cout, cout, 1)


def _decoder(sd: dict, p: str, cg: int, cx: int, cout: int) -> None:  # Decoder_Block([cg, cx], cout)
    _bn(sd, f"{p}.a1.g_conv.0", cg), _conv(sd, f"{p}.a1.g_conv.2", cg, cx, 3)
    _bn(sd, f"{p}.a1.x_conv.0", cx), _conv(sd, f"{p}.a1.x_conv.2", cx, cx, 3)
    _bn(sd, f"{p}.a1.gc_conv.0", cx), _conv(sd, f"{p}.a1.gc_conv.2", cx, cx, 3)
    _resnet(sd, f"{p}.r1", cg + cx, cout)


def official_state_dict(f=(16, 32, 64, 128), bridge=256, classes=1, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _stem(sd, "c1", 3, f[0])
    _resnet(sd, "c2", f[0], f[1]), _resnet(sd, "c3", f[1], f[2]), _resnet(sd, "c4", f[2], f[3])
    _aspp(sd, "b1", f[3], bridge)
    _decoder(sd, "d1", f[2], bridge, f[3]), _decoder(sd, "d2", f[1], f[3], f[2]), _decoder(sd, "d3", f[0], f[2], f[1])
    _aspp(sd, "aspp", f[1], f[0])
    _conv(sd, "output", f[0], classes, 1)
    return sd


def official_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """build_resunetplusplus.forward in functional form, reading the official keys directly."""

    def conv(key, t, stride=1, padding=0, dilation=1):
        return F.conv2d(t, sd[f"{key}.weight"], sd.get(f"{key}.bias"), stride, padding, dilation)

    def bn(key, t):
        return F.batch_norm(t, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                            sd[f"{key}.bias"], False, 0.0, 1e-5)

    def se(key, t):
        w = torch.sigmoid(F.relu(t.mean((2, 3)) @ sd[f"{key}.net.0.weight"].T) @ sd[f"{key}.net.2.weight"].T)
        return t * w[:, :, None, None]

    def stem(p, t):
        a = conv(f"{p}.c1.3", F.relu(bn(f"{p}.c1.1", conv(f"{p}.c1.0", t, 1, 1))), 1, 1)
        return se(f"{p}.attn", a + bn(f"{p}.c2.1", conv(f"{p}.c2.0", t)))

    def resnet(p, t, stride):
        a = conv(f"{p}.c1.2", F.relu(bn(f"{p}.c1.0", t)), stride, 1)
        a = conv(f"{p}.c1.5", F.relu(bn(f"{p}.c1.3", a)), 1, 1)
        return se(f"{p}.attn", a + bn(f"{p}.c2.1", conv(f"{p}.c2.0", t, stride)))

    def aspp(p, t):
        y = sum(bn(f"{p}.c{k}.1", conv(f"{p}.c{k}.0", t, 1, r, r)) for k, r in zip(range(1, 5), (1, 6, 12, 18)))
        return conv(f"{p}.c5", y)

    def decoder(p, g, t):
        gp = F.max_pool2d(conv(f"{p}.a1.g_conv.2", F.relu(bn(f"{p}.a1.g_conv.0", g)), 1, 1), 2)
        xc = conv(f"{p}.a1.x_conv.2", F.relu(bn(f"{p}.a1.x_conv.0", t)), 1, 1)
        a = conv(f"{p}.a1.gc_conv.2", F.relu(bn(f"{p}.a1.gc_conv.0", gp + xc)), 1, 1) * t
        d = torch.cat([F.interpolate(a, scale_factor=2, mode="nearest"), g], 1)
        return resnet(f"{p}.r1", d, 1)

    c1 = stem("c1", x)
    c2 = resnet("c2", c1, 2)
    c3 = resnet("c3", c2, 2)
    c4 = resnet("c4", c3, 2)
    d = decoder("d3", c1, decoder("d2", c2, decoder("d1", c3, aspp("b1", c4))))
    return conv("output", aspp("aspp", d))


def _trainable(sd: dict) -> int:
    return sum(v.numel() for k, v in sd.items() if k.endswith((".weight", ".bias")))


def test_official_layout_has_the_same_parameter_count() -> None:
    assert _trainable(official_state_dict()) == 4_062_993


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "dataparallel"])
def test_official_port_weights_load_and_compute_the_same(tmp_path: Path, wrap: str) -> None:
    sd = official_state_dict(seed=1)
    obj = {"bare": sd, "state_dict": {"state_dict": sd},
           "dataparallel": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = tmp_path / "official.pt"
    torch.save(obj, path)

    ckpt = load_checkpoint(path)
    assert ckpt.config == ModelConfig()  # widths and classes read off the weight shapes
    model = ckpt.build_model().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        ref = official_forward({k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, x)
    assert ours.shape == ref.shape == (2, 1, 32, 32)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_official_port_other_widths_and_classes(tmp_path: Path) -> None:
    sd = official_state_dict(f=(8, 16, 16, 24), bridge=32, classes=3, seed=2)
    torch.save(sd, tmp_path / "w.pth")
    ckpt = load_checkpoint(tmp_path / "w.pth")
    assert ckpt.config.filters == (8, 16, 16, 24) and ckpt.config.bridge == 32 and ckpt.config.num_classes == 3
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = official_forward({k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, x)
        assert torch.allclose(ckpt.build_model().double()(x), ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_official_mapping_covers_every_key_exactly_once() -> None:
    sd = official_state_dict()
    mapped = map_official_state_dict(sd)
    assert len(mapped) == len(sd)
    assert set(mapped) == set(ResUNetPlusPlus().state_dict())


def test_official_port_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    sd = official_state_dict(f=(8, 8, 16, 16), bridge=16)
    sd["d1.a1.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: official-port weights with an unknown key"):
        load_checkpoint(tmp_path / "bad.pt")
