"""Hardening: ``export``, ``train`` and ``bench`` killed at several points (SIGINT and SIGKILL).

Each command runs as a real process (``python -m resunetpp ...``) on tiny data; the test waits for a sign
of progress (a work folder, an artifact, an epoch in ``history.json``, a progress line), waits a
little more, then sends the signal. Afterwards:

* every file under a final name is complete -- ONNX graphs load and run, an IR has its ``.bin``
  and sidecar, checkpoints and JSON parse, PNGs decode; anything else is hidden (``.name...partial``,
  ``.export-work-*``, ``.export.lock``);
* ``train --resume`` continues from the last complete epoch (history epochs 1..N, no gap, no repeat)
  and ends exactly where an uninterrupted run ends;
* a rerun of ``export`` succeeds, and two exports into the same ``--out`` at once both finish with
  artifacts that load, verify and come from one checkpoint each (artifact, sidecar and report agree).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from resunetpp import engines
from conftest import REPO, TINY, make_dataset, tiny_checkpoint
from resunetpp.artifact import read_record, sidecar_path
from resunetpp.checkpoint import file_sha256, load_checkpoint
from resunetpp.model import ModelConfig

CLI = ["-m", "resunetpp"]  # the command line as `python -m resunetpp`
TINY_H = ModelConfig(filters=(4, 8, 8, 16), bridge=16, se_reduction=4)
#: Hidden names a killed command may leave: atomic temporaries, export work folders, the export lock.
HIDDEN_OK = (lambda n: n.endswith(".partial"), lambda n: n.startswith(".export-work-"), lambda n: n == ".export.lock")
#: Fast export settings: a static 32x32 graph, batch 1, no onnxslim pass.
EXPORT_FAST = ["--static-size", "--batch", "1", "--no-simplify", "-f", "onnx", "-f", "openvino", "-p", "fp32"]
TIMEOUT = 240


# ---- processes ------------------------------------------------------------------------------------------------
class Run:
    """``python -m resunetpp ARGS`` in the background, stdout/stderr to files (no pipe to fill up)."""

    def __init__(self, args: list, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RESUNETPP_LOG_EPOCHS": "1", "COLUMNS": "200"}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            # SIGINT back to its default: a suite started in the background (``cmd &``) hands its
            # children an ignored SIGINT, and Python then keeps it ignored.
            self.proc = subprocess.Popen([sys.executable, *CLI, *map(str, args)], cwd=REPO, stdout=out,
                                         stderr=err, env=env, stdin=subprocess.DEVNULL,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Poll ``condition`` until it holds; fail if the process ends first or time runs out."""
        end = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the process ended (rc {self.proc.returncode}) before {what}:\n{self.stderr[-2000:]}")
            if time.monotonic() > end:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.stderr[-2000:]}")
            time.sleep(0.05)

    def kill(self, sig: int, delay: float = 0.0) -> int:
        time.sleep(delay)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the process did not end in {timeout} s:\n{self.stderr[-2000:]}")


