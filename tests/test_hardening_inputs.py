"""Hardening: every kind of bad input gets a one-line error naming the file, a non-zero exit, nothing written.

Covered (issue 7): broken images (truncated/corrupt JPEG, PNG, TIFF; text named ``.png``; empty;
1x1; a 20000x20000 decompression bomb made from a 60-byte PNG header), unusual images that must be
converted (16-bit, grayscale, RGBA, CMYK, palette ...), dataset problems (empty folder, missing or
mis-sized masks), model files that are not what they claim (truncated ONNX, another model's ONNX,
an OpenVINO ``.xml`` without its ``.bin``, a TensorRT engine built elsewhere, a checkpoint of
another architecture) and numerical guards (an engine answering NaN/Inf fails; it is never averaged).

CLI paths go through Typer's CliRunner; everything else through the library. Models are hand-built
ONNX graphs (milliseconds) and a tiny ResUNet++ (widths 4-16); images are 32-64 px.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from resunetpp import engines
from resunetpp.bench.harness import NONFINITE, BenchRow, EvalData, Settings, bench_engine, gate_failures
from resunetpp.cli import app
from conftest import make_dataset, tiny_checkpoint
from resunetpp.engines.base import NonFiniteOutputError
from resunetpp.artifact import write_sidecar
from resunetpp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.imageio import read_image, read_mask
from resunetpp.model import ModelConfig
from resunetpp.preprocess import Preprocessing

runner = CliRunner()
#: The brief's tiny widths; SE reduction 4 so that the narrowest stage (4 channels) keeps one unit.
TINY_H = ModelConfig(filters=(4, 8, 8, 16), bridge=16, se_reduction=4)
SIZE = 32


# ---- helpers ------------------------------------------------------------------------------------------
def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, path: Path | str, *problems: str, summary: bool = False) -> str:
    """Non-zero exit, no traceback, and the first stderr line ``error: <path>...<problem>``.

    ``summary``: ``infer`` adds one line counting the failed images after the per-image line.
    """
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == (2 if summary else 1), result.stderr
    line = lines[0]
    assert line.startswith("error: ") and str(path) in line, line
    for problem in problems:
        assert re.search(problem, line), (problem, line)
    if summary:
        assert re.fullmatch(r"\d+ of \d+ image\(s\) failed; the others are in .+", lines[1]), lines[1]
    return line


def no_outputs(folder: Path) -> bool:
    """Nothing under a final name (and no temporary file left) in ``folder``."""
    return not folder.exists() or not any(folder.rglob("*"))


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height`` RGB, an empty IDAT, IEND: 57 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) written by hand: PIL cannot write 16-bit colour."""
    h, w = array.shape[:2]
    c = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\0" + np.ascontiguousarray(array[y]).astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def encoded(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def record_for(ckpt: Checkpoint, input_shape: list | None = None) -> dict:
    """The artifact record an export would write for ``ckpt`` (what engines read)."""
    shape = input_shape or ["batch", ckpt.config.in_channels, "height", "width"]
    return {**ckpt.metadata(), "artifact": {"format": "onnx", "precision": "fp32", "input_shape": shape,
                                            "source_sha256": ckpt.sha256}}


