"""``resunetpp train / evaluate / info`` through Typer's CliRunner: help, results and error paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from resunetpp import cli
import resunetpp.defaults as defaults
from conftest import tiny_checkpoint
from resunetpp.checkpoint import load_checkpoint
from resunetpp.errors import ResUNetError

pytestmark = pytest.mark.usefixtures("torch_threads")

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 1, one ``error: ...`` line on stderr naming what is wrong, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def no_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent" / "m.safetensors")
    monkeypatch.setattr(defaults, "DEFAULT_DATA", tmp_path / "absent" / "sample_data")


@pytest.mark.parametrize("command,options", [
    ([], ["train", "evaluate", "info"]),
    (["train"], ["--data", "--train-split", "--val-split", "--out", "--epochs", "--batch-size", "--image-size",
                 "--lr", "--device", "--resume", "--seed", "--num-classes", "--class-names", "--range-reg",
                 "--range-tau", "--time-budget-s", "--warmup-epochs", "--init-from", "--architecture"]),
    (["evaluate"], ["MODEL", "--data", "--split", "--json", "--batch-size", "--device"]),
    (["info"], ["--json"]),
])
def test_help(command: list[str], options: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    for opt in options:
        assert opt in result.stdout, opt


# ---- info ----------------------------------------------------------------------------------------
def test_info_json(no_defaults: None) -> None:
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert set(info["versions"]) == {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"}
    assert info["versions"]["torch"] == torch.__version__
    assert "cpu" in info["backends"]["torch"] and "torch" in info["available_backends"]
    assert info["cpu"]["cores"] >= 1 and isinstance(info["cpu"]["flags"], dict)
    assert (info["gpu"] is None) == (not torch.cuda.is_available())
    assert info["default_model"] is None and info["default_data"] is None


def test_info_reports_the_shipped_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tiny_checkpoint(tmp_path / "weights" / "resunetpp_kvasir.safetensors")
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", model)
    info = json.loads(invoke("info", "--json").stdout)
    assert info["default_model"] == str(model)
    table = invoke("info")
    assert table.exit_code == 0 and "torch" in table.stdout and "default model" in table.stdout


def test_cpu_flags_are_parsed() -> None:
    from resunetpp.engines.info import parse_cpuinfo

    x86 = "processor : 0\nmodel name : Intel(R) Xeon(R) Platinum 8480+\nflags : fpu sse4_2 avx2 avx512f avx512_vnni amx_tile\n"
    got = parse_cpuinfo(x86)
    assert got["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert got["flags"]["avx512_vnni"] and got["flags"]["amx_tile"] and not got["flags"]["avx512_bf16"]
    arm = "processor : 0\nFeatures : fp asimd asimddp i8mm bf16\nCPU part : 0xd42\n"
    assert parse_cpuinfo(arm)["flags"] == {"asimd": True, "asimddp": True, "asimdhp": False, "i8mm": True,
                                          "bf16": True, "sve": False, "sve2": False}


# ---- evaluate ------------------------------------------------------------------------------------
def test_evaluate_prints_a_table_and_writes_json(tmp_path: Path, blob_dataset: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "reports" / "scores.json"
    result = invoke("evaluate", ckpt, "--data", blob_dataset, "--split", "val", "--json", out, "--batch-size", "2",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Dice" in result.stdout and "recall" in result.stdout
    scores = json.loads(out.read_text())
    assert list(scores) == ["n", "dice", "iou", "precision", "recall", "images", "engine"]
    assert scores["engine"]["backend"] == "torch" and scores["engine"]["precision"] == "fp32"
    assert scores["n"] == 2 and len(scores["images"]) == 2
    assert f"{scores['dice']:.4f}" in result.stdout
    assert not list(out.parent.glob("*.partial"))


def test_evaluate_uses_the_shipped_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, blob_dataset: Path) -> None:
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tiny_checkpoint(tmp_path / "m.safetensors"))
    monkeypatch.setattr(defaults, "DEFAULT_DATA", blob_dataset)
    result = invoke("evaluate", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "m.safetensors" in result.stdout and "8" in result.stdout  # every image of the sample data


def test_evaluate_without_model_or_data(no_defaults: None, tmp_path: Path) -> None:
    assert_one_line_error(invoke("evaluate"), "no MODEL given", "pass a checkpoint")
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    assert_one_line_error(invoke("evaluate", ckpt), "no --data given", "--data DIR")


def test_evaluate_missing_data_folder(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    missing = tmp_path / "no_such_data"
    assert_one_line_error(invoke("evaluate", ckpt, "--data", missing), str(missing), "data folder not found")


@pytest.mark.parametrize("name,content,problem", [
    ("bad.safetensors", b"definitely not safetensors", "not a valid safetensors file"),
    ("bad.pt", b"PK\x03\x04 broken zip", "not a PyTorch checkpoint"),
    ("empty.pth", b"", "file is empty"),
])
def test_evaluate_bad_checkpoint(tmp_path: Path, blob_dataset: Path, name: str, content: bytes, problem: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    assert_one_line_error(invoke("evaluate", bad, "--data", blob_dataset), str(bad), problem)


def test_evaluate_missing_model_and_bad_split_and_bad_json_target(tmp_path: Path, blob_dataset: Path) -> None:
    assert_one_line_error(invoke("evaluate", tmp_path / "nope.safetensors", "--data", blob_dataset),
                          "nope.safetensors", "model file not found")
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    assert_one_line_error(invoke("evaluate", ckpt, "--data", blob_dataset, "--split", "test"), "split file not found")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("evaluate", ckpt, "--data", blob_dataset, "--json", blocker / "scores.json")
    assert_one_line_error(result, str(blocker / "scores.json"), "cannot write the report")


def test_evaluate_bad_image_in_data(tmp_path: Path, blob_dataset: Path) -> None:
    (blob_dataset / "images" / "img007.png").write_bytes(b"broken")
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    assert_one_line_error(invoke("evaluate", ckpt, "--data", blob_dataset), "img007.png", "not a readable image")


# ---- train ---------------------------------------------------------------------------------------
def test_train_end_to_end_then_resume(tmp_path: Path, blob_dataset: Path) -> None:
    out = tmp_path / "run"
    result = invoke("train", "--data", blob_dataset, "--out", out, "--epochs", "1", "--batch-size", "3",
                    "--image-size", "32", "--device", "cpu", "--class-names", "lesion")
    assert result.exit_code == 0, result.output
    assert "trained 1 epochs" in result.stdout and "best val Dice" in result.stdout
    ckpt = load_checkpoint(out / "best.safetensors")
    assert ckpt.class_names == ["lesion"] and ckpt.config.filters == (16, 32, 64, 128)
    assert ckpt.provenance["train_config"]["train_split"] == "train" and ckpt.provenance["train_images"] == 6

    again = invoke("train", "--data", blob_dataset, "--out", out, "--epochs", "1")
    assert_one_line_error(again, str(out), "--resume")
    resumed = invoke("train", "--out", out, "--resume", "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert "trained 2 epochs" in resumed.stdout
    assert json.loads((out / "history.json").read_text())[-1]["epoch"] == 2

    ft = invoke("train", "--data", blob_dataset, "--out", tmp_path / "ft", "--epochs", "1", "--batch-size", "3",
                "--image-size", "32", "--device", "cpu", "--class-names", "lesion", "--warmup-epochs", "0",
                "--init-from", out / "last.safetensors")
    assert ft.exit_code == 0, ft.output
    tuned = load_checkpoint(tmp_path / "ft" / "last.safetensors").provenance
    assert tuned["lineage"]["init_provenance"]["epochs_completed"] == 2
    assert tuned["train_config"]["warmup_epochs"] == 0
    other = invoke("train", "--data", blob_dataset, "--out", tmp_path / "ft2", "--epochs", "1", "--image-size", "32",
                   "--device", "cpu", "--init-from", out / "last.safetensors",
                   "--architecture", "resunetpp-sigmoid-attention")
    assert_one_line_error(other, str(out / "last.safetensors"), "another architecture")


def test_train_error_paths(tmp_path: Path, blob_dataset: Path) -> None:
    missing = tmp_path / "no_data"
    assert_one_line_error(invoke("train", "--data", missing, "--out", tmp_path / "o"), str(missing), "data folder not found")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(invoke("train", "--out", tmp_path / "o"), "--data DIR is required")
    assert_one_line_error(invoke("train", "--out", tmp_path / "o", "--resume"), "nothing to resume")
    assert_one_line_error(invoke("train", "--data", blob_dataset, "--out", tmp_path / "o", "--image-size", "30"),
                          "multiple of 8")
    assert_one_line_error(invoke("train", "--data", blob_dataset, "--out", tmp_path / "o", "--num-classes", "3",
                                 "--class-names", "a,b"), "3 class(es) need as many class names")
    assert_one_line_error(invoke("train", "--data", blob_dataset, "--out", tmp_path / "o", "--lr", "0"),
                          "lr must be positive")
    if not torch.cuda.is_available():
        assert_one_line_error(invoke("train", "--data", blob_dataset, "--out", tmp_path / "o", "--device", "cuda"),
                              "no CUDA device")
    no_init = invoke("train", "--data", blob_dataset, "--out", tmp_path / "o", "--init-from", missing)
    flat = " ".join(re.sub("[│╭╮╰╯─]", " ", no_init.output).split())
    assert no_init.exit_code == 2 and "--init-from" in flat and "does not exist" in flat, no_init.output
    bad_choice = invoke("train", "--data", blob_dataset, "--device", "tpu")
    assert bad_choice.exit_code == 2 and "Traceback" not in bad_choice.output
    assert not (tmp_path / "o").exists()


def test_the_shipped_defaults_if_this_install_has_them() -> None:
    model, data = defaults.default_model_path(), defaults.default_data_path()
    if model is None or data is None:
        pytest.skip("no shipped model or sample data in this checkout")
    ckpt = load_checkpoint(model)
    assert ckpt.config.filters == (16, 32, 64, 128) and ckpt.config.num_classes == 1
    assert ckpt.preprocessing.size[0] % 8 == 0
    from resunetpp.data import SegmentationDataset

    assert len(SegmentationDataset(data)) >= 1


@pytest.mark.parametrize("command", ["infer", "stream"])
def test_model_default_without_a_shipped_model(no_defaults: None, tmp_path: Path, command: str) -> None:
    """infer and stream resolve MODEL 'default' the same way (resunetpp.defaults.resolve_model)."""
    clip = str(tmp_path / "clip.mp4")
    args = ["default", clip, "--out", str(tmp_path / "o")] if command == "infer" else [clip, "default"]
    result = CliRunner().invoke(cli.app, [command, *args])
    assert result.exit_code == 1
    assert "MODEL 'default': this install ships no default model; pass a model file" in result.output


def test_resolve_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", model)
    assert defaults.resolve_model("default") == str(model)
    assert defaults.resolve_model("other.onnx") == "other.onnx"
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent.safetensors")
    with pytest.raises(ResUNetError, match="^model 'default': this install ships no default model"):
        defaults.resolve_model("default", "model")
