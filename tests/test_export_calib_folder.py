"""``export --calib <plain folder>`` for INT8 (issue 21, item 9): one error line naming the folder and
why, no blank line before it."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from conftest import make_dataset, tiny_checkpoint
from resunetpp.cli import app

runner = CliRunner()


@pytest.fixture
def plain(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", size=32)
    root = make_dataset(tmp_path / "ds", 4, seed=1, prefix="im")
    folder = tmp_path / "plain"
    shutil.copytree(root / "images", folder)
    return ckpt, folder


def test_plain_calib_folder_without_eval_is_one_line_naming_the_folder(plain, tmp_path):
    ckpt, folder = plain
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "out"), "-f", "onnx", "-p", "int8",
                                 "--calib", str(folder)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line, no blank line before it
    assert result.stderr.startswith(f"error: {folder}: is a plain image folder")
    assert "--eval DIR" in result.stderr


def test_plain_calib_folder_leaves_no_empty_output_folder(plain, tmp_path):
    ckpt, folder = plain
    runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "out"), "-f", "onnx", "-p", "int8",
                        "--calib", str(folder)])
    assert not (tmp_path / "out").exists()
