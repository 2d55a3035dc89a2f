"""Hardening II (issue 20): no lost input, no silent wrong mask, no traceback.

One test (or one parametrized case) per probe of the issue, most severe first:

1. tampered records (checkpoint record, ONNX sidecar): refused at load, naming the file and the field;
2. input sizes: multiples of 8 up to :data:`resunetpp.model.MAX_INPUT_SIZE`, everywhere;
3. memory on big images: the overlay in bands, decoded images not hoarded, batches capped;
4. ``--out`` onto the inputs: no input file is ever written over;
5. two infers into one ``--out``: the second waits (lock), every mask comes from one run;
6. temporaries: stale ones swept on start, SIGTERM handled like Ctrl-C;
7. one line instead of a traceback (bad ``--out``, disk full, engine options, malformed TensorRT fields);
8. exit codes and messages (``--batch-size 0`` ..., ``--duration-s inf``, a split file never echoed,
   an unreadable model, engine errors naming the file, no TensorFlow log lines from OpenVINO).

The security and data-loss items (1, 2, 4, 5, 6) run through the command line: Typer's CliRunner
in-process, or ``python -m resunetpp`` in a subprocess where signals, a second process or C++
stderr are involved. Models are a tiny ResUNet++ (widths 4-16, 32 px) and a hand-built ONNX graph.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import REPO, make_dataset, overlay_before, tiny_checkpoint
from resunetpp.artifact import write_sidecar
from resunetpp.checkpoint import load_checkpoint, save_checkpoint
from resunetpp.cli import app
from resunetpp.errors import InputFileError
from resunetpp.locking import INFER_LOCK_NAME, OutLock
from resunetpp.model import MAX_INPUT_SIZE, ModelConfig
from resunetpp.outputs import overlay_image
from resunetpp.preprocess import Preprocessing
from test_hardening_inputs import graph, record_for, save_graph
from test_hardening_interrupt import Run

pytestmark = pytest.mark.usefixtures("torch_threads")

runner = CliRunner()
TINY_H = ModelConfig(filters=(4, 8, 8, 16), bridge=16, se_reduction=4)
SIZE = 32
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---- helpers ------------------------------------------------------------------------------------------------
def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, *patterns: str, path: Path | str | None = None, code: int = 1, lines: int = 1) -> str:
    """Exit ``code``, no traceback, ``lines`` stderr lines, the first ``error: [<path>: ]...`` matching ``patterns``."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output + result.stderr
    got = result.stderr.strip().splitlines()
    assert len(got) == lines, result.stderr
    line = got[0]
    assert line.startswith(f"error: {path}:" if path is not None else "error: "), line
    for pattern in patterns:
        assert re.search(pattern, line), (pattern, line)
    return line


def empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def rgb(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def images(folder: Path, n: int, h: int = 40, w: int = 48, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb(h, w, i)).save(folder / f"{prefix}{i:03d}.png")
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def age(path: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint, a hand-built ONNX graph with its sidecar, three 40x48 images."""
    root = tmp_path_factory.mktemp("hardening_ii")
    ckpt_path = tiny_checkpoint(root / "tiny.safetensors", TINY_H, SIZE)
    ckpt = load_checkpoint(ckpt_path)
    return {"root": root, "ckpt": ckpt_path, "record": record_for(ckpt),
            "onnx": save_graph(graph("sigmoid"), root / "good.onnx", record_for(ckpt)),
            "images": images(root / "images", 3)}


# ---- 1 and 2. tampered records and input sizes --------------------------------------------------------------
INF, NAN = math.inf, math.nan


def _set(*keys_value):
    *keys, value = keys_value

    def mutate(record: dict) -> dict:
        target = record
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return record
    return mutate


#: name -> (mutation of a valid record, field named in the message, problem pattern)
TAMPERED = {
    "std infinite": (_set("preprocessing", "std", [INF] * 3), "preprocessing.std", "must be finite"),
    "mean NaN": (_set("preprocessing", "mean", [NAN] * 3), "preprocessing.mean", "must be finite"),
    "std zero": (_set("preprocessing", "std", [0.0] * 3), "preprocessing.std", r"must lie in \[0.001, 1\]"),
    "std negative": (_set("preprocessing", "std", [-0.2] * 3), "preprocessing.std", "must lie in"),
    "std 1e30": (_set("preprocessing", "std", [1e30] * 3), "preprocessing.std", "must lie in"),
    "mean on the 0..255 scale": (_set("preprocessing", "mean", [123.7, 116.3, 103.5]), "preprocessing.mean",
                                 "0..1 pixel scale"),
    "std a string": (_set("preprocessing", "std", "wide"), "preprocessing.std", "list of 3 numbers"),
    "std two values": (_set("preprocessing", "std", [0.2, 0.2]), "preprocessing.std", "needs 3 values"),
    "size 40000": (_set("preprocessing", "size", [40000, 40000]), "preprocessing.size", "at most 4096"),
    "size 2**31": (_set("preprocessing", "size", [2 ** 31, 2 ** 31]), "preprocessing.size", "at most 4096"),
    "size 2**64": (_set("preprocessing", "size", [2 ** 64, 2 ** 64]), "preprocessing.size", "at most 4096"),
    "size 7": (_set("preprocessing", "size", [7, 7]), "preprocessing.size", "positive multiple of 8"),
    "size -8": (_set("preprocessing", "size", [-8, 32]), "preprocessing.size", "positive multiple of 8"),
    "size 32.5": (_set("preprocessing", "size", [32.5, 32]), "preprocessing.size", "must be an integer"),
    "mode unknown": (_set("preprocessing", "mode", "crop"), "preprocessing.mode", "resize, pad"),
    "channels 2": (_set("preprocessing", "channels", 2), "preprocessing.channels", "1 or 3"),
    "preprocessing a list": (_set("preprocessing", [1, 2, 3]), "preprocessing", "must be a mapping, got list"),
    "preprocessing unknown key": (_set("preprocessing", "gamma", 2.2), "preprocessing.gamma", "unknown field"),
    "class_names an int": (_set("class_names", 3), "class_names", "list of non-empty class names"),
    "class_names for 2 classes": (_set("class_names", ["a", "b"]), "class_names", "names 2 classes for a 1-class"),
    "num_classes three": (_set("model", "num_classes", "three"), "model.num_classes", "integer from 1 to 256"),
    "num_classes 0": (_set("model", "num_classes", 0), "model.num_classes", "integer from 1 to 256"),
    "se_reduction 0": (_set("model", "se_reduction", 0), "model.se_reduction", "integer from 1 to the narrowest"),
    "filters negative": (_set("model", "filters", [-4, 8, 8, 16]), "model.filters", "4 integer widths"),
    "model a string": (_set("model", "resunetpp"), "model", "must be a mapping, got str"),
    "activation mismatched": (_set("activation", "softmax"), "activation", "must be 'sigmoid' for a 1-class model"),
    "provenance a list": (_set("provenance", [1]), "provenance", "must be a mapping"),
}
#: Only an artifact's sidecar has these.
TAMPERED_SIDECAR = {
    "input_shape huge": (_set("artifact", "input_shape", [1, 3, 40000, 40000]), "artifact.input_shape",
                         "at most 4096"),
    "input_shape text": (_set("artifact", "input_shape", "1x3x32x32"), "artifact.input_shape", "4 dimensions"),
    "artifact a list": (_set("artifact", [1]), "artifact", "must be a mapping"),
}


def tampered_checkpoint(src: Path, dst: Path, mutate) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record = mutate(json.loads(meta["resunetpp"]))
    save_file(tensors, str(dst), metadata={"resunetpp": json.dumps(record)})
    return dst


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_checkpoint_record_is_refused_naming_the_field(work: dict, tmp_path: Path, case: str) -> None:
    mutate, field, problem = TAMPERED[case]
    ckpt = tampered_checkpoint(work["ckpt"], tmp_path / "tampered.safetensors", mutate)
    out = tmp_path / "out"
    one_line(invoke("infer", ckpt, work["images"], "--out", out), re.escape(f"field {field}: ") + ".*" + problem, path=ckpt)
    assert empty(out)  # no mask at all, let alone the same wrong mask for every image


@pytest.mark.parametrize("case", sorted(TAMPERED) + sorted(TAMPERED_SIDECAR))
def test_tampered_sidecar_is_refused_naming_the_sidecar_and_the_field(work: dict, tmp_path: Path, case: str) -> None:
    mutate, field, problem = {**TAMPERED, **TAMPERED_SIDECAR}[case]
    model = save_graph(graph("sigmoid"), tmp_path / "model.onnx", mutate(json.loads(json.dumps(work["record"]))))
    out = tmp_path / "out"
    one_line(invoke("infer", model, work["images"], "--out", out), re.escape(f"field {field}: ") + ".*" + problem,
             path=f"{model}.json")
    assert empty(out)


def test_tampered_record_is_refused_by_evaluate_too(work: dict, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 2, 40)
    ckpt = tampered_checkpoint(work["ckpt"], tmp_path / "inf.safetensors", TAMPERED["std infinite"][0])
    one_line(invoke("evaluate", ckpt, "--data", data), r"field preprocessing\.std: must be finite", path=ckpt)
    model = save_graph(graph("sigmoid"), tmp_path / "nan.onnx",
                       TAMPERED["mean NaN"][0](json.loads(json.dumps(work["record"]))))
    one_line(invoke("evaluate", model, "--data", data), r"field preprocessing\.mean: must be finite",
             path=f"{model}.json")


def test_record_embedded_in_the_onnx_is_checked(work: dict, tmp_path: Path) -> None:
    """No sidecar: the record inside the ONNX file is read, checked and the ONNX file named."""
    from resunetpp.export.onnx_graph import embed_record

    model = graph("sigmoid")
    embed_record(model, TAMPERED["std infinite"][0](json.loads(json.dumps(work["record"]))))
    path = save_graph(model, tmp_path / "embedded.onnx", None)
    one_line(invoke("infer", path, work["images"], "--out", tmp_path / "out"), r"field preprocessing\.std",
             path=path)


@pytest.mark.parametrize("size", [(4104, 4104), (2 ** 31, 8), (0, 8), (12, 12)])
def test_preprocessing_sizes_are_bounded_in_the_library(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="size must be"):
        Preprocessing(size=size)
    assert Preprocessing(size=(MAX_INPUT_SIZE, 8)).size == (MAX_INPUT_SIZE, 8)


@pytest.mark.parametrize("args,pattern", [
    (["train", "--image-size", "7"], r"image_size must be a positive multiple of 8, at most 4096, got 7"),
    (["train", "--image-size", "40000"], "image_size must be a positive multiple of 8, at most 4096, got 40000"),
    (["train", "--image-size", str(2 ** 64)], "image_size must be a positive multiple of 8, at most 4096"),
    (["bench", "--image-size", "7"], "--image-size must be a positive multiple of 8"),
    (["bench", "--image-size", "40000"], "--image-size must be a positive multiple of 8, at most 4096"),
    (["export", "--image-size", "40000"], "--image-size: size must be at most 4096"),
    (["export", "--image-size", "7"], "--image-size: size must be .*positive multiples of 8"),
])
def test_image_size_options_are_bounded(work: dict, tmp_path: Path, args: list[str], pattern: str) -> None:
    command, *rest = args
    data = make_dataset(tmp_path / "data", 2, 32)
    full = {"train": ["train", "--data", data, "--out", tmp_path / "run", *rest],
            "bench": ["bench", work["ckpt"], "--data", data, *rest],
            "export": ["export", work["ckpt"], "--out", tmp_path / "exp", "-f", "onnx", "-p", "fp32", *rest]}[command]
    one_line(invoke(*full), pattern)
    assert not (tmp_path / "run").exists()


def test_pad_mode_refuses_an_image_over_the_largest_network_input(tmp_path: Path) -> None:
    """A 'pad' model runs the network at the image's size: an image wider than 4096 is one line."""
    import torch

    from resunetpp.checkpoint import Checkpoint
    from resunetpp.model import ResUNetPlusPlus

    torch.manual_seed(0)
    ckpt = save_checkpoint(Checkpoint(TINY_H, ResUNetPlusPlus(TINY_H).state_dict(),
                                      Preprocessing(size=(32, 32), mode="pad")), tmp_path / "pad.safetensors")
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rgb(8, MAX_INPUT_SIZE + 8)).save(folder / "wide.png")
    Image.fromarray(rgb(16, 24)).save(folder / "small.png")
    out = tmp_path / "out"
    one_line(invoke("infer", ckpt, folder, "--out", out, "--no-input-warnings"), r"cannot preprocess \(image is 4104x8; preprocessing "
             r"mode 'pad' runs the network at the image's size, at most 4096x4096\)", path=folder / "wide.png",
             lines=2)
    assert (out / "small_mask.png").is_file() and not (out / "wide_mask.png").exists()


# ---- 3. memory on big images -----------------------------------------------------------------------------------


def _blobs(h: int, w: int, classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.uint8)
    for k in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(2, max(h, w) / 4))
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1 + k % max(1, classes - 1) if classes > 1 else 1
    return mask


