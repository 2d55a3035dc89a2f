"""Hardening: property-based tests of preprocessing -> engine -> postprocessing (hypothesis).

Random image files (2..97 px a side; 1, 3 or 4 channels; 8- or 16-bit PNG; noise, flat black,
flat white or gradients) go through ``read_image`` -> ``Preprocessing.apply`` -> the torch and
ONNX Runtime engines -> ``Preprocessing.restore`` -> ``probs_to_mask``, in both preprocessing
modes (resize to 32x32; pad to a multiple of 8 on a dynamic-size graph), and through the whole
``resunetpp infer`` pipeline with random batch sizes, TTA and thread counts. Whatever the input:
the mask has the input's size, probabilities are finite and in [0, 1] (summing to 1 over classes
for a softmax model), and the two backends agree.

The model is a tiny ResUNet++ (widths 4-16), exported once by the real dynamo ONNX exporter.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from resunetpp import engines
from conftest import tiny_checkpoint
from resunetpp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from resunetpp.imageio import read_image
from resunetpp.engines.infer import InferOptions, run_inference
from resunetpp.model import ModelConfig
from resunetpp.preprocess import Preprocessing, probs_to_mask
from resunetpp.sources.images import ImageFiles

TINY_H = ModelConfig(filters=(4, 8, 8, 16), bridge=16, se_reduction=4)
SIZE = 32
#: Torch and ONNX Runtime (FP32, same graph) agree to this on probabilities.
AGREE = 1e-4
PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])
_counter = itertools.count()


# ---- image files --------------------------------------------------------------------------------------------
def _png16(path: Path, array: np.ndarray) -> None:
    h, w = array.shape[:2]
    c = 1 if array.ndim == 2 else array.shape[2]
    raw = b"".join(b"\0" + np.ascontiguousarray(array[y]).astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@st.composite
def image_specs(draw, max_side: int = 97) -> dict:
    return {"h": draw(st.integers(2, max_side)), "w": draw(st.integers(2, max_side)),
            "channels": draw(st.sampled_from([1, 3, 4])), "dtype": draw(st.sampled_from(["uint8", "uint16"])),
            "content": draw(st.sampled_from(["noise", "black", "white", "gradient"])),
            "seed": draw(st.integers(0, 2**31 - 1))}


def write_image(folder: Path, spec: dict) -> Path:
    """A PNG file of the drawn size, channel count, bit depth and content."""
    h, w, c = spec["h"], spec["w"], spec["channels"]
    top = 255 if spec["dtype"] == "uint8" else 65535
    shape = (h, w) if c == 1 else (h, w, c)
    if spec["content"] == "noise":
        array = np.random.default_rng(spec["seed"]).integers(0, top + 1, shape)
    elif spec["content"] in ("black", "white"):
        array = np.full(shape, 0 if spec["content"] == "black" else top)
    else:
        ramp = np.linspace(0, top, w)[None, :] * np.linspace(0.2, 1.0, h)[:, None]
        array = ramp if c == 1 else np.repeat(ramp[:, :, None], c, axis=2)
    if c == 4:
        array[..., 3] = top  # opaque: alpha compositing is exercised by the unusual-image tests
    path = folder / f"im{next(_counter)}.png"
    if spec["dtype"] == "uint16":
        _png16(path, np.asarray(array, np.uint16))
    else:
        Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


# ---- models ---------------------------------------------------------------------------------------------------
def _onnx_with_record(ckpt: Checkpoint, pre: Preprocessing, path: Path) -> Path:
    """The real export path: dynamo ONNX (dynamic batch, height, width) + record + sidecar."""
    from resunetpp.export.metadata import artifact_record
    from resunetpp.export.onnx_format import ShapeSpec, export_onnx, write_onnx_artifact
    from resunetpp.model import WithActivation

    spec = ShapeSpec(pre.channels, ckpt.config.num_classes, (SIZE, SIZE))
    model = export_onnx(WithActivation(ckpt.build_model()), spec, simplify=False)
    record = artifact_record(ckpt, pre, fmt="onnx", precision="fp32", file=path, shape=spec.record())
    return write_onnx_artifact(model, path, record)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """Loaded engines: ``resize``/``pad`` x ``torch``/``onnxruntime`` on one tiny binary model, and a
    3-class softmax model on torch; plus a scratch folder for image files."""
    root = tmp_path_factory.mktemp("hardening_properties")
    resize_path = tiny_checkpoint(root / "resize.safetensors", TINY_H, SIZE)
    ckpt = load_checkpoint(resize_path)
    pad_ckpt = replace(ckpt, preprocessing=Preprocessing(mode="pad"), path=None, sha256=None)
    pad_path = save_checkpoint(pad_ckpt, root / "pad.safetensors")
    onnx_resize = _onnx_with_record(ckpt, ckpt.preprocessing, root / "resize.onnx")
    # The same graph with the pad policy: any multiple of 8 goes through its dynamic height and width.
    onnx_pad = root / "pad.onnx"
    onnx_pad.write_bytes(onnx_resize.read_bytes())
    from resunetpp.artifact import read_record, write_sidecar

    record = read_record(onnx_resize)
    write_sidecar(onnx_pad, {**record, "preprocessing": Preprocessing(mode="pad").to_dict()})
    multi_path = tiny_checkpoint(root / "multi.safetensors", replace(TINY_H, num_classes=3), SIZE)
    opened = {("resize", "torch"): engines.open(resize_path), ("resize", "onnxruntime"): engines.open(onnx_resize),
              ("pad", "torch"): engines.open(pad_path), ("pad", "onnxruntime"): engines.open(onnx_pad),
              ("multi", "torch"): engines.open(multi_path)}
    for engine in opened.values():
        engine.load()
    images = root / "images"
    images.mkdir()
    yield {"engines": opened, "images": images, "root": root}
    for engine in opened.values():
        engine.close()


def segment(engine, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(network probabilities, probabilities at the original size, mask) of one image file."""
    pre = engine.preprocessing
    image = read_image(path, channels=pre.channels)
    x = pre.apply(image)
    probs = engine.infer(x[None])[0]
    full = pre.restore(probs, *image.shape[:2])
    return probs, full, probs_to_mask(full)


