"""The ``--serve`` MJPEG page in a real browser: headless Chromium's screenshot shows the overlaid frame.

``resunetpp stream`` runs a looping clip of one still frame with ``--serve``; Chromium loads the page
(its ``<img>`` is the ``multipart/x-mixed-replace`` stream) and takes a screenshot. The image's
region of the screenshot must be the overlay computed directly from the same decoded frame (the
model's mask at the same threshold, blended by :func:`resunetpp.outputs.overlay_image`), and
clearly not the raw frame.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_checkpoint

av = pytest.importorskip("av")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (/usr/bin/chromium) is not installed")
WIDTH, HEIGHT = 160, 128


def still_clip(path: Path) -> np.ndarray:
    """25 identical frames (a bright ellipse on a smooth background: JPEG keeps it well); returns it."""
    from resunetpp.video import VideoWriter

    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    image = np.stack([30 + 60 * xx / WIDTH, 40 + 50 * yy / HEIGHT, 60 + 30 * np.sin(xx / 9.0)], axis=2).astype(np.uint8)
    image[((yy - 60) / 35) ** 2 + ((xx - 70) / 45) ** 2 <= 1] = (220, 180, 160)
    with VideoWriter(path, WIDTH, HEIGHT, 25, crf=0) as writer:
        for _ in range(25):
            writer.write(image)
    return image


def expected_overlay(clip: Path, model: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Frame 0 as the pipeline decodes it, the model's mask (threshold: the median probability, so
    about half the frame is marked) and the overlay computed directly."""
    from resunetpp import engines
    from resunetpp.outputs import overlay_image
    from resunetpp.video import VideoReader

    with engines.open(model) as engine, VideoReader(clip, resize_to=engine.preprocessing.size) as reader:
        frame = next(iter(reader))
        pre = engine.preprocessing
        probs = pre.restore(engine.predict(pre.apply(frame.model_input)[None])[0], HEIGHT, WIDTH)[0]
    threshold = float(np.median(probs))
    mask = (probs > threshold).astype(np.uint8)
    return frame.image, mask, np.asarray(overlay_image(frame.image, mask, 1)), threshold


def test_mjpeg_page_screenshot_shows_the_overlay(tmp_path):
    clip = tmp_path / "still.mp4"
    still_clip(clip)
    model = tiny_checkpoint(tmp_path / "tiny.safetensors", size=64)
    raw, mask, expected, threshold = expected_overlay(clip, model)
    assert 0.2 < mask.mean() < 0.8

    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "resunetpp", "stream", str(clip), str(model), "--realtime", "--loop",
                             "--serve", "0", "--threshold", repr(threshold)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 60
        while time.time() < deadline and "watch it at" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "stream exited before serving"
        url = re.search(r"watch it at (http://127\.0\.0\.1:\d+/)", line).group(1)
        for _ in range(100):  # the first overlay is published
            try:
                urllib.request.urlopen(url + "frame.jpg", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        shot = tmp_path / "page.png"
        browser = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=640,480", "--virtual-time-budget=3000",
             f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
        assert shot.is_file(), browser.stderr[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    page = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert page.shape == (480, 640, 3)
    region = page[:HEIGHT, :WIDTH]
    # the <img> shows the overlay (JPEG-compressed): close to the directly computed one ...
    assert np.abs(region - expected).mean() < 6, np.abs(region - expected).mean()
    assert (np.abs(region - expected).max(axis=2) <= 20).mean() > 0.9
    # ... and not the raw frame: inside the mask the pixels are tinted by the overlay colour
    inside = mask.astype(bool)
    assert np.abs(region - raw)[inside].mean() > 15
    assert np.abs(region - expected)[inside].mean() < np.abs(region - raw)[inside].mean() / 3
    # the page is not blank around it: the rest is the page's dark background
    assert page[HEIGHT + 40:, WIDTH + 40:].std() < 5
