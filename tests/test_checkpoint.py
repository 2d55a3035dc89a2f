"""Checkpoints: round trips (safetensors, .pt, fp16 storage) and every kind of bad file refused."""

from __future__ import annotations

import builtins
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from resunetpp.checkpoint import Checkpoint, file_sha256, load_checkpoint, save_checkpoint
from resunetpp.errors import CheckpointError
from resunetpp.model import ModelConfig, ResUNetPlusPlus
from resunetpp.preprocess import Preprocessing

pytestmark = pytest.mark.usefixtures("torch_threads")

TINY = ModelConfig(filters=(8, 8, 16, 16), bridge=16)


def _model(config: ModelConfig = TINY, seed: int = 0) -> ResUNetPlusPlus:
    torch.manual_seed(seed)
    model = ResUNetPlusPlus(config)
    # Non-trivial BatchNorm statistics so a lost buffer would show in the outputs.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _ckpt(model: ResUNetPlusPlus) -> Checkpoint:
    return Checkpoint(model.config, model.state_dict(), Preprocessing(size=(32, 48), mode="pad"),
                      ["polyp"] if model.config.num_classes == 1 else ["bg", "a", "b"],
                      {"epochs_completed": 3, "note": "test"})


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model(torch.randn(2, model.config.in_channels, 32, 32))


@pytest.mark.parametrize("config", [TINY, ModelConfig(in_channels=1, num_classes=3, filters=(8, 8, 16, 16), bridge=8)])
def test_safetensors_round_trip(tmp_path: Path, config: ModelConfig) -> None:
    model = _model(config)
    path = save_checkpoint(_ckpt(model), tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert loaded.metadata() == _ckpt(model).metadata()
    assert loaded.preprocessing == Preprocessing(size=(32, 48), mode="pad")
    assert loaded.sha256 == file_sha256(path) and len(loaded.sha256) == 64
    assert loaded.path == path
    assert torch.equal(_outputs(loaded.build_model()), _outputs(model))
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("layout", ["config", "bare"])
def test_torch_pt_round_trip(tmp_path: Path, layout: str) -> None:
    model = _model()
    sd = model.state_dict()
    obj = {"state_dict": sd, "config": TINY.to_dict()} if layout == "config" else sd
    torch.save(obj, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == TINY  # from the record, or read off the weight shapes
    assert torch.equal(_outputs(loaded.build_model()), _outputs(model))


def test_fp16_storage_halves_the_file_and_keeps_the_outputs(tmp_path: Path) -> None:
    model = _model(ModelConfig())
    full = save_checkpoint(_ckpt(model), tmp_path / "fp32.safetensors")
    half = save_checkpoint(_ckpt(model), tmp_path / "fp16.safetensors", dtype=torch.float16)
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.56, ratio
    with safe_open(str(half), framework="pt") as f:
        meta = json.loads(f.metadata()["resunetpp"])
        assert meta["stored_dtype"] == "float16"
        assert f.get_tensor("stem.body.0.weight").dtype == torch.float16
        assert f.get_tensor("stem.body.1.running_var").dtype == torch.float32  # tiny variances stay exact
        assert f.get_tensor("stem.body.1.num_batches_tracked").dtype == torch.int64
    loaded = load_checkpoint(half)
    assert all(v.dtype != torch.float16 for v in loaded.state_dict.values())  # computed in fp32
    ref = _outputs(model)
    out = _outputs(loaded.build_model())
    assert not torch.equal(out, ref)  # it really was rounded ...
    assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))  # ... and still the same model