def check_output(full: np.ndarray, mask: np.ndarray, h: int, w: int, classes: int) -> None:
    assert full.shape == (classes, h, w) and full.dtype == np.float32
    assert np.isfinite(full).all()
    assert full.min() >= 0.0 and full.max() <= 1.0
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= set(range(max(classes, 2)))


# ---- properties ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["resize", "pad"])
@PROPERTY
@given(spec=image_specs())
def test_any_image_gives_a_mask_of_its_size_on_every_backend(models: dict, mode: str, spec: dict) -> None:
    path = write_image(models["images"], spec)
    h, w = spec["h"], spec["w"]
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        engine = models["engines"][(mode, backend)]
        probs, full, mask = segment(engine, path)
        expected_input = (SIZE, SIZE) if mode == "resize" else (-(-h // 8) * 8, -(-w // 8) * 8)
        assert probs.shape == (1, *expected_input)
        check_output(full, mask, h, w, 1)
        outputs[backend] = full
    assert np.abs(outputs["torch"] - outputs["onnxruntime"]).max() < AGREE
    path.unlink()


@PROPERTY
@given(spec=image_specs())
def test_softmax_probabilities_sum_to_one_at_any_size(models: dict, spec: dict) -> None:
    path = write_image(models["images"], spec)
    _, full, mask = segment(models["engines"][("multi", "torch")], path)
    check_output(full, mask, spec["h"], spec["w"], 3)
    np.testing.assert_allclose(full.sum(axis=0), 1.0, atol=1e-5)
    path.unlink()


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(image_specs(max_side=64), min_size=1, max_size=4), batch_size=st.integers(1, 3),
       tta=st.booleans(), threads=st.integers(1, 2), mode=st.sampled_from(["resize", "pad"]),
       backend=st.sampled_from(["torch", "onnxruntime"]))
def test_the_infer_pipeline_writes_one_mask_of_each_input_size(models: dict, specs: list[dict], batch_size: int,
                                                               tta: bool, threads: int, mode: str,
                                                               backend: str) -> None:
    folder = models["root"] / f"run{next(_counter)}"
    folder.mkdir()
    paths = [write_image(folder, spec) for spec in specs]
    out = folder / "out"
    options = InferOptions(out=out, batch_size=batch_size, tta=tta, threads=threads, save_probs=True,
                           probs_dtype="float32")
    result = run_inference(models["engines"][(mode, backend)], ImageFiles(paths), options)
    assert result.failures == [] and result.written == len(paths) == result.inferred
    for path, spec in zip(paths, specs):
        mask = np.asarray(Image.open(out / f"{path.stem}_mask.png"))
        assert mask.shape == (spec["h"], spec["w"]) and set(np.unique(mask)) <= {0, 255}
        probs = np.load(out / f"{path.stem}_probs.npy")
        check_output(probs, (mask > 0).astype(np.uint8), spec["h"], spec["w"], 1)
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(h=st.integers(1, 97), w=st.integers(1, 97), channels=st.sampled_from([1, 3]),
       mode=st.sampled_from(["resize", "pad"]), model_channels=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_preprocessing_round_trip_keeps_the_size(h: int, w: int, channels: int, mode: str, model_channels: int,
                                                 seed: int) -> None:
    """``apply`` gives a finite (C, h', w') float32 of an accepted size for any uint8 image (even
    1-pixel arrays handed to the library directly); ``restore`` returns exactly (K, h, w)."""
    kw = {"mean": (0.5,), "std": (0.25,)} if model_channels == 1 else {}
    pre = Preprocessing(size=(SIZE, SIZE), mode=mode, channels=model_channels, **kw)
    image = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    x = pre.apply(image)
    th, tw = pre.input_size(h, w)
    assert x.shape == (model_channels, th, tw) and x.dtype == np.float32 and np.isfinite(x).all()
    assert th % 8 == 0 and tw % 8 == 0 and th >= (h if mode == "pad" else 8)
    probs = np.random.default_rng(seed).random((2, th, tw), dtype=np.float32)
    back = pre.restore(probs, h, w)
    assert back.shape == (2, h, w) and np.isfinite(back).all() and 0.0 <= back.min() <= back.max() <= 1.0
    mask = probs_to_mask(back)
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1}