def graph(body: str, *, in_name: str = "images", out_name: str = "probs",
          in_shape: tuple = ("batch", 3, "height", "width")) -> onnx.ModelProto:
    """A tiny hand-built ONNX model: channel 0 of the input through ``body``.

    ``sigmoid``: a well-behaved (N, 1, H, W) probability map; ``nan``: 0/0 everywhere; ``inf``:
    (|x|+1)/0; ``sqrt``: sigmoid(sqrt(x)), NaN exactly where the normalised input is negative;
    ``identity``: the input itself (3 channels: the wrong number of classes).
    """
    consts = {"s": np.array([0], np.int64), "e": np.array([1], np.int64), "a": np.array([1], np.int64),
              "zero": np.array(0.0, np.float32), "one": np.array(1.0, np.float32)}
    first = helper.make_node("Slice", [in_name, "s", "e", "a"], ["c0"])
    nodes = {
        "sigmoid": [first, helper.make_node("Sigmoid", ["c0"], [out_name])],
        "nan": [first, helper.make_node("Sub", ["c0", "c0"], ["z"]), helper.make_node("Div", ["z", "z"], [out_name])],
        "inf": [first, helper.make_node("Abs", ["c0"], ["ab"]), helper.make_node("Add", ["ab", "one"], ["p"]),
                helper.make_node("Div", ["p", "zero"], [out_name])],
        "sqrt": [first, helper.make_node("Sqrt", ["c0"], ["r"]), helper.make_node("Sigmoid", ["r"], [out_name])],
        "identity": [helper.make_node("Identity", [in_name], [out_name])],
    }[body]
    out_shape = list(in_shape) if body == "identity" else [in_shape[0], 1, *in_shape[2:]]
    g = helper.make_graph(nodes, body, [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def save_graph(model: onnx.ModelProto, path: Path, record: dict | None) -> Path:
    onnx.save(model, str(path))
    if record is not None:
        write_sidecar(path, record)
    return path


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint, its record, a 3-image dataset (40x48 images) and a good ONNX graph."""
    root = tmp_path_factory.mktemp("hardening_inputs")
    ckpt_path = tiny_checkpoint(root / "tiny.safetensors", TINY_H, SIZE)
    ckpt = load_checkpoint(ckpt_path)
    data = make_dataset(root / "data", 3, 40)
    return {"root": root, "ckpt": ckpt_path, "record": record_for(ckpt), "data": data,
            "onnx": save_graph(graph("sigmoid"), root / "good.onnx", record_for(ckpt))}


def rgb(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- broken images ------------------------------------------------------------------------------------
def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_png(array: np.ndarray) -> bytes:
    data = bytearray(encoded(array, "PNG"))
    start = data.index(b"IDAT") + 8
    data[start:start + 16] = bytes(16)  # zeroed compressed data: the CRC no longer matches
    return bytes(data)


BROKEN = {
    "truncated.jpg": (lambda: _half(encoded(rgb(), "JPEG")), "corrupt or truncated image"),
    "truncated.png": (lambda: _half(encoded(rgb(), "PNG")), "corrupt or truncated image"),
    "truncated.tif": (lambda: _half(encoded(rgb(), "TIFF")), "corrupt or truncated image"),
    "corrupt.png": (lambda: _corrupt_png(rgb()), "corrupt or truncated image"),
    "garbage.jpg": (lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not a readable image|corrupt"),
    "text.png": (lambda: b"this is a text file, not a PNG\n", "not a readable image"),
    "empty.png": (lambda: b"", "not a readable image"),
    "one_pixel.png": (lambda: encoded(rgb(1, 1), "PNG"), "image is 1x1; at least 2x2 pixels are needed"),
    "one_row.png": (lambda: encoded(rgb(1, 64), "PNG"), "image is 64x1; at least 2x2"),
    "bomb.png": (lambda: png_header(20000, 20000),
                 "image has 400000000 pixels, over the 100000000-pixel limit \\(set RESUNETPP_MAX_PIXELS"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_image_fails_in_one_line_through_infer(work: dict, tmp_path: Path, name: str) -> None:
    make, problem = BROKEN[name]
    path = tmp_path / name
    path.write_bytes(make())
    out = tmp_path / "out"
    error_line(invoke("infer", work["ckpt"], path, "--out", out), path, problem, summary=True)
    assert no_outputs(out), sorted(out.rglob("*"))


def test_broken_images_beside_good_ones_fail_alone(work: dict, tmp_path: Path) -> None:
    """A folder with every broken kind and two good images: the good masks are written, each bad
    image gets its own line, the exit code says something failed."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, (make, _) in BROKEN.items():
        (folder / name).write_bytes(make())
    Image.fromarray(rgb(seed=1)).save(folder / "good_a.png")
    Image.fromarray(rgb(30, 20, seed=2)).save(folder / "good_b.jpg")
    out = tmp_path / "out"
    result = invoke("infer", work["ckpt"], folder, "--out", out, "--batch-size", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{len(BROKEN)} of {len(BROKEN) + 2} image(s) failed")
    for name, (_, problem) in BROKEN.items():
        hit = [ln for ln in lines if ln.startswith(f"error: {folder / name}: ")]
        assert len(hit) == 1 and re.search(problem, hit[0]), (name, hit)
    assert sorted(p.name for p in out.iterdir()) == ["good_a_mask.png", "good_b_mask.png"]
    assert Image.open(out / "good_b_mask.png").size == (20, 30)


@pytest.mark.parametrize("name", ["truncated.jpg", "text.png", "one_pixel.png", "bomb.png"])
def test_broken_image_fails_in_one_line_through_evaluate(work: dict, tmp_path: Path, name: str) -> None:
    make, problem = BROKEN[name]
    data = make_dataset(tmp_path / "data", 2, 32)
    (data / "images" / "img001.png").unlink()
    bad = data / "images" / f"img001{Path(name).suffix}"
    bad.write_bytes(make())
    report = tmp_path / "scores.json"
    error_line(invoke("evaluate", work["ckpt"], "--data", data, "--json", report), bad, problem)
    assert not report.exists()


def test_decompression_bomb_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(rgb(40, 50)).save(path)
    monkeypatch.setenv("RESUNETPP_MAX_PIXELS", "1999")
    with pytest.raises(InputFileError, match=r"a.png: image is 50x40, over the 1999-pixel limit"):
        read_image(path)
    monkeypatch.setenv("RESUNETPP_MAX_PIXELS", "2000")
    assert read_image(path).shape == (40, 50, 3)
    # A header claiming 95 Mpx: refused by our limit before anything is decoded, and PIL's own
    # DecompressionBombWarning (89 Mpx) is not printed on top of the error.
    (tmp_path / "big.png").write_bytes(png_header(10000, 9500))
    monkeypatch.setenv("RESUNETPP_MAX_PIXELS", "1000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputFileError, match="over the 1000-pixel limit"):
            read_image(tmp_path / "big.png")
    # Raising the limit above PIL's default lets a big image through PIL's check: the empty IDAT
    # of the header-only file then fails as truncated (nothing of 95 Mpx is allocated here).
    monkeypatch.setenv("RESUNETPP_MAX_PIXELS", str(400_000_000))
    with pytest.raises(InputFileError, match="big.png: .*(truncated|corrupt)") as info:
        read_mask(tmp_path / "big.png")
    assert "pixel limit" not in str(info.value)
    monkeypatch.setenv("RESUNETPP_MAX_PIXELS", "lots")
    with pytest.raises(ResUNetError, match="RESUNETPP_MAX_PIXELS must be a positive integer.*'lots'"):
        read_image(path)


def test_decompression_bomb_limit_through_the_cli(work: dict, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(rgb(40, 50)).save(path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(work["ckpt"]), str(path), "--out", str(out)],
                           env={"RESUNETPP_MAX_PIXELS": "1000"})
    error_line(result, path, "over the 1000-pixel limit", summary=True)
    assert no_outputs(out)


# ---- unusual images: converted, not refused ----------------------------------------------------------
def _kinds(folder: Path) -> dict[str, np.ndarray | None]:
    """Write one image of every unusual kind; value: the expected RGB (None: only the shape is checked)."""
    rng = np.random.default_rng(3)
    base = rgb(37, 45, seed=4)
    gray = base[:, :, 0]
    g16 = rng.integers(0, 65536, (37, 45), dtype=np.uint16)
    c16 = rng.integers(0, 65536, (37, 45, 3), dtype=np.uint16)
    expected: dict[str, np.ndarray | None] = {}

    def save(name: str, image: Image.Image, want: np.ndarray | None, **kw) -> None:
        image.save(folder / name, **kw)
        expected[name] = want

    def scaled16(a: np.ndarray) -> np.ndarray:
        return np.clip(a.astype(np.float32) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)

    png16(folder / "gray16.png", g16)
    expected["gray16.png"] = np.repeat(scaled16(g16)[:, :, None], 3, axis=2)
    png16(folder / "rgb16.png", c16)
    expected["rgb16.png"] = None  # PIL reduces 48-bit PNGs to 8 bits itself
    png16(folder / "rgba16.png", np.dstack([c16, np.full((37, 45), 65535, np.uint16)]))
    expected["rgba16.png"] = None
    png16(folder / "graya16.png", np.dstack([g16, np.full((37, 45), 65535, np.uint16)]))
    expected["graya16.png"] = None
    save("gray16_tiff.tif", Image.fromarray(g16), np.repeat(scaled16(g16)[:, :, None], 3, axis=2))
    save("gray.png", Image.fromarray(gray), np.repeat(gray[:, :, None], 3, axis=2))
    save("gray_jpeg.jpg", Image.fromarray(gray), None)
    save("rgba_opaque.png", Image.fromarray(np.dstack([base, np.full((37, 45), 255, np.uint8)])), base)
    alpha = np.zeros((37, 45), np.uint8)
    save("rgba_clear.png", Image.fromarray(np.dstack([base, alpha])), np.zeros_like(base))  # on black
    save("la.png", Image.fromarray(gray).convert("LA"), np.repeat(gray[:, :, None], 3, axis=2))
    save("cmyk.jpg", Image.fromarray(base).convert("CMYK"), None)
    save("cmyk_tiff.tif", Image.fromarray(base).convert("CMYK"),
         np.asarray(Image.fromarray(base).convert("CMYK").convert("RGB")))
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette.png", pal, np.asarray(pal.convert("RGB")))
    save("palette.gif", pal, np.asarray(pal.convert("RGB")))
    save("palette_transparent.png", pal, None, transparency=0)
    save("bilevel.png", Image.fromarray(gray).convert("1"), None)
    save("float.tif", Image.fromarray(rng.random((37, 45)).astype(np.float32)), None)
    save("int32.tif", Image.fromarray(gray.astype(np.int32)).convert("I"), None)
    save("progressive.jpg", Image.fromarray(base), None, progressive=True, quality=90)
    save("lossless.webp", Image.fromarray(base), base, lossless=True)
    save("plain.bmp", Image.fromarray(base), base)
    save("two_by_two.png", Image.fromarray(base[:2, :2]), base[:2, :2])
    save("tall.png", Image.fromarray(rgb(97, 3, seed=5)), rgb(97, 3, seed=5))
    return expected


def test_unusual_images_are_converted_not_refused(tmp_path: Path) -> None:
    folder = tmp_path / "kinds"
    folder.mkdir()
    for name, want in _kinds(folder).items():
        image = read_image(folder / name)
        h, w = Image.open(folder / name).size[::-1]
        assert image.shape == (h, w, 3) and image.dtype == np.uint8, name
        if want is not None:
            np.testing.assert_array_equal(image, want, err_msg=name)
        gray = read_image(folder / name, channels=1)
        assert gray.shape == (h, w, 1) and gray.dtype == np.uint8, name
        mask = read_mask(folder / name)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1}, name


def test_unusual_images_are_segmented_through_infer(work: dict, tmp_path: Path) -> None:
    folder = tmp_path / "kinds"
    folder.mkdir()
    kinds = _kinds(folder)
    out = tmp_path / "out"
    result = invoke("infer", work["ckpt"], folder, "--out", out, "--overlay", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    # gif is not an input suffix infer picks from a folder: everything else is segmented
    for name in kinds:
        if name.endswith(".gif"):
            continue
        w, h = Image.open(folder / name).size
        stem = Path(name).stem
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.size == (w, h) and set(np.unique(np.asarray(mask))) <= {0, 255}, name
        assert Image.open(out / f"{stem}_overlay.png").size == (w, h), name


# ---- datasets -------------------------------------------------------------------------------------------
def _dataset_case(root: Path, case: str) -> tuple[Path, Path, str]:
    """Build a broken dataset; return (data root, the path the error must name, the problem)."""
    if case == "empty folder":
        root.mkdir()
        return root, root, "no images/ folder"
    data = make_dataset(root, 3, 32, splits={"train": [0, 1], "val": [2]})
    if case == "empty images/":
        for p in (data / "images").iterdir():
            p.unlink()
        (data / "train.txt").unlink()
        (data / "val.txt").unlink()
        return data, data / "images", "folder holds no images"
    if case == "mask missing":
        (data / "masks" / "img001.png").unlink()
        return data, data / "images" / "img001.png", "image has no mask in"
    if case == "no masks/":
        for p in (data / "masks").iterdir():
            p.unlink()
        (data / "masks").rmdir()
        return data, data / "images" / "img000.png", "image has no mask in"
    if case == "mask of another size":
        Image.new("L", (31, 32)).save(data / "masks" / "img001.png")
        return data, data / "masks" / "img001.png", "mask is 31x32 but its image img001.png is 32x32"
    if case == "mask unreadable":
        (data / "masks" / "img002.png").write_bytes(b"not a png")
        return data, data / "masks" / "img002.png", "not a readable image"
    if case == "split names an absent image":
        (data / "val.txt").write_text("img002\nimg999\n")
        return data, data / "val.txt", "1 listed image\\(s\\) not in .*'img999'"
    raise AssertionError(case)


DATASET_CASES = ["empty folder", "empty images/", "mask missing", "no masks/", "mask of another size",
                 "mask unreadable", "split names an absent image"]


@pytest.mark.parametrize("case", DATASET_CASES)
def test_bad_dataset_through_evaluate(work: dict, tmp_path: Path, case: str) -> None:
    data, named, problem = _dataset_case(tmp_path / "data", case)
    split = ["--split", "val"] if case == "split names an absent image" else []
    report = tmp_path / "scores.json"
    error_line(invoke("evaluate", work["ckpt"], "--data", data, *split, "--json", report), named, problem)
    assert not report.exists()


@pytest.mark.parametrize("case", ["empty folder", "mask missing", "mask of another size", "split names an absent image"])
def test_bad_dataset_through_train_writes_nothing(tmp_path: Path, case: str) -> None:
    data, named, problem = _dataset_case(tmp_path / "data", case)
    out = tmp_path / "run"
    result = invoke("train", "--data", data, "--out", out, "--epochs", "1", "--image-size", "32",
                    "--batch-size", "2", "--device", "cpu")
    error_line(result, named, problem)
    assert no_outputs(out)


def test_empty_inputs_through_infer_and_export(work: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "masks"
    error_line(invoke("infer", work["ckpt"], empty, "--out", out), empty, "no images found")
    assert no_outputs(out)
    error_line(invoke("infer", work["ckpt"], str(tmp_path / "*.png"), "--out", out), tmp_path / "*.png",
               "the pattern matches no image file")
    exported = tmp_path / "exported"
    result = invoke("export", work["ckpt"], "--out", exported, "--calib", empty, "-f", "onnx", "-p", "int8")
    error_line(result, empty, "calibration images: the folder holds no images")
    assert no_outputs(exported), sorted(exported.rglob("*"))


def test_mask_of_another_size_through_export_and_bench(work: dict, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 6, 32, splits={"train": [0, 1, 2, 3], "val": [4, 5]})
    bad = data / "masks" / "img005.png"
    Image.new("L", (31, 32)).save(bad)
    problem = "mask is 31x32 but its image img005.png is 32x32"
    out = tmp_path / "exported"
    result = invoke("export", work["ckpt"], "--out", out, "--calib", data, "-f", "onnx", "-p", "int8")
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: {bad}: {problem}"], result.stderr
    assert no_outputs(out), sorted(out.rglob("*"))
    report = tmp_path / "bench.json"
    error_line(invoke("bench", work["ckpt"], "--data", data, "--split", "val", "--backends", "torch", "--precisions",
                      "fp32", "--batch-sizes", "1", "--warmup-s", "0", "--duration-s", "0.01", "--no-end-to-end",
                      "--json", report), bad, problem)
    assert not report.exists()


# ---- model files ------------------------------------------------------------------------------------------
def _model_case(work: dict, folder: Path, case: str) -> tuple[Path, Path, str]:
    """A model file that is not what it claims; returns (model, the path the error names, the problem)."""
    record = work["record"]
    if case == "truncated onnx":
        data = work["onnx"].read_bytes()
        path = folder / "truncated.onnx"
        path.write_bytes(data[: len(data) // 2])
        write_sidecar(path, record)
        return path, path, "onnxruntime cannot load the model .*(INVALID_PROTOBUF|Protobuf parsing failed)"
    if case == "truncated onnx, no sidecar":
        data = work["onnx"].read_bytes()
        path = folder / "bare.onnx"
        path.write_bytes(data[: len(data) // 2])
        return path, path, "not a valid ONNX model"
    if case == "text named .onnx":
        path = folder / "notes.onnx"
        path.write_text("hello\n")
        return path, path, "not a valid ONNX model"
    if case == "onnx without metadata":
        path = save_graph(graph("sigmoid"), folder / "foreign.onnx", None)
        return path, path, "no resunetpp metadata \\(expected foreign.onnx.json beside it\\)"
    if case == "sidecar not json":
        path = save_graph(graph("sigmoid"), folder / "m.onnx", None)
        Path(str(path) + ".json").write_text("{not json")
        return path, Path(str(path) + ".json"), "metadata sidecar is not valid JSON"
    if case == "other input and output names":
        path = save_graph(graph("sigmoid", in_name="x", out_name="y"), folder / "other.onnx", record)
        return path, path, "not a resunetpp graph \\(input 'x', outputs \\['y'\\]; expected input 'images'"
    if case == "other output name":
        path = save_graph(graph("sigmoid", out_name="logits"), folder / "other.onnx", record)
        return path, path, "expected input 'images' and output 'probs'"
    if case == "other channel count":
        path = save_graph(graph("sigmoid", in_shape=("batch", 1, "height", "width")), folder / "gray.onnx", record)
        return path, Path("gray.onnx"), "graph input has 1 channels \\| the metadata's preprocessing gives 3"
    if case == "other class count":
        path = save_graph(graph("identity"), folder / "three.onnx", record)
        return path, Path("three.onnx"), "output \\(1, 3, 32, 32\\) for input \\(1, 3, 32, 32\\) \\| expected \\(1, 1, 32, 32\\)"
    if case == "other static size":
        path = save_graph(graph("sigmoid", in_shape=(1, 3, 16, 16)), folder / "small.onnx", record)
        return path, Path("small.onnx"), "graph input is 16x16 \\| the metadata's preprocessing resizes to 32x32"
    if case in ("openvino xml without bin", "openvino bin truncated"):
        import openvino as ov

        path = folder / "model.xml"
        ov.save_model(ov.convert_model(str(work["onnx"])), str(path), compress_to_fp16=False)
        write_sidecar(path, {**record, "artifact": {**record["artifact"], "format": "openvino"}})
        if case == "openvino xml without bin":
            path.with_suffix(".bin").unlink()
            return path, path, "its weights file model.bin is missing"
        path.with_suffix(".bin").write_bytes(b"\0")
        return path, path, "OpenVINO cannot read the model|cannot"
    if case == "checkpoint of other widths":
        big = tiny_checkpoint(folder / "big.safetensors", ModelConfig(filters=(8, 8, 16, 16), bridge=16), SIZE)
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(work["ckpt"]), "pt") as f:
            small_record = f.metadata()
        path = folder / "mislabelled.safetensors"
        save_file(load_file(str(big)), str(path), metadata=small_record)
        return path, path, "weight '.*' has shape .*, the model expects .*another architecture or width"
    if case == "random state dict":
        path = folder / "random.pt"
        torch.save({"backbone.conv.weight": torch.randn(8, 3, 3, 3), "fc.bias": torch.zeros(2)}, path)
        return path, path, "weights do not fit this ResUNet\\+\\+ config: \\d+ missing key"
    if case == "another network's state dict":
        path = folder / "unet.pth"
        torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1)).state_dict(),
                   path)
        return path, path, "weights do not fit this ResUNet\\+\\+ config"
    if case == "safetensors of another toolkit":
        from safetensors.torch import save_file

        path = folder / "other.safetensors"
        save_file({"w": torch.zeros(2)}, str(path))
        return path, path, "has no resunetpp record"
    if case == "truncated safetensors":
        data = work["ckpt"].read_bytes()
        path = folder / "cut.safetensors"
        path.write_bytes(data[: len(data) // 3])
        return path, path, "not a valid safetensors file"
    if case == "empty checkpoint":
        path = folder / "empty.pt"
        path.write_bytes(b"")
        return path, path, "file is empty"
    raise AssertionError(case)


MODEL_CASES = ["truncated onnx", "truncated onnx, no sidecar", "text named .onnx", "onnx without metadata",
               "sidecar not json", "other input and output names", "other output name", "other channel count",
               "other class count", "other static size", "openvino xml without bin", "openvino bin truncated",
               "checkpoint of other widths", "random state dict", "another network's state dict",
               "safetensors of another toolkit", "truncated safetensors", "empty checkpoint"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_file_through_infer(work: dict, tmp_path: Path, case: str) -> None:
    model, named, problem = _model_case(work, tmp_path, case)
    out = tmp_path / "out"
    # the fixture's 40x40 images are "tiny" (one warning line): silenced so the error is the first line
    error_line(invoke("infer", model, work["data"] / "images", "--out", out, "--no-input-warnings"), named, problem)
    assert not list(out.glob("*_mask.png"))


@pytest.mark.parametrize("case", ["truncated onnx", "other input and output names", "other static size",
                                  "openvino xml without bin", "checkpoint of other widths", "random state dict"])
def test_bad_model_file_through_evaluate(work: dict, tmp_path: Path, case: str) -> None:
    model, named, problem = _model_case(work, tmp_path, case)
    error_line(invoke("evaluate", model, "--data", work["data"]), named, problem)


@pytest.mark.parametrize("case", ["checkpoint of other widths", "another network's state dict", "truncated safetensors"])
def test_bad_checkpoint_through_export_writes_nothing(work: dict, tmp_path: Path, case: str) -> None:
    model, named, problem = _model_case(work, tmp_path, case)
    out = tmp_path / "exported"
    error_line(invoke("export", model, "--out", out, "-f", "onnx", "-p", "fp32"), named, problem)
    assert no_outputs(out), sorted(out.rglob("*"))


# ---- TensorRT engine built elsewhere -------------------------------------------------------------------------
def _foreign_engine(work: dict, folder: Path, version: str = "8.6.1", cc: str = "8.0") -> Path:
    path = folder / "model_fp16.engine"
    path.write_bytes(b"ftrt" + bytes(60))  # never deserialized: refused before that
    record = work["record"]
    write_sidecar(path, {**record, "artifact": {**record["artifact"], "format": "tensorrt", "precision": "fp16",
                                                "tensorrt": {"version": version,
                                                             "gpu": {"name": "NVIDIA A100", "compute_capability": cc}}}})
    return path


def test_engine_built_elsewhere_through_infer(work: dict, tmp_path: Path) -> None:
    """Here: TensorRT missing (or no GPU) is said in one line. With TensorRT and a GPU the sidecar's
    8.6.1 build is refused by the compatibility check instead."""
    path = _foreign_engine(work, tmp_path)
    out = tmp_path / "out"
    line = error_line(invoke("infer", path, work["data"] / "images", "--out", out), "", "engine|tensorrt")
    assert re.search(r"tensorrt is not installed|cuda-python is not installed|no CUDA device|CUDA runtime unusable"
                     r"|model_fp16.engine: engine built with TensorRT 8.6.1", line), line
    assert no_outputs(out)


class _FakeTensorRT(types.ModuleType):
    """A ``tensorrt`` with a version and nothing else: reaching deserialization would raise AttributeError."""

    def __init__(self, version: str) -> None:
        super().__init__("tensorrt")
        self.__version__ = version


@pytest.mark.parametrize("runtime, gpu_cc, problem", [
    ("10.9.0.34", "8.0", r"model_fp16.engine: engine built with TensorRT 8.6.1, this machine has TensorRT 10.9.0.34 "
                         r"\(an engine only loads on the TensorRT that built it\); re-export it here"),
    ("8.6.1", "9.0", r"model_fp16.engine: engine built for a GPU of compute capability 8.0 \(NVIDIA A100\), "
                     r"this GPU is 9.0 \(NVIDIA H100\) \(needs the same compute capability\); re-export it on this GPU"),
])
def test_engine_built_elsewhere_is_refused_before_deserializing(work: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, runtime: str,
                                                                gpu_cc: str, problem: str) -> None:
    import resunetpp.engines.tensorrt_engine as trt_engine

    path = _foreign_engine(work, tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(runtime))
    monkeypatch.setattr(trt_engine, "_cudart", lambda: types.SimpleNamespace(cudaGetDeviceCount=lambda: 1))
    monkeypatch.setattr(trt_engine, "_check", lambda result: result)
    monkeypatch.setattr(trt_engine.TensorRTEngine, "_current_gpu",
                        lambda self: {"name": "NVIDIA H100", "compute_capability": gpu_cc})
    engine = trt_engine.TensorRTEngine.from_path(path, device="cuda")
    with pytest.raises(InputFileError, match=problem):
        engine.load()
    assert not engine.loaded


# ---- numerical guards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", ["nan", "inf"])
def test_non_finite_model_fails_evaluate_and_infer(work: dict, tmp_path: Path, body: str) -> None:
    path = save_graph(graph(body), tmp_path / f"{body}.onnx", work["record"])
    line = error_line(invoke("evaluate", path, "--data", work["data"], "--json", tmp_path / "s.json"), "",
                      "NaN/Inf", f"{body}.onnx")
    assert "output has 1024 NaN/Inf value(s) of 1024" in line  # every value of the first 32x32 image
    assert not (tmp_path / "s.json").exists()
    out = tmp_path / "out"
    result = invoke("infer", path, work["data"] / "images", "--out", out, "--save-probs", "--no-input-warnings")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("3 of 3 image(s) failed")
    assert all("prediction is not finite" in ln for ln in lines[:-1]) and len(lines) == 4
    assert not any(p.is_file() for p in out.rglob("*"))


def test_non_finite_checkpoint_fails_evaluate(work: dict, tmp_path: Path) -> None:
    ckpt = load_checkpoint(work["ckpt"])
    state = dict(ckpt.state_dict)
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    path = save_checkpoint(Checkpoint(ckpt.config, state, ckpt.preprocessing, ckpt.class_names, {}),
                           tmp_path / "nan.safetensors")
    error_line(invoke("evaluate", path, "--data", work["data"]), "", "engine: torch", "NaN/Inf", "nan.safetensors")


def _bench_data(folder: Path, pre: Preprocessing, dark: list[bool]) -> EvalData:
    """Images that are bright (normalised channel 0 >= 0) or dark (< 0), with masks."""
    names, paths, inputs, sizes, masks = [], [], [], [], []
    for i, is_dark in enumerate(dark):
        image = np.full((32, 32, 3), 10 if is_dark else 250, np.uint8)
        path = folder / f"im{i}.png"
        Image.fromarray(image).save(path)
        names.append(path.stem)
        paths.append(path)
        inputs.append(pre.apply(image))
        sizes.append((32, 32))
        masks.append(np.ones((32, 32), np.uint8))
    return EvalData(pre, 1, names, paths, inputs, sizes, masks)


@pytest.mark.parametrize("body, dark", [("nan", [False, False, False]), ("inf", [False, False, False]),
                                        ("sqrt", [False, True, False])],
                         ids=["all-nan", "all-inf", "one-image-of-three-nan"])
def test_bench_marks_a_non_finite_row_failed_not_averaged(work: dict, tmp_path: Path, body: str,
                                                          dark: list[bool]) -> None:
    path = save_graph(graph(body), tmp_path / f"{body}.onnx", work["record"])
    pre = Preprocessing(size=(SIZE, SIZE))
    data = _bench_data(tmp_path, pre, dark)
    reference = [np.full((1, SIZE, SIZE), 0.9, np.float32) for _ in dark]
    with engines.open(path) as engine:
        rows = bench_engine(engine, BenchRow("onnxruntime", "fp32"), data, reference,
                            Settings(batch_sizes=(1, 2), warmup_s=0.0, duration_s=0.01, end_to_end=False))
    assert len(rows) == 1, rows  # one failed row: no per-batch timings of a broken artifact
    row = rows[0]
    assert row.status == NONFINITE and "NaN/Inf" in row.reason, row
    assert row.failed and not row.ok
    for number in ("dice_vs_reference", "dice_vs_reference_min", "max_abs_diff", "mean_abs_diff", "dice_vs_gt",
                   "latency_ms_p50", "throughput_ips"):
        assert getattr(row, number) is None, number
    assert json.loads(json.dumps(row.as_dict()))["status"] == NONFINITE
    assert gate_failures(rows, 1.0) == [f"onnxruntime fp32 ({NONFINITE})"]
    for backend in ("onnxruntime", "openvino"):
        with engines.open(path, backend=backend) as engine, pytest.raises(NonFiniteOutputError, match=f"{backend}"):
            engine.predict(np.stack(data.inputs))
