"""The calibration cache (resunetpp/cache.py) and the batched calibration passes of INT8 export."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from resunetpp import cache
from resunetpp.model import ModelConfig, ResUNetPlusPlus

pytestmark = pytest.mark.usefixtures("torch_threads")

CONFIG = ModelConfig(filters=(8, 8, 16, 16), bridge=16)


# ---- resunetpp.cache ------------------------------------------------------------------------------
def test_cache_round_trip_and_location(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNETPP_CACHE_DIR", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RESUNETPP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "resunetpp"
    key = {"model": "abc", "images": 3}
    arrays = {"a.b:in": np.arange(5, dtype=np.float32), "n": np.int64(7)}
    path = cache.store("demo", key, arrays)
    assert path is not None and path.parent == tmp_path / "xdg" / "resunetpp"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    got = cache.load("demo", key)
    assert set(got) == set(arrays) and np.array_equal(got["a.b:in"], arrays["a.b:in"]) and got["n"] == 7
    assert cache.load("demo", {**key, "images": 4}) is None  # other inputs: another entry, absent
    assert cache.load("other", key) is None


def test_cache_never_trusts_an_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNETPP_CACHE_DIR", str(tmp_path))
    key, other = {"model": "abc"}, {"model": "xyz"}
    warnings: list[str] = []
    # an entry made for other inputs, found under this key's name
    cache.store("demo", other, {"x": np.ones(3)})
    os.replace(cache.entry_path("demo", other), cache.entry_path("demo", key))
    assert cache.load("demo", key, warn=warnings.append) is None
    assert "made for other inputs" in warnings[-1] and str(cache.entry_path("demo", key)) in warnings[-1]
    # garbage bytes
    cache.entry_path("demo", key).write_bytes(b"not a zip")
    assert cache.load("demo", key, warn=warnings.append) is None and "unreadable" in warnings[-1]
    # non-finite values
    cache.store("demo", key, {"x": np.array([1.0, np.nan])})
    assert cache.load("demo", key, warn=warnings.append) is None and "non-finite" in warnings[-1]
    # the caller's own check
    cache.store("demo", key, {"x": np.ones(3)})
    assert cache.load("demo", key, warn=warnings.append, expect=lambda a: "wrong names") is None
    assert "wrong names" in warnings[-1]
    assert all("\n" not in w for w in warnings)  # one line each
    assert cache.load("demo", key)["x"].shape == (3,)


def test_cache_refuses_an_object_array(tmp_path, monkeypatch):
    """An entry holding pickled objects is unreadable with allow_pickle=False: ignored, not executed."""
    monkeypatch.setenv("RESUNETPP_CACHE_DIR", str(tmp_path))
    key = {"model": "abc"}
    path = cache.entry_path("demo", key)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "demo", "key": json.loads(cache._canonical(key)), "arrays": {"x": {"shape": [1], "dtype": "|O"}}}
    with open(path, "wb") as f:
        np.savez(f, x=np.array([{"a": 1}], dtype=object),
                 __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    warnings: list[str] = []
    assert cache.load("demo", key, warn=warnings.append) is None and warnings


# ---- batched passes give the one-image-at-a-time results -------------------------------------------
def _model(seed: int = 0) -> ResUNetPlusPlus:
    torch.manual_seed(seed)
    model = ResUNetPlusPlus(CONFIG)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def _images(n: int = 12, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(n)]


def test_batched_channel_ranges_match_one_image_at_a_time():
    from resunetpp.export.equalize import channel_ranges, default_sites

    model = _model()
    sites = default_sites(model)
    one = channel_ranges(model, sites, _images(), batch=1)
    batched = channel_ranges(model, sites, _images())  # 8 at a time, NHWC
    assert one.keys() == batched.keys()
    for k in one:  # the same maxima up to the convolutions' float rounding
        torch.testing.assert_close(batched[k], one[k], rtol=1e-5, atol=1e-6)
    assert next(model.parameters()).is_contiguous()  # the layout is restored


def test_batched_bias_correction_matches_one_image_at_a_time():
    """Batched, NHWC passes (and ranges given from a cache) correct the biases as the original
    one-image NCHW passes do, within float rounding of the convolutions: 1e-4 of the shifts' scale."""
    from resunetpp.export.bias_correction import bias_correct

    images = _images(12)
    ref, new, replay = _model(3), _model(3), _model(3)
    state_one: dict = {}
    bias_correct(ref, images, 6, batch=1, keep_modules=("head",), state=state_one)
    state: dict = {}
    record = bias_correct(new, images, 6, keep_modules=("head",), state=state)
    assert record["images"] == 6 and record["range_images"] == 12
    assert state["amax"].keys() == state_one["amax"].keys()
    assert any(k.startswith("head") for k in state["amax"])  # ranges for every convolution, kept ones too
    for k, v in state_one["amax"].items():
        assert state["amax"][k] == pytest.approx(v, rel=1e-5)
    scale = max(float(v.abs().max()) for v in state_one["shifts"].values())
    assert scale > 0
    new_params = dict(new.named_parameters())
    for name, a in ref.named_parameters():
        torch.testing.assert_close(new_params[name], a, rtol=0, atol=1e-4 * scale, msg=name)
    # given the ranges, only the correction pass runs, with the same result
    bias_correct(replay, images, 6, keep_modules=("head",), amax=state["amax"])
    replayed = dict(replay.named_parameters())
    for name, a in new.named_parameters():
        torch.testing.assert_close(replayed[name], a, msg=name)


