"""Sources: image files / folders / globs with ``resunetpp infer``'s exact rules, keys, and the registry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import resunetpp.sources as sources
from resunetpp.errors import InputFileError, ResUNetError
from resunetpp.sources import Item, Source, open_source, register_source, registered_sources, unique_keys
from resunetpp.sources.images import ImageFiles, expand_inputs


def _png(path: Path, h: int = 12, w: int = 20, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    img[:, : w // 2, 0] = 200
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The registry, restored after the test (a test may register its own sources)."""
    registered_sources()  # the package's own sources are in
    saved = dict(sources._SOURCES)
    monkeypatch.setattr(sources, "_SOURCES", saved)
    return saved


# ---- image files, folders, globs ------------------------------------------------------------------------
def test_folders_are_not_recursive_and_skip_hidden_and_non_image_files(tmp_path: Path) -> None:
    b = _png(tmp_path / "in" / "b.png")
    a = _png(tmp_path / "in" / "a.JPG")  # the suffix is matched case-insensitively
    _png(tmp_path / "in" / ".hidden.png")
    _png(tmp_path / "in" / "deep" / "c.png")
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "dir.png").mkdir()
    assert expand_inputs([tmp_path / "in"]) == [a, b]  # sorted


def test_explicit_files_duplicates_and_globs(tmp_path: Path) -> None:
    a = [_png(tmp_path / "a" / f"img{i}.png") for i in range(2)]
    deep = _png(tmp_path / "b" / "deep" / "img9.png")
    notes = tmp_path / "a" / "notes.txt"
    notes.write_text("not an image")
    got = expand_inputs([tmp_path / "a", str(a[1]), str(tmp_path / "**" / "*.png")])
    assert got == [a[0], a[1], deep]  # folder first, the duplicate dropped, the glob recursing
    assert expand_inputs([notes]) == [notes]  # explicit: kept whatever the suffix
    assert expand_inputs([str(tmp_path / "a" / "*")]) == a  # a glob picks images only
    spelled_twice = tmp_path / "a" / ".." / "a" / "img0.png"
    assert expand_inputs([a[0], spelled_twice]) == [a[0]]  # the same file, however it is written
    assert expand_inputs([str(tmp_path / "a" / "img?.png"), a[0]]) == a


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    with pytest.raises(InputFileError, match="no such file or folder") as e:
        open_source([tmp_path / "x.png", tmp_path / "nope.png"])
    assert e.value.path == str(tmp_path / "nope.png")
    with pytest.raises(InputFileError, match="the pattern matches no image file") as e:
        open_source([str(tmp_path / "*.jpg")])
    assert e.value.path == str(tmp_path / "*.jpg")


def test_keys_are_stems_made_unique(tmp_path: Path) -> None:
    assert unique_keys(["a", "a", "a", "b"]) == ["a", "a-2", "a-3", "b"]
    assert unique_keys(["a", "a-2", "a"]) == ["a", "a-2", "a-3"]  # an input already named a-2 keeps it
    assert unique_keys(["a-2", "a", "a"]) == ["a-2", "a", "a-3"]
    paths = [_png(tmp_path / "x" / "a.png"), _png(tmp_path / "y" / "a.jpg"), _png(tmp_path / "a.bmp"),
             _png(tmp_path / "b.png")]
    source = open_source([str(p) for p in paths])
    assert isinstance(source, ImageFiles) and source.count == 4
    items = list(source)
    assert [i.key for i in items] == ["a", "a-2", "a-3", "b"]
    assert [i.origin for i in items] == paths


def test_image_files_keep_repeats_and_decode_when_loaded(tmp_path: Path) -> None:
    p = _png(tmp_path / "a.png", 12, 20)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    source = ImageFiles([p, p, broken])  # as given: the repeat is a second item
    items = list(source)  # nothing is decoded yet: the broken file does not fail here
    assert [i.key for i in items] == ["a", "a-2", "broken"]
    rgb, gray = items[0].load(3), items[1].load(1)
    assert rgb.shape == (12, 20, 3) and gray.shape == (12, 20, 1) and rgb.dtype == gray.dtype == np.uint8
    assert rgb[0, 0, 0] == 200 and rgb[0, -1, 0] == 0
    with pytest.raises(InputFileError, match="broken.png: not a readable image"):
        items[2].load(3)
    assert [i.key for i in source] == ["a", "a-2", "broken"]  # a finite source iterates again