@pytest.mark.parametrize("h,w,c,classes", [(700, 600, 3, 1), (1030, 520, 1, 4), (5, 7, 3, 1), (513, 257, 4, 3)])
def test_banded_overlay_gives_the_same_pixels(h: int, w: int, c: int, classes: int) -> None:
    image = np.random.default_rng(h).integers(0, 256, (h, w, c), dtype=np.uint8)
    mask = _blobs(h, w, classes, w)
    assert np.array_equal(np.asarray(overlay_image(image, mask, classes)), np.asarray(overlay_before(image, mask, classes)))


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_overlay_memory_is_bounded_by_design() -> None:
    h, w = 4000, 1500
    image = np.zeros((h, w, 3), np.uint8)
    mask = _blobs(h, w, 1, 0)
    before = _peak_bytes(lambda: overlay_before(image, mask, 1)) / (h * w)
    now = _peak_bytes(lambda: overlay_image(image, mask, 1)) / (h * w)
    assert before > 25  # the measurement sees the old whole-image float temporaries (~40 bytes a pixel)
    assert now < 5, now  # one band of temporaries (the result is PIL's, outside numpy)


def test_infer_does_not_hoard_decoded_images(work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight 1000x1000 images, --overlay, batch 4: the pipeline's numpy memory stays within a few
    images' worth. The control, run the way it was before issue 20 (every image of the prefetch
    window kept decoded for its overlay, the overlay from whole-image float temporaries), shows
    what the measurement sees."""
    from resunetpp import engines, outputs
    from resunetpp.engines import infer as infer_mod
    from resunetpp.engines.infer import InferOptions, run_inference
    from resunetpp.sources.images import ImageFiles

    # Scaled down with the images: these count as large, and the overlay bands are 32 rows.
    monkeypatch.setattr(infer_mod, "KEEP_DECODED_PIXELS", 100_000)
    monkeypatch.setattr(outputs, "OVERLAY_BAND_ROWS", 32)
    folder = tmp_path / "big"
    folder.mkdir()
    side = 1000
    for i in range(8):
        Image.fromarray(np.full((side, side, 3), 20 * i, np.uint8)).save(folder / f"b{i}.png")
    paths = sorted(folder.glob("*.png"))

    def peak(out: str) -> float:
        options = InferOptions(out=tmp_path / out, batch_size=4, overlay=True, threads=1)
        with engines.open(work["onnx"]) as engine:
            got = _peak_bytes(lambda: run_inference(engine, ImageFiles(paths), options))
        assert len(list((tmp_path / out).glob("*_overlay.png"))) == 8
        return got / (side * side)

    now = peak("now")
    monkeypatch.setattr(infer_mod, "KEEP_DECODED_PIXELS", 10 ** 12)
    monkeypatch.setattr(infer_mod, "overlay_image", overlay_before)
    before = peak("before")
    assert before > 45, before  # ~65 bytes a pixel of one image
    assert now < 22, now  # ~16: one image decoding, one being written


def test_batches_are_capped_by_pixels(work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resunetpp import engines
    from resunetpp.engines import infer as infer_mod
    from resunetpp.engines.infer import InferOptions, run_inference
    from resunetpp.sources.images import ImageFiles

    monkeypatch.setattr(infer_mod, "MAX_BATCH_PIXELS", 2 * SIZE * SIZE)
    paths = sorted(images(tmp_path / "in", 5).glob("*.png"))
    sizes: list[int] = []
    with engines.open(work["onnx"]) as engine:
        predict = engine.predict
        monkeypatch.setattr(engine, "predict", lambda x: (sizes.append(len(x)), predict(x))[1])
        result = run_inference(engine, ImageFiles(paths), InferOptions(out=tmp_path / "out", batch_size=4))
    assert result.written == 5 and sizes == [2, 2, 1]


# ---- 4. never write over an input ---------------------------------------------------------------------------------
def test_out_equal_to_the_input_folder_never_overwrites_an_input(work: dict, tmp_path: Path) -> None:
    """``infer MODEL same --out same`` with an input ``y_mask.png`` (the issue's probe)."""
    same = tmp_path / "same"
    same.mkdir()
    Image.fromarray(rgb(seed=1)).save(same / "y.png")
    Image.fromarray(rgb(seed=2)).save(same / "y_mask.png")
    before = {p.name: p.read_bytes() for p in same.iterdir()}
    one_line(invoke("infer", work["onnx"], same, "--out", same), "is an input of this run; writing there would "
             r"overwrite it \(choose another --out\)", path=same / "y_mask.png")
    assert {p.name: p.read_bytes() for p in same.iterdir()} == before


def test_out_equal_to_the_input_folder_is_fine_while_names_cannot_collide(work: dict, tmp_path: Path) -> None:
    same = tmp_path / "same"
    same.mkdir()
    Image.fromarray(rgb()).save(same / "a.png")
    assert invoke("infer", work["onnx"], same, "--out", same).exit_code == 0
    mask = (same / "a_mask.png").read_bytes()
    # Run again: a_mask.png is now one of the inputs, and a.png's mask would be written over it.
    one_line(invoke("infer", work["onnx"], same, "--out", same), "is an input of this run", path=same / "a_mask.png")
    assert (same / "a_mask.png").read_bytes() == mask and not (same / "a_mask_mask.png").exists()


@pytest.mark.parametrize("link", ["symlink", "hardlink", "other path"])
def test_an_input_reached_through_another_path_is_not_written_over(work: dict, tmp_path: Path, link: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(rgb()).save(src / "b.png")
    original = (src / "b.png").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    if link == "symlink":
        (out / "b_mask.png").symlink_to(src / "b.png")
        args = [src / "b.png"]
    elif link == "hardlink":
        os.link(src / "b.png", out / "b_mask.png")
        args = [src / "b.png"]
    else:  # the input given as out/../in/b.png, the output folder as in/
        out = src
        (src / "b_mask.png").write_bytes(b"an input too")
        args = [tmp_path / "out" / ".." / "in" / "b.png", src / "b_mask.png"]
    one_line(invoke("infer", work["onnx"], *args, "--out", out), "is an input of this run", path=out / "b_mask.png")
    assert (src / "b.png").read_bytes() == original


def test_json_summary_is_never_written_over_an_input(work: dict, tmp_path: Path) -> None:
    target = work["images"] / "img000.png"
    original = target.read_bytes()
    out = tmp_path / "out"
    one_line(invoke("infer", work["onnx"], work["images"], "--out", out, "--json", target),
             "is an input of this run; writing there would overwrite it", path=target)
    assert target.read_bytes() == original and empty(out)


# ---- 5. concurrent runs into one --out --------------------------------------------------------------------------
def _masks(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*_mask.png"))}


@pytest.mark.slow
def test_a_second_infer_waits_for_the_first(work: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with OutLock(out, INFER_LOCK_NAME) as held:
        assert held.held
        run = Run(["infer", work["onnx"], work["images"], "--out", out], tmp_path / "log")
        run.wait_for(lambda: "waiting for another infer" in run.stderr, "the waiting message")
        time.sleep(0.5)
        assert not list(out.glob("*_mask.png"))  # nothing written while the other run holds the folder
    assert run.wait() == 0, run.stderr
    assert len(list(out.glob("*_mask.png"))) == 3 and not (out / INFER_LOCK_NAME).exists()
    assert f"waiting for another infer into {out} to finish" in run.stderr


@pytest.mark.slow
def test_two_infers_at_different_thresholds_do_not_mix_their_masks(work: dict, tmp_path: Path) -> None:
    """The issue's probe: two runs into one --out at thresholds 0.3 and 0.7 left 4-5 masks of one
    and the rest of the other. Now the second waits: every mask comes from one run."""
    folder = images(tmp_path / "in", 40, 64, 64)
    expected = {}
    for t in ("0.3", "0.7"):
        assert invoke("infer", work["onnx"], folder, "--out", tmp_path / t, "--threshold", t).exit_code == 0
        expected[t] = _masks(tmp_path / t)
    assert expected["0.3"] != expected["0.7"]
    out = tmp_path / "shared"
    runs = [Run(["infer", work["onnx"], folder, "--out", out, "--threshold", t, "--threads", "1"], tmp_path / t / "log")
            for t in ("0.3", "0.7")]
    for run in runs:
        assert run.wait() == 0, run.stderr
    assert _masks(out) in (expected["0.3"], expected["0.7"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_lock_semantics(tmp_path: Path) -> None:
    """The core lock: held while open, its file removed on release, free again after."""
    with OutLock(tmp_path, ".x.lock") as first:
        assert first.held and (tmp_path / ".x.lock").is_file()
    assert not (tmp_path / ".x.lock").exists()
    with OutLock(tmp_path, ".x.lock") as again:
        assert again.held


# ---- 6. temporaries and SIGTERM ------------------------------------------------------------------------------------
def plant_temporaries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(stale ones, ones to keep) in ``folder``, named as this toolkit names its temporaries."""
    folder.mkdir(parents=True, exist_ok=True)
    gone = dead_pid()

    def touch(name: str, seconds: float = 0.0, data: bytes = b"x" * 1000) -> Path:
        path = folder / name
        path.write_bytes(data)
        return age(path, seconds)

    stale_dir = folder / ".model_fp32.k3j2x9ab.partial"  # a staged folder (export's OpenVINO IR), old
    stale_dir.mkdir()
    (stale_dir / "model.bin").write_bytes(b"0" * 100)
    stale = [touch(f".a_mask.png.{gone}-abcdefgh.png.partial"),  # its writer is dead
             touch(".b_mask.png.zyxwvuts.png.partial", 2 * 3600),  # no pid (older versions), old
             touch(".tmpAbC123", 2 * 3600),  # safetensors' own temporary, old
             age(stale_dir, 2 * 3600)]
    keep = [touch(f".c_mask.png.{os.getpid()}-abcdefgh.png.partial"),  # its writer is alive
            touch(".d_mask.png.qwertyui.png.partial", 60),  # no pid, recent: maybe being written
            touch(".tmpXyZ789", 60),
            touch(".keepme", 2 * 3600),  # not a name of ours
            touch("notes.partial", 2 * 3600),  # not hidden: not ours
            touch("e_mask.png", 2 * 3600)]
    return stale, keep


def test_infer_sweeps_stale_temporaries(work: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale, keep = plant_temporaries(out)
    result = invoke("infer", work["onnx"], work["images"], "--out", out)
    assert result.exit_code == 0, result.stderr
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in keep)


def test_train_and_resume_sweep_stale_temporaries(tmp_path: Path, blob_dataset: Path) -> None:
    out = tmp_path / "run"
    stale, keep = plant_temporaries(out)
    base = ["--image-size", "32", "--batch-size", "3", "--device", "cpu"]
    result = invoke("train", "--data", blob_dataset, "--out", out, "--epochs", "1", *base)
    assert result.exit_code == 0, result.output
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in keep)
    # A killed epoch-2 write left its temporaries (a dead writer's 16 MB checkpoint, safetensors'
    # own temporary of an older version); --resume removes them.
    big = out / f".last.safetensors.{dead_pid()}-q1w2e3r4.safetensors.partial"
    big.write_bytes(b"\0" * (16 << 20))
    old = out / ".tmpQ1w2E3"
    old.write_bytes(b"\0" * 1000)
    age(old, 7200)
    assert invoke("train", "--out", out, "--resume", "--epochs", "2").exit_code == 0
    assert not big.exists() and not old.exists() and all(p.exists() for p in keep)


def test_checkpoint_writes_leave_no_safetensors_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints are written through atomic_path (not safetensors' own writer and its ``.tmpXXXXXX``):
    a write interrupted mid-way leaves nothing at all."""
    real = pathlib.Path.write_bytes

    def interrupted(self, data):
        real(self, bytes(data)[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_checkpoint(tmp_path / "ck.safetensors", TINY_H, SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_stops_infer_like_ctrl_c(work: dict, tmp_path: Path) -> None:
    folder = images(tmp_path / "in", 300, 64, 64)
    out = tmp_path / "out"
    run = Run(["infer", work["onnx"], folder, "--out", out, "--threads", "1", "--overlay", "--save-probs"],
              tmp_path / "log")
    run.wait_for(lambda: len(list(out.glob("*_mask.png"))) >= 3, "the first masks")
    rc = run.kill(signal.SIGTERM)
    assert rc == 130, (rc, run.stderr)
    assert "Traceback" not in run.stderr and "interrupted; masks finished before the interrupt are in" in run.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary, no lock
    for mask in out.glob("*_mask.png"):
        assert np.asarray(Image.open(mask)).shape == (64, 64)


@pytest.mark.slow
def test_sigterm_stops_train_like_ctrl_c(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 8, 32, splits={"train": list(range(6)), "val": [6, 7]})
    out = tmp_path / "run"
    run = Run(["train", "--data", data, "--out", out, "--epochs", "200", "--image-size", "32", "--batch-size", "3",
               "--device", "cpu"], tmp_path / "log")
    run.wait_for(lambda: (out / "history.json").is_file(), "the first epoch")
    assert run.kill(signal.SIGTERM) == 130, run.stderr
    assert f"continue with: resunetpp train --out {out} --resume" in run.stderr and "Traceback" not in run.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    load_checkpoint(out / "last.safetensors")


# ---- 7. one line instead of a traceback ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dangling symlink", "symlink loop", "under a file", "read-only parent", "a file"])
def test_bad_out_folder_is_one_line(work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    if case == "dangling symlink":
        out = tmp_path / "dangling"
        out.symlink_to(tmp_path / "nowhere")
        problem = "--out is a symbolic link to a missing target"
    elif case == "symlink loop":
        out = tmp_path / "loop"
        out.symlink_to(tmp_path / "loop")
        problem = "--out is a symbolic link loop"
    elif case == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        problem = "cannot create the --out folder: a part of its path is a file"
    elif case == "a file":
        out = tmp_path / "file.txt"
        out.write_text("x")
        problem = "--out exists and is not a folder"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
        out = parent / "out"
        problem = r"cannot create the --out folder \(Permission denied\)"
        if IS_ROOT:  # root ignores permissions: make mkdir fail as it does for everyone else
            real = pathlib.Path.mkdir

            def mkdir(self, *a, **k):
                if self == out:
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real(self, *a, **k)
            monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    one_line(invoke("infer", work["onnx"], work["images"], "--out", out), problem, path=out)


def test_disk_full_during_train_is_one_line(tmp_path: Path, blob_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pathlib.Path.write_bytes

    def full(self, data):
        if self.name.endswith(".partial"):
            real(self, bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    out = tmp_path / "run"
    one_line(invoke("train", "--data", blob_dataset, "--out", out, "--epochs", "1", "--image-size", "32",
                    "--batch-size", "3", "--device", "cpu"),
             r"cannot write \(No space left on device\)", path=out / "last.safetensors")
    assert [p.name for p in out.iterdir()] == []  # the half-written temporary is gone


@pytest.mark.slow
def test_disk_full_during_export_is_one_line(work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    def full(model, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx, "save_model", full)
    out = tmp_path / "exp"
    result = invoke("export", work["ckpt"], "--out", out, "-f", "onnx", "-p", "fp32", "--static-size", "--batch",
                    "1", "--no-simplify")
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()  # the steps that finished, then one error line, last
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert re.match(r"error: \S+fp32\.onnx: No space left on device$", lines[-1]), lines[-1]
    assert not (out / "model_fp32.onnx").exists() and not list(out.glob(".export-work-*"))


@pytest.mark.parametrize("option,problem", [
    ("shape=abc", r"shape 'abc' \| expected 4 dimensions N,C,H,W"),
    ("shape=1,3,32", r"shape '1,3,32' \| expected 4 dimensions"),
    ("num_streams=xyz", r"num_streams 'xyz' \| expected a positive integer or auto"),
    ("num_streams=0", r"num_streams 0 \| expected a positive integer or auto"),
    ("threads=-2", r"threads -2 \| expected a positive integer"),
    ("performance_hint=fast", r"performance_hint 'fast' \| expected one of latency"),
])
def test_bad_openvino_options_are_one_line(work: dict, tmp_path: Path, option: str, problem: str) -> None:
    pytest.importorskip("openvino")
    one_line(invoke("infer", work["onnx"], work["images"], "--backend", "openvino", "--out", tmp_path / "out",
                    "-O", option), "engine: openvino \\| " + problem, path=work["onnx"])


def test_openvino_shape_option_from_the_command_line_works(work: dict, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    result = invoke("infer", work["onnx"], work["images"], "--backend", "openvino", "--out", tmp_path / "out",
                    "-O", "shape=1,3,32,32", "-O", "num_streams=1", "-O", "threads=1")
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 3


@pytest.mark.parametrize("build,field", [
    ({"gpu": {"compute_capability": "abc"}}, "gpu.compute_capability: expected 'major.minor', got 'abc'"),
    ({"gpu": {"compute_capability": 8.6}}, "gpu.compute_capability: expected 'major.minor', got 8.6"),
    ({"gpu": {"compute_capability": ["x", "y"]}}, "gpu.compute_capability: expected 'major.minor'"),
    ({"gpu": 7}, "artifact.tensorrt.gpu: expected a mapping, got int"),
    ({"gpu": {"name": 5, "compute_capability": "8.0"}}, "gpu.name: expected text, got 5"),
    ({"version": 10}, "artifact.tensorrt.version: expected text, got 10"),
    ({"version": "ten"}, "artifact.tensorrt.version: expected a version such as 10.3.0, got 'ten'"),
    ({"version": "10.3.0", "version_compatible": "yes"}, "version_compatible: expected true or false"),
])
def test_tensorrt_compatibility_check_on_malformed_fields(build: dict, field: str) -> None:
    from resunetpp.engines.tensorrt_engine import check_compatibility

    with pytest.raises(InputFileError, match=r"^m\.engine: malformed TensorRT build record: field .*" + re.escape(field)):
        check_compatibility({"artifact": {"tensorrt": build}}, "10.3.0", "8.0", "m.engine", "NVIDIA A100")
    with pytest.raises(InputFileError, match="malformed TensorRT build record: field artifact.tensorrt: expected a mapping"):
        check_compatibility({"artifact": {"tensorrt": "10.3"}}, "10.3.0", "8.0", "m.engine")
    check_compatibility({"artifact": {"tensorrt": {"version": "10.3.0", "gpu": {"compute_capability": "8.0"}}}},
                        "10.3.0", "8.0", "m.engine")  # a well-formed record of this machine passes


# ---- 8. exit codes and messages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command,option,value,problem", [
    ("infer", "--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("infer", "--threads", "0", "--threads must be at least 1, got 0"),
    ("evaluate", "--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("train", "--batch-size", "0", "batch_size must be a positive integer, got 0"),
    ("train", "--image-size", "7", "image_size must be a positive multiple of 8, at most 4096, got 7"),
    ("bench", "--threads", "0", "--threads must be at least 1, got 0"),
    ("bench", "--image-size", "7", "--image-size must be a positive multiple of 8, at most 4096, got 7"),
    ("bench", "--duration-s", "inf", "--duration-s > 0, both finite and at most 3600 s"),
    ("bench", "--warmup-s", "inf", "both finite"),
])
def test_bad_values_are_one_error_line_and_exit_1(work: dict, tmp_path: Path, command: str, option: str, value: str,
                                                  problem: str) -> None:
    data = make_dataset(tmp_path / "data", 2, 32)
    args = {"infer": ["infer", work["onnx"], work["images"], "--out", tmp_path / "out"],
            "evaluate": ["evaluate", work["ckpt"], "--data", data],
            "train": ["train", "--data", data, "--out", tmp_path / "run", "--device", "cpu"],
            "bench": ["bench", work["ckpt"], "--data", data, "--backends", "torch", "--precisions", "fp32"]}[command]
    start = time.monotonic()
    result = invoke(*args, option, value)
    one_line(result, re.escape(problem))
    assert "Usage" not in result.output + result.stderr and time.monotonic() - start < 60
    assert empty(tmp_path / "out") and not (tmp_path / "run").exists()


def test_split_file_content_is_never_echoed(work: dict, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 2, 32)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\nhunter2-secret-token\n")
    for split in [secret] + ([Path("/etc/passwd")] if Path("/etc/passwd").is_file() else []):
        result = invoke("evaluate", work["ckpt"], "--data", data, "--split", split)
        line = one_line(result, "none of its .* entries names an image in .* \\(is this a split file", path=split)
        first = split.read_text(errors="replace").splitlines()[0]
        assert first not in result.output + result.stderr and "hunter2" not in result.stderr, line
    # A real split file with one missing name still names it (it looks like an image name).
    (data / "val.txt").write_text("img000\nimg999\n")
    one_line(invoke("evaluate", work["ckpt"], "--data", data, "--split", "val"), "e.g. 'img999'")


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
@pytest.mark.parametrize("command", ["infer", "evaluate"])
def test_unreadable_model_says_permission_denied(work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  kind: str, command: str) -> None:
    import builtins
    import shutil

    model = tmp_path / ("m.safetensors" if kind == "checkpoint" else "m.onnx")
    shutil.copyfile(work["ckpt"] if kind == "checkpoint" else work["onnx"], model)
    if kind == "onnx":
        write_sidecar(model, work["record"])
    model.chmod(0)
    if IS_ROOT:  # root reads anything: refuse this file as the kernel does for everyone else
        real = builtins.open

        def guarded(file, *a, **k):
            if str(file) == str(model):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real(file, *a, **k)
        monkeypatch.setattr(builtins, "open", guarded)
    data = make_dataset(tmp_path / "data", 2, 32)
    args = ["infer", model, work["images"], "--out", tmp_path / "out"] if command == "infer" \
        else ["evaluate", model, "--data", data]
    line = one_line(invoke(*args), r"Permission denied", path=model)
    assert "No such file" not in line and "not found" not in line


def test_engine_errors_start_with_the_file(work: dict, tmp_path: Path) -> None:
    """Was ``error: engine: onnxruntime | unknown option(s) bogus | ...``: the file came last or not at all."""
    one_line(invoke("infer", work["onnx"], work["images"], "--out", tmp_path / "out", "-O", "bogus=1"),
             r"^error: \S+good\.onnx: engine: onnxruntime \| unknown option\(s\) bogus \| known: ", path=work["onnx"])
    one_line(invoke("infer", work["onnx"], work["images"], "--out", tmp_path / "out", "--device", "quantum"),
             path=work["onnx"])


@pytest.mark.slow
@pytest.mark.parametrize("name,content,problem", [
    ("garbage.onnx", os.urandom(5000), "not a valid ONNX model"),
    ("garbage.xml", os.urandom(3000), r"not an OpenVINO IR \(expected an XML file whose root element is <net>\)"),
    ("text.xml", b"hello world", "not an OpenVINO IR"),
])
def test_garbage_model_through_openvino_prints_one_line_only(work: dict, tmp_path: Path, name: str, content: bytes,
                                                             problem: str) -> None:
    """OpenVINO tries its TensorFlow frontend on a file the right frontend rejects, which logged six
    lines of protobuf parse errors to stderr (C++, beyond Python's reach): the file is checked first."""
    pytest.importorskip("openvino")
    model = tmp_path / name
    model.write_bytes(content)
    if name.endswith(".xml"):
        model.with_suffix(".bin").write_bytes(b"\0" * 64)
    write_sidecar(model, work["record"])
    proc = subprocess.run([sys.executable, "-m", "resunetpp", "infer", str(model), str(work["images"]), "--backend",
                           "openvino", "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}: ") and re.search(problem, lines[0]), proc.stderr


# ---- the README's promise ---------------------------------------------------------------------------------------
README_PARAGRAPH = """\
Every command reports bad input in one line on stderr and exits with code 1: `error: <file>: <problem>`
when a file is at fault (a missing or unreadable file or folder, an image or model that is not one, a
metadata record with a field out of range), `error: <problem>` for a bad value (`--batch-size 0`,
`--image-size 7`), never a traceback; `infer` reports each image it cannot read in such a line, writes
the others, and adds one line counting the failures. Options that do not parse (an unknown option, a
value that is not a number or not one of the choices, a path that an option requires to exist) get the
usage message of the option parser and exit code 2. Every output is written under a hidden temporary
name and renamed when complete, so an interrupted run never leaves a half-written file under a final
name; `train`, `export`, `infer` and `bench` stop on Ctrl-C or SIGTERM with exit code 130, and the next
`train`, `infer` or `export` into a folder removes the temporaries a killed run left there."""


def test_readme_error_paragraph_is_the_one_tested_here() -> None:
    """The claims above are each exercised by a test of this file or of test_hardening_*.py:
    one line and exit 1 for files and values (sections 1, 2, 7, 8), per-image lines (test_hardening_inputs),
    usage errors exit 2 (test_cli_foundation, test_export), temporaries and signals (section 6,
    test_hardening_interrupt)."""
    text = " ".join((REPO / "README.md").read_text().split())
    assert " ".join(README_PARAGRAPH.split()) in text


def test_usage_errors_keep_exit_code_2(work: dict, tmp_path: Path) -> None:
    for args in (["infer", work["onnx"], work["images"], "--out", tmp_path / "o", "--batch-size", "many"],
                 ["infer", work["onnx"], work["images"], "--out", tmp_path / "o", "--backend", "nope"],
                 ["export", tmp_path / "missing.safetensors", "--out", tmp_path / "e"],
                 ["train", "--bogus"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr, args
