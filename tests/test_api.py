"""The one-call Python API: ``resunetpp.load(...)``, ``predict``, ``predict_proba``, ``predict_many``, ``info``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import resunetpp
from conftest import tiny_checkpoint
from resunetpp.engines.infer import InferOptions, infer_path
from resunetpp.errors import ResUNetError

pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (40, 56), (33, 47)]):
        p = tmp_path / "in" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_import_is_light_and_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, resunetpp; print('torch' in sys.modules, resunetpp.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", resunetpp.__version__]
    assert callable(resunetpp.load) and resunetpp.ResUNetPlusPlus.__name__ == "ResUNetPlusPlus"
    with pytest.raises(AttributeError):
        resunetpp.no_such_name  # noqa: B018


def test_predict_matches_infer_for_every_input_kind(tmp_path: Path, images: list[Path]) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    infer_path(ckpt, [str(p) for p in images], InferOptions(out=tmp_path / "out"), device="cpu")
    with resunetpp.load(ckpt, device="cpu") as model:
        for path in images:
            expected = (np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_mask.png")) > 0).astype(np.uint8)
            rgb = np.asarray(Image.open(path).convert("RGB"))
            for given in (path, str(path), Image.open(path), rgb):
                mask = model.predict(given)
                assert mask.shape == rgb.shape[:2] and mask.dtype == np.uint8
                np.testing.assert_array_equal(mask, expected)
            probs = model.predict_proba(rgb)
            assert probs.shape == (1, *rgb.shape[:2]) and probs.dtype == np.float32
            np.testing.assert_array_equal((probs[0] > 0.5).astype(np.uint8), expected)


def test_predict_many_batches_and_keeps_order(tmp_path: Path, images: list[Path]) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    with resunetpp.load(ckpt, device="cpu") as model:
        one = [model.predict_proba(p) for p in images]
        many = list(model.predict_many(images, batch_size=4, proba=True))
        masks = list(model.predict_many(iter(images), batch_size=2))
    assert [m.shape for m in many] == [o.shape for o in one]
    for a, b, m in zip(one, many, masks):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_array_equal(m, (b[0] > 0.5).astype(np.uint8))


def test_info_says_what_runs(tmp_path: Path) -> None:
    with resunetpp.load(tiny_checkpoint(tmp_path / "m.safetensors"), device="cpu", threshold=0.3) as model:
        info = model.info()
    assert (info["backend"], info["device"], info["precision"]) == ("torch", "cpu", "fp32")
    assert info["num_classes"] == 1 and info["class_names"] == ["polyp"] and info["threshold"] == 0.3
    assert info["preprocessing"]["size"]


def test_default_is_the_shipped_model() -> None:
    with resunetpp.load("default", device="cpu") as model:
        assert Path(model.info()["file"]).name == "resunetpp_kvasir.safetensors"
        mask = model.predict(np.zeros((24, 40, 3), np.uint8))
    assert mask.shape == (24, 40)


@pytest.mark.parametrize("bad, message", [
    ("text", "no such file|not found"),
    (np.zeros((8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
    (42, "cannot segment a int"),
])
def test_bad_images_raise_one_clear_error(tmp_path: Path, bad: object, message: str) -> None:
    with resunetpp.load(tiny_checkpoint(tmp_path / "m.safetensors"), device="cpu") as model:
        with pytest.raises(ResUNetError, match=message):
            model.predict(bad)
    with pytest.raises(ResUNetError, match="threshold"):
        resunetpp.load(tiny_checkpoint(tmp_path / "m2.safetensors"), device="cpu", threshold=1.0)
