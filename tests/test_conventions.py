"""Command-line conventions (issue 21, item 5): ``--version``, ``infer`` into a new numbered folder,
comma lists for ``export -f/-p``, help at 80 columns with every flag name whole, and ``--help``
without importing torch or a runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import make_dataset, tiny_checkpoint
from resunetpp import __version__
from resunetpp.cli import app
from resunetpp.cli.common import next_run_folder

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"resunetpp {__version__}"


def test_help_imports_no_torch_and_no_runtime():
    code = ("import sys; from typer.testing import CliRunner; from resunetpp.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "[CliRunner().invoke(app, [c, '--help']) for c in ('train', 'evaluate', 'export', 'infer', 'bench', "
            "'quantize')]; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'tensorrt', 'nncf', 'onnx') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "infer", "bench", "quantize"])
def test_help_at_80_columns_keeps_every_flag_whole(command):
    click_command = typer.main.get_command(app).commands[command]
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    flags = [o for p in click_command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    assert flags
    missing = [f for f in flags if f not in result.stdout.replace("│", " ").split()]
    assert not missing, missing


def test_export_help_groups_options_in_panels():
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "80"})
    for panel in ("Output", "Data", "Shape and graph", "INT8 recipe", "OpenVINO", "TensorRT", "Accuracy gate"):
        assert f"─ {panel} ─" in result.stdout


def test_next_run_folder(tmp_path):
    assert next_run_folder(tmp_path / "runs") == tmp_path / "runs" / "1"
    (tmp_path / "runs" / "1").mkdir(parents=True)
    (tmp_path / "runs" / "7").mkdir()
    (tmp_path / "runs" / "notes").mkdir()
    assert next_run_folder(tmp_path / "runs") == tmp_path / "runs" / "8"


def test_infer_without_out_writes_a_new_numbered_folder(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", size=32)
    data = make_dataset(tmp_path / "d", 2, seed=1, prefix="im")
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):
        result = runner.invoke(app, ["infer", str(ckpt), str(data / "images"), "--device", "cpu"])
        assert result.exit_code == 0, result.output + result.stderr
        folder = Path("runs") / "infer" / str(n)
        assert f"writing to {folder}" in result.stderr and f"results in {folder}" in result.stdout
        assert len(list((tmp_path / folder).glob("*_mask.png"))) == 2


def test_export_formats_and_precisions_take_commas(tmp_path, monkeypatch):
    import resunetpp.export.pipeline as pipeline

    seen = {}

    def fake_run_export(options, reporter):
        seen["formats"], seen["precisions"] = options.formats, options.precisions
        raise pipeline.ResUNetError("stop here")

    monkeypatch.setattr(pipeline, "run_export", fake_run_export)
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", size=32)
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "o"), "-f", "onnx,openvino", "-p",
                                 "fp32", "-p", "fp16"])
    assert result.exit_code == 1 and "stop here" in result.stderr
    assert seen == {"formats": ("onnx", "openvino"), "precisions": ("fp32", "fp16")}
    bad = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "o"), "-f", "onnx,bogus"])
    assert bad.exit_code == 2 and "bogus" in bad.output + bad.stderr
