"""Hardening: a file the toolkit is asked to read never runs code from it.

Each test plants a pickle whose ``__reduce__`` would run a command or write a file (``os.system``,
``builtins.exec``, ``subprocess.Popen``, ``builtins.open``), in every container torch and pickle
write (torch zip, torch legacy, raw pickle protocols 2/4/5; ``.pt`` and ``.pth``; at the top level
or deep inside a state dict), first proves the payload really fires when unpickled the unsafe way,
then hands the file to every entry point that reads checkpoints or training states:
``load_checkpoint``, ``resunetpp evaluate``, ``infer``, ``export``, ``bench`` and ``train --resume``.
Every one must refuse with one line naming the file, exit non-zero, and the sentinel file the
payload would create must not exist afterwards. Malformed safetensors headers are refused too.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from resunetpp.cli import app
from conftest import make_dataset
from resunetpp.errors import CheckpointError, ResUNetError
from resunetpp.training import STATE_FILE, resume_config

runner = CliRunner()


# ---- payloads ---------------------------------------------------------------------------------------------
class SystemPayload:
    """Unpickling runs ``touch SENTINEL`` through ``os.system`` (``posix.system``)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch '{self.sentinel}'",)


class ExecPayload:
    """Unpickling runs Python source through ``builtins.exec``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.sentinel)!r}, 'w').write('pwned')",)


class PopenPayload:
    """Unpickling starts a process through ``subprocess.Popen``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return subprocess.Popen, ([sys.executable, "-c", f"open({str(self.sentinel)!r}, 'w')"],)


class OpenPayload:
    """Unpickling creates the sentinel with ``builtins.open`` (no process, no exec)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return builtins.open, (str(self.sentinel), "w")


PAYLOADS = {"os.system": SystemPayload, "exec": ExecPayload, "subprocess": PopenPayload, "open": OpenPayload}


def _state_dict_with(payload: object) -> dict:
    """A plausible checkpoint whose state dict hides the payload among real tensors."""
    return {"state_dict": {"stem.body.0.weight": torch.zeros(4, 3, 3, 3), "stem.body.0.bias": payload},
            "config": {"filters": [4, 8, 8, 16], "bridge": 16, "se_reduction": 4}}


WRITERS: dict[str, Callable[[object, Path], None]] = {
    "torch-zip": lambda obj, path: torch.save(obj, path),
    "torch-legacy": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    "pickle-2": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
    "pickle-4": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=4)),
    "pickle-5": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=5)),
}


def plant(folder: Path, payload: str = "os.system", writer: str = "torch-zip", suffix: str = ".pt",
          nested: bool = True, name: str = "model") -> tuple[Path, Path]:
    """Write a malicious checkpoint; return (its path, the sentinel its payload would create)."""
    sentinel = folder / f"SENTINEL-{payload}-{writer}"
    bomb = PAYLOADS[payload](sentinel)
    path = folder / f"{name}{suffix}"
    WRITERS[writer](_state_dict_with(bomb) if nested else bomb, path)
    return path, sentinel


def wait_gone(sentinel: Path) -> bool:
    """The sentinel is absent (a payload started as a process gets a moment to show up first)."""
    import time

    time.sleep(0.2)
    return not sentinel.exists()


def assert_refused_in_one_line(result, path: Path) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no torch warning, no traceback on top of the error
    assert lines[0].startswith(f"error: {path}: ") and "refused" in lines[0], lines[0]
    return lines[0]


# ---- the payloads are real ------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_payload_fires_when_unpickled_unsafely(tmp_path: Path, payload: str) -> None:
    """Sanity: each payload does create its sentinel under a plain ``pickle.load`` (in a child
    process, so this test process never executes it)."""
    path, sentinel = plant(tmp_path, payload, "pickle-4", nested=False)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"],
                   check=False, capture_output=True, timeout=60)
    for _ in range(50):
        if sentinel.exists():
            break
        import time

        time.sleep(0.1)
    assert sentinel.exists(), f"the {payload} payload did not fire: this test would prove nothing"


# ---- the library ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_load_checkpoint_refuses_every_planted_pickle(tmp_path: Path, payload: str, writer: str) -> None:
    from resunetpp.checkpoint import load_checkpoint

    for nested in (True, False):
        path, sentinel = plant(tmp_path, payload, writer, nested=nested, name=f"m{int(nested)}")
        with _no_warnings():
            with pytest.raises(CheckpointError, match=rf"^{path}: refused: file holds objects other than tensors") as e:
                load_checkpoint(path)
        assert "\n" not in str(e.value)
        assert wait_gone(sentinel), f"load_checkpoint ran the {payload} payload"


class _no_warnings:
    """Fail if a warning escapes (torch warns about unexpected pickle protocols)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self._seen = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(None, None, None)
        assert not self._seen, [str(w.message)[:120] for w in self._seen]
        return False