def exists(pattern_root: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any(pattern_root.glob(pattern))


# ---- what may be left behind ----------------------------------------------------------------------------------
def check_final_file(path: Path) -> None:
    """A file under a final name must be complete and usable."""
    suffix = path.suffix
    if suffix == ".onnx":
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        assert sidecar_path(path).is_file(), f"{path} has no sidecar"
        _runs(path)
    elif suffix == ".xml":
        assert path.with_suffix(".bin").is_file(), f"{path} without its .bin"
        assert sidecar_path(path).is_file(), f"{path} has no sidecar"
        _runs(path)
    elif suffix == ".bin":
        assert path.with_suffix(".xml").is_file(), f"{path} without its .xml"
    elif suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".safetensors":
        load_checkpoint(path)
    elif suffix == ".pt":
        assert isinstance(torch.load(path, weights_only=True), dict)
    elif suffix == ".png":
        with Image.open(path) as im:
            im.load()
    elif suffix in (".md", ".txt"):
        assert path.read_text(encoding="utf-8").strip(), f"{path} is empty"
    else:
        pytest.fail(f"unexpected file under a final name: {path}")


def _runs(path: Path) -> None:
    with engines.open(path) as engine:
        pre = engine.preprocessing
        x = np.zeros((1, pre.channels, *pre.size), np.float32)
        probs = engine.infer(x)
        assert np.isfinite(probs).all() and probs.shape == (1, engine.num_classes, *pre.size)


def check_tree(folder: Path) -> list[Path]:
    """Every visible file under ``folder`` is complete; hidden entries are temporaries. Returns
    the visible files."""
    visible = []
    if not folder.exists():
        return visible
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        hidden = [p for p in parts if p.startswith(".")]
        if hidden:
            assert any(ok(hidden[0]) for ok in HIDDEN_OK), f"unexpected hidden entry {path}"
            continue
        if path.is_file():
            check_final_file(path)
            visible.append(path)
    return visible


# ---- export -----------------------------------------------------------------------------------------------------
def _reference(ckpt_path: Path, x: np.ndarray) -> np.ndarray:
    from resunetpp.model import WithActivation

    model = WithActivation(load_checkpoint(ckpt_path).build_model())
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def check_export_consistent(out: Path, checkpoints: dict[str, Path]) -> str:
    """Every artifact in ``out``, its sidecar, its embedded record and the report come from one and
    the same checkpoint, and the artifact computes that checkpoint's model. Returns its sha256."""
    onnx_path, xml_path = out / "model_fp32.onnx", out / "openvino" / "model_fp32.xml"
    shas = {file_sha256(p): p for p in checkpoints.values()}
    source = read_record(onnx_path)["artifact"]["source_sha256"]
    assert source in shas
    embedded = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["resunetpp"]
    assert json.loads(embedded)["artifact"]["source_sha256"] == source
    assert read_record(xml_path)["artifact"]["source_sha256"] == source
    report = json.loads((out / "export_report.json").read_text())
    assert {(a["format"], a["precision"]) for a in report["artifacts"] if a["written"]} == \
        {("onnx", "fp32"), ("openvino", "fp32")}
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = _reference(shas[source], x)
    for path in (onnx_path, xml_path):
        with engines.open(path) as engine:
            np.testing.assert_allclose(engine.infer(x), want, atol=1e-4, err_msg=str(path))
    return source


@pytest.mark.slow
def test_export_killed_then_rerun_and_run_twice_at_once(tmp_path: Path) -> None:
    ckpt_a = tiny_checkpoint(tmp_path / "a.safetensors", TINY_H, 32, seed=0)
    ckpt_b = tiny_checkpoint(tmp_path / "b.safetensors", TINY_H, 32, seed=1)
    out = tmp_path / "out"

    # 1. SIGINT while the ONNX export runs: the work folder and temporaries are removed on the way out.
    run = Run(["export", ckpt_a, "--out", out, *EXPORT_FAST], tmp_path / "log1")
    run.wait_for(exists(out, ".export-work-*"), "the export to start")
    rc = run.kill(signal.SIGINT, delay=0.5)
    assert rc == 130 and "interrupted" in run.stderr and "Traceback" not in run.stderr, (rc, run.stderr)
    assert check_tree(out) == []
    assert not any(p.name.startswith(".export-work-") or p.name.endswith(".partial") for p in out.rglob("*"))

    # 2. SIGKILL as soon as the ONNX artifact is in place (OpenVINO conversion under way): whatever
    #    is visible is complete; the dead export's work folder stays hidden.
    run = Run(["export", ckpt_a, "--out", out, *EXPORT_FAST], tmp_path / "log2")
    run.wait_for(exists(out, "model_fp32.onnx"), "the ONNX artifact")
    assert run.kill(signal.SIGKILL) == -signal.SIGKILL  # the OpenVINO stage takes longer than one poll
    visible = check_tree(out)
    assert out / "model_fp32.onnx" in visible

    # 3. Rerun, twice at once with different checkpoints into the same folder: both succeed (the
    #    second waits for the first), the folder holds one export's complete set, the dead export's
    #    work folder is gone.
    first = Run(["export", ckpt_a, "--out", out, *EXPORT_FAST], tmp_path / "log3a")
    second = Run(["export", ckpt_b, "--out", out, *EXPORT_FAST], tmp_path / "log3b")
    assert first.wait() == 0, first.stderr
    assert second.wait() == 0, second.stderr
    visible = check_tree(out)
    assert {p.relative_to(out).as_posix() for p in visible} == {
        "model_fp32.onnx", "model_fp32.onnx.json", "openvino/model_fp32.xml", "openvino/model_fp32.bin",
        "openvino/model_fp32.xml.json", "export_report.json"}
    assert [p.name for p in out.rglob(".*")] == []  # work folders, lock and temporaries all gone
    assert "waiting for another export" in first.stderr + second.stderr
    check_export_consistent(out, {"a": ckpt_a, "b": ckpt_b})


# ---- train ------------------------------------------------------------------------------------------------------
def _epochs(out: Path) -> list[int]:
    path = out / "history.json"
    if not path.is_file():
        return []
    return [row["epoch"] for row in json.loads(path.read_text())]


def _check_run(out: Path) -> list[int]:
    """The run folder is consistent: complete files only, epochs 1..N without gap or repeat, and the
    training state at the same epoch as the history (the last checkpoint at most one ahead)."""
    check_tree(out)
    epochs = _epochs(out)
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    if (out / "train_state.pt").is_file():
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert state["epoch"] >= len(epochs)  # history.json is written last
        assert [r["epoch"] for r in json.loads(state["history"])] == list(range(1, state["epoch"] + 1))
        last = load_checkpoint(out / "last.safetensors").provenance["epochs_completed"]
        assert state["epoch"] <= last <= state["epoch"] + 1
    return epochs


@pytest.mark.slow
def test_train_interrupted_and_killed_resumes_from_the_last_complete_epoch(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 8, 32, splits={"train": list(range(6)), "val": [6, 7]})
    out = tmp_path / "run"
    epochs = 5
    base = ["--out", out, "--image-size", "32", "--batch-size", "3", "--device", "cpu"]
    rng = random.Random(7)

    # 1. Ctrl-C during epoch 2: exit 130 with the resume hint; epoch 1 is saved.
    run = Run(["train", "--data", data, "--epochs", epochs, *base], tmp_path / "log1")
    run.wait_for(lambda: len(_epochs(out)) >= 1, "the first epoch")
    rc = run.kill(signal.SIGINT, delay=rng.uniform(0.0, 0.2))
    done = _check_run(out)
    if rc == 0:  # the run was faster than the signal: nothing was interrupted
        pytest.skip("training finished before SIGINT arrived")
    assert rc == 130, (rc, run.stderr)
    assert "interrupted" in run.stderr and "--resume" in run.stderr and "Traceback" not in run.stderr
    assert 1 <= len(done) < epochs

    # 2. Resume, then SIGKILL at a random moment after one more epoch.
    run = Run(["train", "--resume", *base], tmp_path / "log2")
    run.wait_for(lambda: len(_epochs(out)) >= len(done) + 1, "an epoch after resuming")
    run.kill(signal.SIGKILL, delay=rng.uniform(0.0, 0.4))
    done = _check_run(out)
    assert len(done) >= 2

    # 3. Resume to the end: every epoch once, in order, and the files agree.
    run = Run(["train", "--resume", *base], tmp_path / "log3")
    assert run.wait() == 0, run.stderr
    assert _check_run(out) == list(range(1, epochs + 1))
    assert load_checkpoint(out / "last.safetensors").provenance["epochs_completed"] == epochs
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == epochs
    assert "resuming after epoch" in run.stdout + run.stderr


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the point it is raised at runs (no handler catches it)."""


def test_kill_between_the_files_of_an_epoch_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files of one epoch are written one after another (last, best, train_state.pt,
    history.json). A kill between two of them must still resume to exactly the uninterrupted run:
    killed after last.safetensors (the checkpoint one epoch ahead of the state), and killed after
    train_state.pt (history.json one epoch behind, on the final epoch: nothing left to train)."""
    import resunetpp.training as training

    data = make_dataset(tmp_path / "data", 8, 32, splits={"train": list(range(6)), "val": [6, 7]})

    def cfg(out: Path) -> training.TrainConfig:
        return training.TrainConfig(data=str(data), out=str(out), epochs=2, batch_size=3, image_size=32, lr=3e-3,
                                    warmup_epochs=1, device="cpu", filters=TINY.filters, bridge=TINY.bridge,
                                    workers=1, seed=0)

    straight = training.train(cfg(tmp_path / "straight"), progress=False, log=lambda m: None)
    want = load_checkpoint(tmp_path / "straight" / "last.safetensors").state_dict
    real_atomic, real_json = training.atomic_path, training.write_json_atomic

    for window in ("after last.safetensors", "after train_state.pt"):
        states = []

        def atomic(path, *a, window=window, states=states, **k):  # train_state.pt goes through atomic_path
            if Path(path).name == training.STATE_FILE:
                states.append(path)
                if window == "after last.safetensors" and len(states) == 2:
                    raise _Killed
            return real_atomic(path, *a, **k)

        def history(path, obj, window=window):
            if Path(path).name == "history.json" and window == "after train_state.pt" and len(obj) == 2:
                raise _Killed
            return real_json(path, obj)

        out = tmp_path / window.replace(" ", "_")
        monkeypatch.setattr(training, "atomic_path", atomic)
        monkeypatch.setattr(training, "write_json_atomic", history)
        with pytest.raises(_Killed):
            training.train(cfg(out), progress=False, log=lambda m: None)
        monkeypatch.setattr(training, "atomic_path", real_atomic)
        monkeypatch.setattr(training, "write_json_atomic", real_json)
        assert _epochs(out) == [1], window
        assert load_checkpoint(out / "last.safetensors").provenance["epochs_completed"] == 2, window

        resumed = training.train(training.resume_config(out), resume=True, progress=False, log=lambda m: None)
        assert [h["epoch"] for h in resumed["history"]] == [1, 2], window
        assert _check_run(out) == [1, 2], window
        assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]],
                                                                       rel=1e-5), window
        got = load_checkpoint(out / "last.safetensors").state_dict
        assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-5, window


