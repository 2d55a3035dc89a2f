"""``resunetpp infer`` and its pipeline: inputs, prefetch, batching, TTA, outputs, failures."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from resunetpp import engines
from resunetpp.cli import app
from conftest import blob_pair
from resunetpp.engines.base import Engine
from resunetpp.checkpoint import load_checkpoint
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.engines.infer import InferOptions, prefetch, run_inference, tta_predict
from resunetpp.outputs import mask_image, overlay_image, palette
from resunetpp.sources.images import ImageFiles
from test_engines import make_artifacts, make_checkpoint

runner = CliRunner()


def _images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, mode: str = "RGB") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        img, _ = blob_pair(rng, max(h, w))
        p = folder / f"img{i:02d}.png"
        Image.fromarray(img[:h, :w]).convert(mode).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("infer-models")
    return {"binary": make_artifacts(root / "binary", backends=("torch", "onnxruntime")),
            "multi": {"torch": make_checkpoint(root / "multi.safetensors", num_classes=3, mode="pad", seed=1)}}


def _no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".partial")]


# ---- the CLI ---------------------------------------------------------------------------------------------
def test_cli_folder_with_a_corrupt_file(models: dict, tmp_path: Path) -> None:
    images = _images(tmp_path / "in", [(37, 53), (40, 40), (64, 48)])
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(models["binary"]["torch"]), str(tmp_path / "in"), "--out", str(out),
                                 "--overlay", "--batch-size", "2"])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "broken.jpg: corrupt or truncated image" in lines[0]
    assert "1 of 4 image(s) failed" in result.stderr
    for p in images:
        with Image.open(out / f"{p.stem}_mask.png") as mask, Image.open(p) as img:
            assert mask.size == img.size and mask.mode == "L"
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert (out / f"{p.stem}_overlay.png").is_file()
    assert not (out / "broken_mask.png").exists() and _no_partials(out)
    assert "end-to-end img/s" in result.stdout and "model-only img/s" in result.stdout


def test_cli_backends_agree(models: dict, tmp_path: Path) -> None:
    if "onnxruntime" not in models["binary"]:
        pytest.skip("onnxruntime unavailable")
    _images(tmp_path / "in", [(37, 53), (48, 32)], seed=3)
    masks = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        result = runner.invoke(app, ["infer", str(models["binary"][backend]), str(tmp_path / "in" / "*.png"),
                                     "--out", str(out), "--save-probs", "--probs-dtype", "float32", "--device", "cpu",
                                     "--json", str(out / "run.json")])
        assert result.exit_code == 0, result.output
        masks[backend] = {p.name: np.load(p) for p in sorted(out.glob("*_probs.npy"))}
        assert '"failed": 0' in (out / "run.json").read_text()
    assert list(masks["torch"]) == ["img00_probs.npy", "img01_probs.npy"]
    for name, probs in masks["torch"].items():
        assert probs.shape in ((1, 37, 53), (1, 48, 32)) and probs.dtype == np.float32
        assert np.abs(probs - masks["onnxruntime"][name]).max() < 1e-4


def test_cli_refusals(models: dict, tmp_path: Path) -> None:
    _images(tmp_path / "in", [(32, 32)])
    ckpt = str(models["binary"]["torch"])
    cases = [
        (["infer", ckpt, str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")], "no such file or folder"),
        (["infer", ckpt, str(tmp_path / "in" / "*.tif"), "--out", str(tmp_path / "o")], "matches no image file"),
        (["infer", ckpt, str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--threshold", "1.5"],
         "--threshold must be between 0 and 1"),
        (["infer", ckpt, str(tmp_path / "in"), "--out", str(tmp_path / "o"), "-O", "bogus"], "expected KEY=VALUE"),
        (["infer", ckpt, str(tmp_path / "in"), "--out", str(tmp_path / "o"), "-O", "turbo=1"], "unknown option(s) turbo"),
        (["infer", str(tmp_path / "missing.onnx"), str(tmp_path / "in"), "--out", str(tmp_path / "o")],
         "model file not found"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["infer", ckpt, str(tmp_path / "in"), "--out", str(tmp_path / "file")])
    assert result.exit_code == 1 and "--out exists and is not a folder" in result.stderr


def test_cli_default_model_on_the_sample_images(tmp_path: Path) -> None:
    from resunetpp.data import SegmentationDataset
    from resunetpp.defaults import default_data_path, default_model_path
    from resunetpp.engines.evaluate import evaluate_path
    from resunetpp.imageio import read_mask
    from resunetpp.metrics import dice

    data = default_data_path()
    if default_model_path() is None or data is None:
        pytest.skip("this install ships no default model or sample data")
    samples = list(SegmentationDataset(data))[:2]
    result = runner.invoke(app, ["infer", "default", *[str(s.image_path) for s, _, _ in samples], "--out",
                                 str(tmp_path), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    scores = [dice(read_mask(tmp_path / f"{s.stem}_mask.png"), m) for s, _, m in samples]
    assert min(scores) > 0.5, scores  # the shipped Kvasir-SEG model finds the polyps
    (tmp_path / "two.txt").write_text("".join(f"{s.stem}\n" for s, _, _ in samples))
    reference = evaluate_path(default_model_path(), data, tmp_path / "two.txt", device="cpu").rows
    assert scores == pytest.approx([r["dice"] for r in reference], abs=1e-9)  # the same masks as evaluate


# ---- the library pipeline ------------------------------------------------------------------------------
def test_outputs_are_named_from_the_source_keys(models: dict, tmp_path: Path) -> None:
    """Repeated stems get -2, -3 (the source's keys); the failure names the item's origin; the
    run consumes a source lazily and refuses a source whose keys collide, and a plain list."""
    from resunetpp.sources import Item, Source

    a = _images(tmp_path / "x", [(24, 16)])[0]
    b = _images(tmp_path / "y", [(16, 24)], seed=1)[0]
    broken = tmp_path / "img00.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    with engines.open(models["binary"]["torch"]) as engine:
        res = run_inference(engine, ImageFiles([a, b, broken, a]), InferOptions(out=out))
        assert (res.images, res.written) == (4, 3)
        assert [(str(f.origin), f.message.split(":")[0]) for f in res.failures] == [(str(broken), str(broken))]
        assert res.as_dict()["failures"][0]["image"] == str(broken)
        assert sorted(p.name for p in out.iterdir()) == ["img00-2_mask.png", "img00-4_mask.png", "img00_mask.png"]
        with Image.open(out / "img00-2_mask.png") as m2:
            assert m2.size == (24, 16)  # b, the second item

        class Frames(Source):
            name = "test-frames"

            def __init__(self, keys: list[str]) -> None:
                self.keys, self.pulled = keys, 0

            def __iter__(self):
                for i, key in enumerate(self.keys):
                    self.pulled += 1
                    yield Item(key, ("cam", i), lambda c, i=i: np.full((20, 30, c), 40 * i, np.uint8))

        frames = Frames(["f0", "f1", "f2"])
        res = run_inference(engine, frames, InferOptions(out=tmp_path / "frames", batch_size=2))
        assert (res.images, res.written, frames.pulled) == (3, 3, 3)
        assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["f0_mask.png", "f1_mask.png", "f2_mask.png"]
        with pytest.raises(ValueError, match="yields the key 'f0' twice"):
            run_inference(engine, Frames(["f0", "f1", "f0"]), InferOptions(out=tmp_path / "dup"))
        with pytest.raises(TypeError, match="takes a resunetpp.sources.Source"):
            run_inference(engine, [a, b], InferOptions(out=tmp_path / "list"))


def test_prefetch_keeps_order_and_bounds_the_queue() -> None:
    in_flight, peak, lock = 0, 0, threading.Lock()

    def load(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.002 * (i % 3))
        if i == 5:
            raise InputFileError(f"img{i}", "broken")
        return i * 10

    got = []
    with ThreadPoolExecutor(4) as pool:
        for i, value in prefetch(list(range(20)), load, pool, depth=3):
            got.append((i, value if isinstance(value, int) else str(value)))
            with lock:
                in_flight -= 1
    assert [i for i, _ in got] == list(range(20))
    assert got[5] == (5, "img5: broken") and got[6] == (6, 60)
    assert peak <= 3


def test_tta_undoes_the_flips() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 16)).astype(np.float32)

    def equivariant(b: np.ndarray) -> np.ndarray:  # pixel-wise: flip-equivariant, TTA changes nothing
        return 1.0 / (1.0 + np.exp(-b[:, :1]))

    np.testing.assert_allclose(tta_predict(equivariant, x), equivariant(x), atol=1e-6)
    ramp = np.broadcast_to(np.linspace(0, 1, 16, dtype=np.float32), (1, 8, 16))
    calls = []

    def biased(b: np.ndarray) -> np.ndarray:  # ignores the image: a left-to-right ramp
        calls.append(b.shape)
        return np.broadcast_to(ramp, (b.shape[0], 1, 8, 16)).copy()

    out = tta_predict(biased, x)
    assert calls == [(6, 3, 8, 16)]  # one engine call for the three views
    # mean of ramp, flipped-back flipped ramp (the mirrored ramp) and the ramp again
    np.testing.assert_allclose(out[0, 0], (2 * ramp[0] + ramp[0][:, ::-1]) / 3, atol=1e-6)


def test_tta_and_batching_through_an_engine(models: dict, tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", [(37, 53), (40, 40), (37, 53), (64, 48), (40, 40)], seed=2)
    outs = {}
    with engines.open(models["multi"]["torch"]) as engine:  # pad mode: input sizes differ per image
        for name, opts in {"b1": dict(batch_size=1), "b3": dict(batch_size=3), "tta": dict(batch_size=2, tta=True)}.items():
            res = run_inference(engine, ImageFiles(paths), InferOptions(out=tmp_path / name, save_probs=True,
                                                            probs_dtype="float32", **opts))
            assert (res.images, res.written, res.failures) == (5, 5, [])
            outs[name] = {p.stem: np.load(tmp_path / name / f"{p.stem}_probs.npy") for p in paths}
    for p in paths:
        h, w = Image.open(p).size[::-1]
        assert outs["tta"][p.stem].shape == (3, h, w)
        np.testing.assert_allclose(outs["b3"][p.stem], outs["b1"][p.stem], atol=1e-5)
        np.testing.assert_allclose(outs["tta"][p.stem].sum(axis=0), 1.0, atol=1e-5)
        assert np.abs(outs["tta"][p.stem] - outs["b1"][p.stem]).max() > 1e-3  # the flips changed something
        with Image.open(tmp_path / "b1" / f"{p.stem}_mask.png") as mask:
            assert mask.mode == "P" and mask.size == (w, h)
            assert np.asarray(mask).max() < 3
            np.testing.assert_array_equal(np.asarray(mask), outs["b1"][p.stem].argmax(axis=0))


def test_grayscale_and_rgba_files(models: dict, tmp_path: Path) -> None:
    gray = _images(tmp_path / "in", [(33, 41)], mode="L")[0]
    rgba = tmp_path / "in" / "rgba.png"
    Image.open(gray).convert("RGBA").save(rgba)
    with engines.open(models["binary"]["torch"]) as engine:
        res = run_inference(engine, ImageFiles([gray, rgba]), InferOptions(out=tmp_path / "out", overlay=True))
    assert res.written == 2
    for stem in ("img00", "rgba"):
        assert Image.open(tmp_path / "out" / f"{stem}_mask.png").size == (41, 33)
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").mode == "RGB"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "img00_mask.png")),
                                  np.asarray(Image.open(tmp_path / "out" / "rgba_mask.png")))


class _NaNEngine(Engine):
    backend = "nan-test"

    def _load_impl(self) -> None:
        pass

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return np.full((batch.shape[0], 1, *batch.shape[2:]), np.nan, np.float32)

    def _close_impl(self) -> None:
        pass


def test_a_non_finite_engine_fails_each_image(models: dict, tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", [(32, 32), (40, 24)])
    lines: list[str] = []
    with _NaNEngine("nan.bin", load_checkpoint(models["binary"]["torch"]).metadata()) as engine:
        res = run_inference(engine, ImageFiles(paths), InferOptions(out=tmp_path / "out"), on_error=lines.append)
    assert (res.written, len(res.failures)) == (0, 2)
    assert [ln.split(":")[0] for ln in lines] == [str(p) for p in paths]
    assert all("prediction is not finite" in ln and "NaN/Inf" in ln for ln in lines)
    assert not list((tmp_path / "out").glob("*.png"))


def test_overlay_and_mask_images() -> None:
    image = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40] = 1
    over = np.asarray(overlay_image(image, mask, 1))
    green = palette(1)[1]
    assert over.shape == (40, 60, 3)
    assert (over[0, 0] == 100).all() and (over[35, 5] == 100).all()  # outside: untouched
    inner = over[20, 30].astype(int)
    assert np.abs(inner - (0.6 * 100 + 0.4 * green.astype(int))).max() <= 1  # translucent fill
    assert (over[10, 30] == green).all() and (over[20, 20] == green).all()  # the contour
    binary = mask_image(mask, 1)
    assert binary.mode == "L" and set(np.unique(np.asarray(binary))) == {0, 255}
    multi = mask_image(mask * 2, 3)
    assert multi.mode == "P" and np.asarray(multi).max() == 2
    assert multi.getpalette()[:9] == [0, 0, 0, *palette(3)[1].tolist(), *palette(3)[2].tolist()]


def test_options_are_validated(tmp_path: Path) -> None:
    for kwargs, message in [({"batch_size": 0}, "--batch-size"), ({"threshold": 0.0}, "--threshold"),
                            ({"threads": 0}, "--threads"), ({"probs_dtype": "int8"}, "--probs-dtype")]:
        with pytest.raises(ResUNetError, match=message):
            InferOptions(out=tmp_path, **kwargs).validate()


def test_progress_bar_reports_images_per_second(models: dict, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from resunetpp.cli.infer import _infer_progress
    from resunetpp.engines.infer import infer_path

    paths = _images(tmp_path / "in", [(32, 32)] * 3)
    screen = io.StringIO()
    result = infer_path(models["binary"]["torch"], [tmp_path / "in"], InferOptions(out=tmp_path / "out"),
                        progress_factory=_infer_progress(Console(file=screen, force_terminal=True, width=100)))
    assert result.written == len(paths) == 3 and result.inferred == 3
    assert "3/3" in screen.getvalue() and "img/s" in screen.getvalue()
    assert result.model_images_per_second > 0 and result.images_per_second > 0