def test_refusal_names_what_the_pickle_wanted(tmp_path: Path) -> None:
    from resunetpp.checkpoint import load_checkpoint

    path, _ = plant(tmp_path, "os.system", "torch-zip")
    with pytest.raises(CheckpointError, match=r"GLOBAL (posix|os)\.system"):
        load_checkpoint(path)
    path, _ = plant(tmp_path, "subprocess", "torch-zip", name="p")
    with pytest.raises(CheckpointError, match=r"GLOBAL [a-z]+\.Popen was not an allowed global by default\)$"):
        load_checkpoint(path)


# ---- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("untrusted") / "data", 2, 32, splits={"train": [0], "val": [1]})


COMMANDS = {
    "evaluate": lambda model, data, tmp: ["evaluate", model, "--data", data, "--json", tmp / "out.json"],
    "infer": lambda model, data, tmp: ["infer", model, data / "images", "--out", tmp / "out"],
    "export": lambda model, data, tmp: ["export", model, "--out", tmp / "out", "-f", "onnx", "-p", "fp32"],
    "bench": lambda model, data, tmp: ["bench", model, "--data", data, "--backends", "torch", "--precisions", "fp32",
                                       "--batch-sizes", "1", "--duration-s", "0.01", "--warmup-s", "0",
                                       "--artifacts", tmp / "art", "--json", tmp / "out.json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("writer, suffix", [("torch-zip", ".pt"), ("pickle-4", ".pth")])
def test_cli_refuses_a_planted_pickle(tmp_path: Path, data: Path, command: str, writer: str, suffix: str) -> None:
    path, sentinel = plant(tmp_path, "os.system", writer, suffix)
    result = runner.invoke(app, [str(a) for a in COMMANDS[command](path, data, tmp_path)])
    assert_refused_in_one_line(result, path)
    assert wait_gone(sentinel), f"resunetpp {command} ran the payload"
    assert not (tmp_path / "out.json").exists()
    out = tmp_path / "out"
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize("writer", ["torch-zip", "pickle-4"])
def test_train_resume_refuses_a_planted_training_state(tmp_path: Path, writer: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    sentinel = tmp_path / "SENTINEL"
    state = {"train_config": json.dumps({"data": "x"}), "optimizer": SystemPayload(sentinel), "epoch": 1}
    WRITERS[writer](state, run / STATE_FILE)
    with pytest.raises(ResUNetError, match=rf"{run / STATE_FILE}: .*refused"):
        resume_config(run)
    assert wait_gone(sentinel)
    result = runner.invoke(app, ["train", "--out", str(run), "--resume"])
    assert_refused_in_one_line(result, run / STATE_FILE)
    assert wait_gone(sentinel), "train --resume ran the payload"
    assert sorted(p.name for p in run.iterdir()) == [STATE_FILE]  # nothing written beside it


# ---- safetensors: no code, and malformed headers are refused -----------------------------------------------------
def _safetensors(header: dict | bytes, body: bytes = b"", claimed: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + body


@pytest.mark.parametrize("content", [
    _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),  # data past the end
    _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), claimed=1 << 40),
    _safetensors(b"{not json", bytes(16)),
    _safetensors({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 16]}}, bytes(16)),
    _safetensors({"__metadata__": {"resunetpp": "{\"model\": {\"filters\": \"__import__('os')\"}}"},
                  "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
], ids=["data-past-end", "header-length-lies", "header-not-json", "shape-bigger-than-data", "record-with-code"])
def test_malformed_safetensors_is_refused(tmp_path: Path, data: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    result = runner.invoke(app, ["evaluate", str(path), "--data", str(data)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