# ---- bench ------------------------------------------------------------------------------------------------------
def _bench(ckpt: Path, data: Path, tmp: Path, backends: str, duration: str) -> list:
    return ["bench", ckpt, "--data", data, "--backends", backends, "--precisions", "fp32", "--batch-sizes", "1",
            "--warmup-s", "0", "--duration-s", duration, "--threads", "1", "--no-end-to-end",
            "--artifacts", tmp / "art", "--json", tmp / "report" / "bench.json",
            "--markdown", tmp / "report" / "bench.md", "--plot", tmp / "report" / "bench.png"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, moment", [(signal.SIGKILL, "export"), (signal.SIGINT, "export"),
                                         (signal.SIGINT, "timing"), (signal.SIGKILL, "timing")],
                         ids=["SIGKILL-export", "SIGINT-export", "SIGINT-timing", "SIGKILL-timing"])
def test_bench_killed_leaves_no_partial_report_or_artifact(tmp_path: Path, sig: int, moment: str) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", TINY_H, 32)
    data = make_dataset(tmp_path / "data", 3, 32)
    (tmp_path / "report").mkdir()
    if moment == "export":  # onnxruntime needs an exported artifact: kill while it is made
        run = Run(_bench(ckpt, data, tmp_path, "torch,onnxruntime", "0.05"), tmp_path / "log")
        run.wait_for(exists(tmp_path / "art", ".export-work-*"), "the export inside bench")
    else:  # torch only: kill while a row is being timed
        run = Run(_bench(ckpt, data, tmp_path, "torch", "30"), tmp_path / "log")
        run.wait_for(lambda: "accuracy on 3 images" in run.stderr, "the accuracy step to finish")
    rc = run.kill(sig, delay=random.Random(moment).uniform(0.1, 0.6))
    assert rc != 0
    if sig == signal.SIGINT:
        assert rc == 130 and "interrupted" in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not any(p.name.endswith(".partial") or p.name.startswith(".export-work-")
                       for p in (tmp_path / "art").rglob("*"))
    assert check_tree(tmp_path / "report") == []  # no report under its final name
    check_tree(tmp_path / "art")
    assert not (tmp_path / "art" / "model_fp32.onnx").exists() or (tmp_path / "art" / "model_fp32.onnx.json").exists()