def test_items_check_their_key_and_image() -> None:
    for bad in ("", ".", "..", "a/b", "a\0b"):
        with pytest.raises(ValueError, match="cannot name an output file"):
            Item(bad, "origin", lambda c: np.zeros((2, 2, c), np.uint8))
    ok = Item("k", "frame 3", lambda c: np.zeros((4, 5, c), np.uint8))
    assert ok.load(1).shape == (4, 5, 1)
    for wrong in (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.uint8), np.zeros((0, 5, 3), np.uint8), None):
        item = Item("k", "frame 3", lambda c, w=wrong: w)
        with pytest.raises(TypeError, match="frame 3: the source gave .* expected \\(H, W, 3\\) uint8"):
            item.load(3)


# ---- the registry ---------------------------------------------------------------------------------------
def test_a_source_registered_anywhere_is_found(registry: dict, tmp_path: Path) -> None:
    @register_source
    class Frames(Source):  # what a video source looks like: arrays decoded elsewhere, keys per frame
        name = "test-frames"
        priority = 10
        closed = False

        def __init__(self, url: str) -> None:
            self.url = url

        @classmethod
        def claims(cls, inputs):
            return len(inputs) == 1 and inputs[0].startswith("frames://")

        @classmethod
        def from_inputs(cls, inputs):
            return cls(inputs[0])

        def __iter__(self):
            for i in range(3):
                frame = np.full((6, 8, 3), i, np.uint8)
                yield Item(f"clip_{i:06d}", (self.url, i), lambda c, f=frame: f if c == 3 else f[:, :, :1])

        def close(self) -> None:
            type(self).closed = True

    assert registered_sources()[0] is Frames and ImageFiles in registered_sources()
    with open_source(["frames://cam0"]) as source:
        assert isinstance(source, Frames) and source.count is None
        items = list(source)
    assert Frames.closed
    assert [i.key for i in items] == ["clip_000000", "clip_000001", "clip_000002"]
    assert items[2].origin == ("frames://cam0", 2) and items[2].load(1).shape == (6, 8, 1)
    p = _png(tmp_path / "a.png")
    assert isinstance(open_source([p]), ImageFiles)  # inputs it does not claim go to the image files


def test_registration_is_checked(registry: dict) -> None:
    class Nameless(Source):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="needs a name"):
        register_source(Nameless)
    with pytest.raises(TypeError, match="Source subclass"):
        register_source(int)

    class Impostor(Nameless):
        name = "images"

    with pytest.raises(ValueError, match="'images' is taken by resunetpp.sources.images.ImageFiles"):
        register_source(Impostor)
    assert registry["images"] is ImageFiles
    registry.clear()
    with pytest.raises(ResUNetError, match="no source reads these inputs"):
        open_source(["anything"])


def test_a_new_module_in_the_package_registers_itself(registry: dict, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The seam for video files and streams: one new module in resunetpp/sources/, no list to edit."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "fakevideo.py").write_text(
        "from resunetpp.sources import Source, register_source\n\n\n"
        "@register_source\n"
        "class FakeVideo(Source):\n"
        "    name = 'fake-video'\n"
        "    priority = 5\n\n"
        "    @classmethod\n"
        "    def claims(cls, inputs):\n"
        "        return all(i.endswith('.fakevid') for i in inputs)\n\n"
        "    @classmethod\n"
        "    def from_inputs(cls, inputs):\n"
        "        return cls()\n\n"
        "    def __iter__(self):\n"
        "        return iter(())\n")
    (plugin / "_private.py").write_text("raise RuntimeError('modules named _* are not imported')\n")
    monkeypatch.setattr(sources, "__path__", [*sources.__path__, str(plugin)])
    monkeypatch.setattr(sources, "_discovered", False)
    monkeypatch.delitem(sys.modules, "resunetpp.sources.fakevideo", raising=False)
    try:
        found = registered_sources()
        names = [cls.name for cls in found]
        assert "fake-video" in names and names[-1] == "images"  # besides the package's own (video ...)
        assert [c.priority for c in found] == sorted((c.priority for c in found), reverse=True)
        assert type(open_source(["clip.fakevid"])).__name__ == "FakeVideo"
    finally:
        sys.modules.pop("resunetpp.sources.fakevideo", None)