# ---- bad files: each gets one line naming the file and the problem -------------------------------
def _expect(path: Path, pattern: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    return info.value


def test_missing_and_empty_files(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.safetensors", "checkpoint not found")
    (tmp_path / "empty.pt").write_bytes(b"")
    _expect(tmp_path / "empty.pt", "file is empty")
    (tmp_path / "dir.pt").mkdir()
    _expect(tmp_path / "dir.pt", "checkpoint not found")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    model = _model()
    src = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": model.state_dict(), "config": TINY.to_dict()}, src)
    else:
        save_checkpoint(_ckpt(model), src)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _expect(cut, "not a valid safetensors file" if suffix == ".safetensors" else "not a PyTorch checkpoint")


@pytest.mark.parametrize("suffix,pattern", [(".safetensors", "not a valid safetensors file"),
                                            (".pt", "not a PyTorch checkpoint"),
                                            (".pth", "not a PyTorch checkpoint")])
def test_text_file(tmp_path: Path, suffix: str, pattern: str) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are not weights\n" * 20)
    _expect(path, pattern)


def test_safetensors_of_another_tool(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    _expect(path, "no resunetpp record")
    save_file({"w": torch.zeros(3)}, str(path), metadata={"resunetpp": "{not json"})
    _expect(path, "record is not valid JSON")
    save_file({"w": torch.zeros(3)}, str(path), metadata={"resunetpp": json.dumps({"model": {"filters": [1]}})})
    _expect(path, "invalid config record")


def test_missing_key(tmp_path: Path) -> None:
    sd = _model().state_dict()
    del sd["decoder2.attention.x_conv.2.weight"]
    save_checkpoint(Checkpoint(TINY, sd), tmp_path / "m.safetensors")
    err = _expect(tmp_path / "m.safetensors", "1 missing key")
    assert "decoder2.attention.x_conv.2.weight" in str(err)


def test_extra_key(tmp_path: Path) -> None:
    sd = dict(_model().state_dict())
    sd["head.extra"] = torch.zeros(2)
    torch.save({"state_dict": sd, "config": TINY.to_dict()}, tmp_path / "m.pt")
    _expect(tmp_path / "m.pt", "1 unexpected key.*head.extra")


def test_wrong_shape(tmp_path: Path) -> None:
    sd = dict(_model().state_dict())
    sd["head.weight"] = torch.zeros(1, 8, 3, 3)
    save_checkpoint(Checkpoint(TINY, sd), tmp_path / "m.safetensors")
    _expect(tmp_path / "m.safetensors", r"weight 'head.weight' has shape \(1, 8, 3, 3\), the model expects \(1, 8, 1, 1\)")


def test_weights_of_another_width(tmp_path: Path) -> None:
    other = _model(ModelConfig(filters=(16, 16, 32, 32), bridge=32))
    save_checkpoint(Checkpoint(TINY, other.state_dict()), tmp_path / "m.safetensors")  # record says TINY
    _expect(tmp_path / "m.safetensors", "has shape .* the model expects .*another architecture or width")


def test_non_tensor_values(tmp_path: Path) -> None:
    torch.save({"state_dict": {"stem.body.0.weight": [1, 2, 3]}}, tmp_path / "m.pt")
    _expect(tmp_path / "m.pt", "non-tensor values")
    torch.save([torch.zeros(1)], tmp_path / "l.pt")
    _expect(tmp_path / "l.pt", "expected a dict of weights, found list")


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: proof that a loader executed file content."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": {"stem.body.0.weight": torch.zeros(1)}, "hook": _Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    # Sanity: the payload works when unpickled unsafely (in a copy, so the real marker stays absent).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    err = _expect(path, "refused|not a PyTorch checkpoint")
    assert not marker.exists(), "the checkpoint loader executed code from the file"
    assert "evil.pt" in str(err)


def test_dataparallel_prefix_in_our_naming(tmp_path: Path) -> None:
    model = _model()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    loaded = load_checkpoint(tmp_path / "dp.pt")
    assert loaded.config == TINY
    assert torch.equal(_outputs(loaded.build_model()), _outputs(model))


def test_bare_state_dict_missing_an_architecture_key(tmp_path: Path) -> None:
    sd = dict(_model().state_dict())
    del sd["encoder1.body.2.weight"]
    torch.save(sd, tmp_path / "m.pt")
    _expect(tmp_path / "m.pt", "cannot infer the architecture: key 'encoder1.body.2.weight' missing")


def test_record_that_is_not_a_mapping(tmp_path: Path) -> None:
    torch.save({"state_dict": _model().state_dict(), "resunetpp": "[1, 2]"}, tmp_path / "m.pt")
    _expect(tmp_path / "m.pt", "record is a list, expected a mapping")
    torch.save({"state_dict": _model().state_dict(), "resunetpp": "{oops"}, tmp_path / "m.pt")
    _expect(tmp_path / "m.pt", "record is not valid JSON")
