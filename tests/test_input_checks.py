"""Input the model was not trained for (issue 21, item 7): grayscale or tiny images get one warning
per run, in ``infer`` and in ``resunetpp.load``; ``--no-input-warnings`` / ``input_warnings=False``
silence it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_checkpoint
from resunetpp.cli import app
from resunetpp.engines.api import load
from resunetpp.input_checks import InputWarner, input_problem

runner = CliRunner()


def colour(h=96, w=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_input_problem():
    assert input_problem(colour()) is None
    gray = np.repeat(colour()[:, :, :1], 3, axis=2)
    assert input_problem(gray) == "grayscale"
    assert input_problem(colour(32, 200)).startswith("tiny (32x200")
    nearly = gray.astype(np.int16)
    nearly[..., 2] += 1  # JPEG noise on a gray image is still gray
    assert input_problem(np.clip(nearly, 0, 255).astype(np.uint8)) == "grayscale"


def test_warner_warns_once():
    lines = []
    warner = InputWarner(lines.append)
    gray = np.repeat(colour()[:, :, :1], 3, axis=2)
    for name in ("a.png", "b.png"):
        warner.check(name, gray)
    assert len(lines) == 1 and lines[0].startswith("a.png is grayscale: the model was trained on RGB")
    silent = []
    InputWarner(silent.append, enabled=False).check("a.png", gray)
    InputWarner(silent.append, channels=1).check("a.png", gray)  # a grayscale model expects gray
    assert silent == []


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(colour(seed=i)).convert("L").save(folder / f"g{i}.png")
    Image.fromarray(colour(seed=9)).save(folder / "c.png")
    return folder


def test_infer_warns_once_and_the_flag_silences_it(tmp_path, images):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", size=32)
    result = runner.invoke(app, ["infer", str(ckpt), str(images), "-o", str(tmp_path / "o1"), "--device", "cpu"])
    assert result.exit_code == 0, result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "is grayscale" in lines[0] and "--no-input-warnings" in lines[0]
    quiet = runner.invoke(app, ["infer", str(ckpt), str(images), "-o", str(tmp_path / "o2"), "--device", "cpu",
                                "--no-input-warnings"])
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr
    assert len(list((tmp_path / "o2").glob("*_mask.png"))) == 4


def test_load_warns_once(tmp_path, images):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", size=32)
    with load(ckpt) as model, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(model.predict_many(sorted(images.iterdir())))
        model.predict(np.asarray(Image.open(images / "g0.png").convert("RGB")))
    assert len([w for w in caught if "grayscale" in str(w.message)]) == 1
    with load(ckpt, input_warnings=False) as model, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict(images / "g0.png")
    assert not [w for w in caught if "grayscale" in str(w.message)]
