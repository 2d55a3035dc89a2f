"""Shared fixtures: tiny model configs, synthetic datasets, tiny checkpoints, the Kvasir-SEG path.

Unit tests run on tiny widths and 32-64 px images so the whole suite takes minutes on 2 cores.
Tests that need the real data use ``kvasir_root``, which skips cleanly when it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resunetpp.checkpoint import Checkpoint, save_checkpoint
from resunetpp.model import ModelConfig, ResUNetPlusPlus
from resunetpp.preprocess import Preprocessing

REPO = Path(__file__).resolve().parents[1]
KVASIR = REPO.parent / "shared" / "data" / "kvasir-seg"

#: Smallest widths the default SE reduction (8) allows: every width // 8 >= 1.
TINY = ModelConfig(filters=(8, 8, 16, 16), bridge=16)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty calibration cache (resunetpp.cache), never ~/.cache/resunetpp."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("RESUNETPP_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """Run the test with few torch intra-op threads (default 1), restoring the setting after.

    Tiny models gain nothing from threads, and on a busy machine torch's OpenMP workers spin-wait:
    25 training steps of a tiny model took 33 s with 2 threads under load, 1.6 s with 1.
    ``RESUNETPP_TEST_THREADS`` overrides. Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("torch_threads")`` (results that depend on the exact
    float reduction order, e.g. a model trained inside a fixture, change with the thread count).
    """
    before = torch.get_num_threads()
    n = int(os.environ.get("RESUNETPP_TEST_THREADS", "1"))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def kvasir_root() -> Path:
    """``../shared/data/kvasir-seg`` relative to the repo root; skips the test when absent."""
    if not (KVASIR / "images").is_dir() or not (KVASIR / "masks").is_dir():
        pytest.skip(f"Kvasir-SEG not found at {KVASIR}")
    return KVASIR


def blob_pair(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with one bright ellipse; the mask (0/255) is the ellipse."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    ry, rx = rng.uniform(0.15, 0.3, 2) * size
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
    img[inside] = np.clip(rng.integers(170, 255, (int(inside.sum()), 3)), 0, 255).astype(np.uint8)
    return img, (inside * 255).astype(np.uint8)


def make_dataset(root: Path, n: int = 8, size: int = 32, seed: int = 0,
                 splits: dict[str, list[int]] | None = None, prefix: str = "img") -> Path:
    """Write ``n`` blob images/masks (PNG) named ``<prefix><i:03d>`` in the Kvasir-SEG layout under ``root``.

    ``splits`` maps a split name to image indices, written as ``root/NAME.txt``.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = blob_pair(rng, size)
        Image.fromarray(img).save(root / "images" / f"{prefix}{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{prefix}{i:03d}.png")
    for name, idx in (splits or {}).items():
        (root / f"{name}.txt").write_text("".join(f"{prefix}{i:03d}\n" for i in idx))
    return root


@pytest.fixture
def blob_dataset(tmp_path: Path) -> Path:
    """8 blob images 32x32 with ``train.txt`` (6) and ``val.txt`` (2)."""
    return make_dataset(tmp_path / "blobs", 8, 32, splits={"train": list(range(6)), "val": [6, 7]})


def tiny_checkpoint(path: Path, config: ModelConfig = TINY, size: int = 32, seed: int = 0,
                    dtype: torch.dtype | None = None) -> Path:
    """A randomly initialised tiny model saved as a checkpoint at ``path``."""
    torch.manual_seed(seed)
    model = ResUNetPlusPlus(config).eval()
    names = ["polyp"] if config.num_classes == 1 else [f"class{i}" for i in range(config.num_classes)]
    ckpt = Checkpoint(config, model.state_dict(), Preprocessing(size=(size, size)), names, {"test": True})
    return save_checkpoint(ckpt, path, dtype=dtype)


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "tiny.safetensors")
