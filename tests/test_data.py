"""Datasets and image reading: every common image kind converted, every bad file named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset
from resunetpp.data import SegmentationDataset, list_images, read_split, resolve_split
from resunetpp.errors import InputFileError
from resunetpp.imageio import read_image, read_mask
from resunetpp.preprocess import Preprocessing, probs_to_mask

pytestmark = pytest.mark.usefixtures("torch_threads")


def _layout(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    return root


def _mask(root: Path, stem: str, size: tuple[int, int] = (24, 16)) -> None:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[4:10, 4:12] = 255
    Image.fromarray(m).save(root / "masks" / f"{stem}.png")


def _rgb(size=(24, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


# (name, writer of the image file, what read_image must return for pixel (0, 0) or a check)
IMAGE_KINDS = {
    "rgb.jpg": lambda p: Image.fromarray(_rgb()).save(p, quality=95),
    "gray.png": lambda p: Image.fromarray(np.full((16, 24), 77, np.uint8), "L").save(p),
    "rgba.png": lambda p: Image.fromarray(np.dstack([_rgb(), np.full((16, 24), 255, np.uint8)]), "RGBA").save(p),
    "gray16.png": lambda p: Image.fromarray(np.full((16, 24), 65535, np.uint16)).save(p),
    "palette.png": lambda p: Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p),
    "cmyk.tif": lambda p: Image.fromarray(_rgb()).convert("CMYK").save(p),
    "bw.bmp": lambda p: Image.fromarray(np.eye(16, 24, dtype=bool)).save(p),
}


@pytest.mark.parametrize("name", sorted(IMAGE_KINDS))
def test_every_image_kind_is_converted(tmp_path: Path, name: str) -> None:
    root = _layout(tmp_path / "ds")
    IMAGE_KINDS[name](root / "images" / name)
    _mask(root, Path(name).stem)
    ds = SegmentationDataset(root)
    image, mask = ds.load(0)
    assert image.shape == (16, 24, 3) and image.dtype == np.uint8
    assert mask.shape == (16, 24) and set(np.unique(mask)) == {0, 1}
    if name == "gray.png":
        assert (image == 77).all()
    if name == "gray16.png":
        assert (image == 255).all()  # 16-bit full scale -> 8-bit full scale, not clipped garbage


def test_rgba_transparency_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert (image[:4] == 200).all() and (image[4:] == 0).all()


def test_grayscale_model_reads_one_channel(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png", channels=1).shape == (16, 24, 1)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        read_image(tmp_path / "c.png", channels=2)


def test_binary_mask_threshold_is_127(tmp_path: Path) -> None:
    m = np.array([[0, 100, 127], [128, 200, 255]], np.uint8).repeat(4, 0).repeat(4, 1)
    Image.fromarray(m).save(tmp_path / "m.png")
    got = read_mask(tmp_path / "m.png")
    assert got[::4, ::4].tolist() == [[0, 0, 0], [1, 1, 1]]
    Image.fromarray(np.dstack([m] * 3)).save(tmp_path / "rgb_mask.png")  # masks saved as RGB
    assert np.array_equal(read_mask(tmp_path / "rgb_mask.png"), got)


def test_multiclass_masks_are_class_indices(tmp_path: Path) -> None:
    m = np.array([[0, 1], [2, 1]], np.uint8).repeat(3, 0).repeat(3, 1)
    Image.fromarray(m, "L").save(tmp_path / "l.png")
    assert np.array_equal(read_mask(tmp_path / "l.png", num_classes=3), m)
    pal = Image.fromarray(m, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "p.png")
    assert np.array_equal(read_mask(tmp_path / "p.png", num_classes=3), m)
    with pytest.raises(InputFileError, match=r"l\.png: mask holds class index 2, but the model has 2 classes"):
        read_mask(tmp_path / "l.png", num_classes=2)


# ---- bad datasets and files: InputFileError naming the file -------------------------------------
def test_mask_of_another_size(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds")
    Image.fromarray(_rgb((24, 16))).save(root / "images" / "a.png")
    _mask(root, "a", size=(20, 16))
    ds = SegmentationDataset(root)
    with pytest.raises(InputFileError, match=r"masks/a\.png: mask is 20x16 but its image a\.png is 24x16"):
        ds.load(0)


def test_image_without_mask(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds")
    Image.fromarray(_rgb()).save(root / "images" / "a.png")
    Image.fromarray(_rgb()).save(root / "images" / "b.jpg")
    _mask(root, "a")
    with pytest.raises(InputFileError, match=r"images/b\.jpg: image has no mask in"):
        SegmentationDataset(root)
    assert len(SegmentationDataset(root, require_masks=False)) == 2


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30])
def test_unreadable_image(tmp_path: Path, content: bytes) -> None:
    root = _layout(tmp_path / "ds")
    (root / "images" / "a.png").write_bytes(content)
    _mask(root, "a")
    ds = SegmentationDataset(root)
    with pytest.raises(InputFileError) as info:
        ds.load(0)
    assert str(info.value).startswith(str(root / "images" / "a.png") + ": ")
    assert "\n" not in str(info.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(_rgb((64, 64))).save(full)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:400])
    with pytest.raises(InputFileError, match=r"cut\.jpg: corrupt or truncated image"):
        read_image(cut)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="data folder not found"):
        SegmentationDataset(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(InputFileError, match="no images/ folder"):
        SegmentationDataset(tmp_path / "flat")
    root = _layout(tmp_path / "empty")
    (root / "images" / "readme.txt").write_text("no images here")
    with pytest.raises(InputFileError, match=r"empty/images: folder holds no images"):
        SegmentationDataset(root)


def test_splits(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", n=5, size=16, splits={"val": [1, 3]})
    assert [s.stem for s in SegmentationDataset(root, "val").samples] == ["img001", "img003"]
    assert len(SegmentationDataset(root, root / "val.txt")) == 2
    assert len(SegmentationDataset(root)) == 5
    assert resolve_split(root, None) is None and resolve_split(root, "val.txt") == root / "val.txt"
    with pytest.raises(InputFileError, match="split file not found"):
        SegmentationDataset(root, "test")
    (root / "bad.txt").write_text("img000\n# comment\nimg999\n")
    with pytest.raises(InputFileError, match=r"bad\.txt: 1 listed image\(s\) not in .* e\.g\. 'img999'"):
        SegmentationDataset(root, "bad")
    (root / "blank.txt").write_text("\n# only a comment\n")
    with pytest.raises(InputFileError, match="split file lists no images"):
        read_split(root / "blank.txt")
    (root / "images" / ".hidden.png").write_bytes(b"x")
    assert len(list_images(root / "images")) == 5


# ---- one preprocessing definition --------------------------------------------------------------------
@pytest.mark.parametrize("mode,hw", [("resize", (37, 53)), ("resize", (256, 256)), ("pad", (37, 53)), ("pad", (40, 48))])
def test_preprocessing_accepts_any_size_and_restores_it(mode: str, hw: tuple[int, int]) -> None:
    pre = Preprocessing(size=(32, 48), mode=mode)
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    x = pre.apply(image)
    assert x.dtype == np.float32 and x.shape[0] == 3
    assert x.shape[1] % 8 == 0 and x.shape[2] % 8 == 0
    assert x.shape[1:] == pre.input_size(*hw)
    if mode == "resize":
        assert x.shape[1:] == (32, 48)
    probs = np.random.default_rng(1).random((1, *x.shape[1:]), dtype=np.float32)
    back = pre.restore(probs, *hw)
    assert back.shape == (1, *hw)
    assert probs_to_mask(back).shape == hw


def test_preprocessing_normalises_with_its_mean_and_std() -> None:
    pre = Preprocessing(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = pre.apply(np.full((8, 8, 3), 255, np.uint8))
    assert np.allclose(x, 2.0)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError, match="positive multiples of 8"):
        Preprocessing(size=(30, 32))