def test_apply_shifts_replays_a_correction():
    from resunetpp.export.bias_correction import apply_shifts, bias_correct

    images = _images(6)
    a, b = _model(5), _model(5)
    state: dict = {}
    bias_correct(a, images, 4, state=state)
    apply_shifts(b, state["shifts"])
    sb = b.state_dict()
    for name, x in a.state_dict().items():
        torch.testing.assert_close(sb[name], x, msg=name)
    with pytest.raises(ValueError, match="does not fit"):
        apply_shifts(copy.deepcopy(b), {"head": torch.zeros(99)})


# ---- the export pipeline with a warm cache ------------------------------------------------------------
class _Tasks:
    """A reporter that records the task labels and warnings."""

    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.warnings: list[str] = []

    def task(self, description, total=None):
        import contextlib

        self.tasks.append(description)
        return contextlib.nullcontext(lambda n=1: None)

    def warn(self, message):
        self.warnings.append(message)

    def info(self, message):
        pass


@pytest.mark.slow
def test_second_export_skips_calibration_and_keep_float_change_reuses_ranges(tmp_path, _private_cache):
    """Second export, same inputs: the calibration pass and the reference come from the cache, and
    the Q/DQ ONNX is the same file. Another keep-float list: the pass's ranges are reused (the bias
    correction runs again at them), and a corrupt entry (the pass's ranges) is ignored with a warning
    and recomputed. (Four tiny exports: about a minute on 2 busy cores.)"""
    import onnx
    from onnx import numpy_helper

    from conftest import make_dataset, tiny_checkpoint
    from resunetpp.export.options import ExportOptions
    from resunetpp.export.pipeline import run_export
    from resunetpp.export.quantize import QDQRecipe

    data = make_dataset(tmp_path / "data", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")

    def export(out: str, keep=("head",)):
        rep = _Tasks()
        opts = ExportOptions(checkpoint=ckpt, out=tmp_path / out, formats=("onnx",), precisions=("int8",),
                             calib=data, eval=data, allow_accuracy_drop=True,
                             qdq=QDQRecipe(keep_modules=keep, bias_correction_images=4))
        run_export(opts, rep)
        graph = onnx.load(str(tmp_path / out / "model_int8_qdq.onnx")).graph
        return rep, {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    cold, first = export("a")
    assert not any("cached" in t for t in cold.tasks)
    assert sum("calibrate: one ONNX Runtime pass" in t for t in cold.tasks) == 1, cold.tasks  # one pass only
    warm, second = export("b")
    cached = [t for t in warm.tasks if "cached" in t]
    for step in ("PyTorch FP32 reference", "the FP32 ONNX graph", "equalization and INT8 ranges", "biases", "ONNX"):
        assert any(step in t for t in cached), (step, warm.tasks)
    assert not any(t.startswith(("calibrate", "load calibration images")) for t in warm.tasks), warm.tasks
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)

    other, _ = export("c", keep=("head", "stem.body.0"))  # keep-float only: the ranges reused, the biases not
    assert any("equalization and INT8 ranges (cached)" in t for t in other.tasks), other.tasks
    assert any("biases" in t and "calibrated ranges" in t for t in other.tasks), other.tasks
    assert not any(t.startswith("calibrate") for t in other.tasks), other.tasks

    for e in _private_cache.glob("one-pass-ranges-*.npz"):  # a corrupt entry: ignored, recomputed
        e.write_bytes(b"garbage")
    again, _ = export("d")
    assert any("one-pass-ranges" in w and "recomputing" in w for w in again.warnings), again.warnings
    assert any("calibrate: one ONNX Runtime pass" in t for t in again.tasks), again.tasks


@pytest.mark.slow
def test_a_tail_too_short_for_its_scales_is_measured_again(tmp_path, monkeypatch):
    """With a headroom so small that some tensors' rescaled tails do not fit, the export measures those
    tensors again with every channel's whole tail: the Q/DQ ONNX is the same file as with no headroom."""
    import onnx
    from onnx import numpy_helper

    from conftest import make_dataset, tiny_checkpoint
    from resunetpp.export import int8_source
    from resunetpp.export.options import ExportOptions
    from resunetpp.export.pipeline import run_export
    from resunetpp.export.quantize import QDQRecipe

    data = make_dataset(tmp_path / "data", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")

    def export(out: str, headroom):
        monkeypatch.setattr(int8_source, "TAIL_HEADROOM", headroom)
        rep = _Tasks()
        opts = ExportOptions(checkpoint=ckpt, out=tmp_path / out, formats=("onnx",), precisions=("int8",),
                             calib=data, eval=data, allow_accuracy_drop=True, cache=False,
                             qdq=QDQRecipe(keep_modules=("head",), bias_correction_images=4))
        run_export(opts, rep)
        graph = onnx.load(str(tmp_path / out / "model_int8_qdq.onnx")).graph
        return rep, {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    short, got = export("short", 1.0)
    assert any(t.startswith("calibrate again") for t in short.tasks), short.tasks
    whole, want = export("whole", None)
    assert not any(t.startswith("calibrate again") for t in whole.tasks), whole.tasks
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_images_of_any_size_are_calibrated_on_the_equalized_graph(tmp_path):
    """Preprocessing mode "pad" runs each image at its own size: the one pass (which needs equally sized
    images) is not used; the equalization maxima, simulated ranges and histograms are measured pass by
    pass, and the INT8 export completes."""
    from PIL import Image

    from conftest import make_dataset
    from resunetpp.checkpoint import Checkpoint, save_checkpoint
    from resunetpp.export.options import ExportOptions
    from resunetpp.export.pipeline import run_export
    from resunetpp.export.quantize import QDQRecipe
    from resunetpp.preprocess import Preprocessing

    data = make_dataset(tmp_path / "data", 10, 32, splits={"train": list(range(7)), "val": [7, 8, 9]})
    for i in (1, 4):  # two calibration images of another size
        for sub in ("images", "masks"):
            p = data / sub / f"img{i:03d}.png"
            Image.open(p).resize((48, 40)).save(p)
    torch.manual_seed(0)
    model = ResUNetPlusPlus(CONFIG).eval()
    ckpt = save_checkpoint(Checkpoint(CONFIG, model.state_dict(), Preprocessing(mode="pad"), ["polyp"], {}),
                           tmp_path / "pad.safetensors")
    rep = _Tasks()
    opts = ExportOptions(checkpoint=ckpt, out=tmp_path / "out", formats=("onnx",), precisions=("int8",),
                         calib=data, eval=data, allow_accuracy_drop=True, qdq=QDQRecipe(bias_correction_images=4))
    run_export(opts, rep)
    assert not any(t.startswith("calibrate: one") for t in rep.tasks), rep.tasks
    assert any("simulated INT8 ranges" in t for t in rep.tasks) and any("calibrate Q/DQ" in t for t in rep.tasks)
    assert (tmp_path / "out" / "model_int8_qdq.onnx").is_file()
