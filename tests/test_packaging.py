"""What ``pip install resunetpp`` puts on a machine: one top-level name, and a CLI that runs from it.

Builds the wheel from this checkout (``pip wheel --no-deps``), checks its contents, then runs the
unpacked wheel -- not the checkout -- as ``python -m resunetpp`` from an unrelated folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _source_tree(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored), copied to
    ``dest``: setuptools writes build/ and *.egg-info beside the sources, never into the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = _source_tree(tmp_path_factory.mktemp("source"))
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, env=env, cwd=source)
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = list(out.glob("resunetpp-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_the_only_top_level_name_is_resunetpp(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"resunetpp"}
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top_level:  # setuptools writes it; its content is what installers list
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["resunetpp"]


def test_the_wheel_holds_every_layer_and_the_shipped_model(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("resunetpp/model.py", "resunetpp/engines/__init__.py", "resunetpp/engines/base.py",
                   "resunetpp/export/__init__.py", "resunetpp/export/pipeline.py", "resunetpp/bench/__init__.py",
                   "resunetpp/bench/harness.py", "resunetpp/cli/__init__.py", "resunetpp/__main__.py",
                   "resunetpp/weights/resunetpp_kvasir.safetensors", "resunetpp/video.py",
                   "resunetpp/sources/video.py", "resunetpp/engines/video_infer.py",
                   "resunetpp/sample_data/clip.mp4"):
        assert module in names, module
    assert any(n.startswith("resunetpp/sample_data/images/") for n in names)
    assert not any(n.startswith(("tests/", "export/", "engines/", "benchmarks/", "cli/")) for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "resunetpp = resunetpp.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_unpacked_wheel_runs_its_cli_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable finder
    code = ("import resunetpp.export, resunetpp.engines, resunetpp.bench, resunetpp.cli; "
            "print(resunetpp.export.__file__); print(resunetpp.cli.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(str(site)) for line in done.stdout.split())
    done = subprocess.run([sys.executable, "-m", "resunetpp", "--help"], cwd=elsewhere, capture_output=True,
                          text=True, env={**env, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    for command in ("train", "evaluate", "info", "export", "infer", "bench", "quantize"):
        assert f" {command} " in done.stdout
