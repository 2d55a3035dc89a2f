"""``resunetpp infer --ray``: batch inference on Ray Data (resunetpp.engines.ray_batch).

The Ray tests share one local Ray session (2 CPUs) for the module: starting Ray takes ~10 s on a
busy 2-core machine. They use a tiny model and 16 small synthetic images.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import blob_pair, tiny_checkpoint
from resunetpp import engines
from resunetpp.cli import app
from resunetpp.engines.infer import InferOptions, run_inference
from resunetpp.engines.ray_batch import (
    RayOptions,
    SegmentWorker,
    _user_error,
    complete_keys,
    expected_outputs,
    is_complete,
    remove_partials,
    run_ray_batch,
)
from resunetpp.errors import ResUNetError
from resunetpp.sources.images import ImageFiles

runner = CliRunner()
N_IMAGES = 16


def _images(folder: Path, n: int = N_IMAGES, seed: int = 0) -> list[Path]:
    """``n`` blob images of a few different sizes (so restoring to the original size matters)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img, _ = blob_pair(rng, 48)
        h, w = 48 - (i % 3) * 5, 48 - (i % 4) * 3
        p = folder / f"img{i:02d}.png"
        Image.fromarray(img[:h, :w]).save(p)
        paths.append(p)
    return paths


def _masks(folder: Path) -> dict[str, np.ndarray]:
    result = {}
    for p in sorted(folder.glob("*_mask.png")):
        with Image.open(p) as im:
            result[p.name] = np.asarray(im).copy()
    return result


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A tiny checkpoint, 16 images and the local ``infer``'s masks of them (the reference)."""
    root = tmp_path_factory.mktemp("ray-batch")
    model = tiny_checkpoint(root / "tiny.safetensors", size=32)
    paths = _images(root / "in")
    local = root / "local"
    with engines.open(model) as engine:
        run_inference(engine, ImageFiles(paths), InferOptions(out=local))
    reference = _masks(local)
    assert len(reference) == N_IMAGES
    return {"root": root, "model": model, "inputs": root / "in", "paths": paths, "reference": reference}


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


# ---- without Ray ----------------------------------------------------------------------------------------
def test_expected_outputs_follow_the_options(tmp_path: Path) -> None:
    names = lambda **kw: [p.name for p in expected_outputs(tmp_path, "a", InferOptions(out=tmp_path, **kw))]  # noqa: E731
    assert names() == ["a_mask.png"]
    assert names(overlay=True, save_probs=True) == ["a_probs.npy", "a_overlay.png", "a_mask.png"]
    (tmp_path / "a_mask.png").write_bytes(b"x")
    assert is_complete(tmp_path, "a", InferOptions(out=tmp_path))
    assert not is_complete(tmp_path, "a", InferOptions(out=tmp_path, overlay=True))  # a rerun adding --overlay
    assert not is_complete(tmp_path, "b", InferOptions(out=tmp_path))
    (tmp_path / "b_mask.png").mkdir()  # a folder under an output's name is not an output ...
    assert not is_complete(tmp_path, "b", InferOptions(out=tmp_path))
    assert complete_keys(tmp_path, ["a", "b", "c"], InferOptions(out=tmp_path)) == {"a"}
    assert complete_keys(tmp_path / "missing", ["a"], InferOptions(out=tmp_path)) == set()


def test_a_workers_error_is_found_inside_rays_wrappers() -> None:
    ray = pytest.importorskip("ray")
    original = ResUNetError("engine: torch | something the user can fix")
    wrapped = ray.exceptions.RayTaskError("SegmentWorker.__call__", "remote traceback", original).as_instanceof_cause()
    assert isinstance(wrapped, ResUNetError)  # Ray's class derives from the cause's ...
    outer = RuntimeError("the dataset failed")
    outer.__cause__ = wrapped
    assert _user_error(outer) is original  # ... and the original, without the remote traceback, is preferred
    assert _user_error(RuntimeError("no user error here")) is None


def test_remove_partials_removes_only_this_runs_temporaries(tmp_path: Path) -> None:
    ours = [".img01_mask.png.k3j2abcd.png.partial", ".img01_probs.npy.x9.npy.partial", ".img02_overlay.png.q.png.partial"]
    others = [".other_mask.png.zz.png.partial", "img01_mask.png", ".img01_mask.png", "notes.partial"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"")
    assert remove_partials(tmp_path, {"img01", "img02"}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_ray_options_are_checked() -> None:
    for bad, word in [(RayOptions(workers=0), "--workers"), (RayOptions(threads_per_worker=0), "--threads-per-worker"),
                      (RayOptions(address=" "), "--ray needs an address"), (RayOptions(chunk=0), "chunk")]:
        with pytest.raises(ResUNetError, match=word):
            bad.validate()


def test_worker_skips_complete_outputs_so_a_retried_chunk_writes_nothing_twice(case: dict, tmp_path: Path) -> None:
    """The actor's ``__call__`` in this process: a chunk retried after its first attempt wrote some
    images leaves those files untouched (same inode and mtime) and writes only the rest."""
    out = tmp_path / "out"
    options = InferOptions(out=out)
    worker = SegmentWorker(str(case["model"]), "torch", "cpu", {}, options, threads=1)
    keys = [p.stem for p in case["paths"][:4]]
    batch = {"key": np.array(keys), "path": np.array([str(p) for p in case["paths"][:4]])}
    first = worker({"key": batch["key"][:2], "path": batch["path"][:2]})  # the attempt that "died" after 2
    assert first["status"] == ["written", "written"]
    before = {k: os.stat(out / f"{k}_mask.png") for k in keys[:2]}
    time.sleep(0.05)
    again = worker(batch)
    assert again["status"] == ["existing", "existing", "written", "written"]
    assert again["model_seconds"][:2] == [0.0, 0.0] and all(s > 0 for s in again["model_seconds"][2:])
    for k in keys[:2]:
        st = os.stat(out / f"{k}_mask.png")
        assert (st.st_ino, st.st_mtime_ns) == (before[k].st_ino, before[k].st_mtime_ns)
    got = _masks(out)
    assert sorted(got) == [f"{k}_mask.png" for k in keys]
    for name, mask in got.items():
        np.testing.assert_array_equal(mask, case["reference"][name])


def test_worker_reports_a_corrupt_image_and_writes_the_others(case: dict, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    worker = SegmentWorker(str(case["model"]), "torch", "cpu", {}, InferOptions(out=tmp_path / "out"), threads=1)
    rows = worker({"key": np.array(["broken", "img00"]), "path": np.array([str(bad), str(case["paths"][0])])})
    assert rows["status"] == ["failed", "written"]
    assert "broken.png" in rows["error"][0] and rows["error"][1] == ""


def test_nothing_to_do_needs_no_ray(case: dict, tmp_path: Path, monkeypatch) -> None:
    """Every output complete: the run returns before importing Ray (a finished job reruns instantly)."""
    import builtins

    out = tmp_path / "out"
    out.mkdir()
    for name, mask in case["reference"].items():
        Image.fromarray(mask).save(out / name)
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = run_ray_batch(case["model"], [case["inputs"]], InferOptions(out=out), RayOptions(workers=1))
    assert (result.images, result.skipped, result.written, result.failures) == (N_IMAGES, N_IMAGES, 0, [])
    (out / "img03_mask.png").unlink()
    with pytest.raises(ResUNetError, match=r"resunetpp\[ray\]"):
        run_ray_batch(case["model"], [case["inputs"]], InferOptions(out=out), RayOptions(workers=1))


def test_bad_model_or_options_fail_before_ray_starts(case: dict, tmp_path: Path) -> None:
    with pytest.raises(ResUNetError, match="model file not found"):
        run_ray_batch(tmp_path / "nope.safetensors", [case["inputs"]], InferOptions(out=tmp_path / "o"))
    with pytest.raises(ResUNetError, match="unknown option"):
        run_ray_batch(case["model"], [case["inputs"]], InferOptions(out=tmp_path / "o"), engine_options={"bogus": 1})
    with pytest.raises(ResUNetError, match="no such file"):
        run_ray_batch(case["model"], [tmp_path / "missing"], InferOptions(out=tmp_path / "o"))


def test_cli_ray_options_need_ray(case: dict, tmp_path: Path) -> None:
    result = runner.invoke(app, ["infer", str(case["model"]), str(case["inputs"]), "--out", str(tmp_path / "o"),
                                 "--workers", "2"])
    assert result.exit_code == 1 and "need --ray ADDRESS" in result.stderr
    assert not (tmp_path / "o").exists()


# ---- on a local Ray -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_writes_the_local_masks_and_a_rerun_resumes(case: dict, ray_session, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows: list[dict] = []
    result = run_ray_batch(case["model"], [case["inputs"]], InferOptions(out=out),
                           RayOptions(workers=2, chunk=4), on_row=rows.append)
    assert (result.images, result.written, result.skipped, result.failures) == (N_IMAGES, N_IMAGES, 0, [])
    assert sorted(r["key"] for r in rows) == sorted(p.stem for p in case["paths"])
    assert result.workers == len({r["worker"] for r in rows}) in (1, 2)  # an actor still starting may get none
    got = _masks(out)
    assert got.keys() == case["reference"].keys()
    for name, mask in got.items():
        np.testing.assert_array_equal(mask, case["reference"][name], err_msg=name)
    assert not _partials(out)

    again = run_ray_batch(case["model"], [case["inputs"]], InferOptions(out=out), RayOptions(workers=2))
    assert (again.skipped, again.written, again.inferred) == (N_IMAGES, 0, 0)

    for k in ("img03", "img11"):  # a preempted job: two images never written
        (out / f"{k}_mask.png").unlink()
    rows.clear()
    resumed = run_ray_batch(case["model"], [case["inputs"]], InferOptions(out=out), RayOptions(workers=2),
                            on_row=rows.append)
    assert (resumed.skipped, resumed.written) == (N_IMAGES - 2, 2)
    assert sorted(r["key"] for r in rows) == ["img03", "img11"]
    for name, mask in _masks(out).items():
        np.testing.assert_array_equal(mask, case["reference"][name], err_msg=name)


def _segment_workers(executing: bool) -> list[int]:
    """Pids of this machine's SegmentWorker actors (Ray titles them ``ray::MapWorker(...).submit``
    while they run a task)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"SegmentWorker" in cmd and (not executing or b".submit" in cmd):
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the worker processes in /proc")
def test_a_worker_killed_mid_run_loses_nothing(case: dict, ray_session, tmp_path: Path) -> None:
    """SIGKILL one worker while it segments a chunk: Ray restarts it and retries its tasks; every
    image still gets exactly one complete mask, equal to the local infer's, and no temporary file."""
    out = tmp_path / "out"
    killed: list[int] = []
    done = threading.Event()

    def killer() -> None:
        while not done.is_set():
            if out.is_dir() and any(out.glob("*_mask.png")):
                pids = _segment_workers(executing=True)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.002)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    rows: list[dict] = []
    try:
        result = run_ray_batch(case["model"], [case["inputs"]], InferOptions(out=out, threads=1),
                               RayOptions(workers=2, chunk=8), on_row=rows.append)
    finally:
        done.set()
        thread.join(5)
    assert killed, "no worker was caught mid-run"
    assert (result.images, result.written, result.failures) == (N_IMAGES, N_IMAGES, [])
    assert sorted(r["key"] for r in rows) == sorted(p.stem for p in case["paths"])  # one result per image
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(case["reference"]), files  # exactly one mask each, no partial left
    for name, mask in _masks(out).items():
        np.testing.assert_array_equal(mask, case["reference"][name], err_msg=name)


@pytest.mark.slow
def test_cli_infer_ray(case: dict, ray_session, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in case["paths"][:5]:
        (inputs / p.name).write_bytes(p.read_bytes())
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "out"
    args = ["infer", str(case["model"]), str(inputs), "--out", str(out), "--ray", "local", "--workers", "1",
            "--threads-per-worker", "1", "--json", str(tmp_path / "run.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg: corrupt or truncated image" in errors[0]
    assert "1 of 6 image(s) failed" in result.stderr
    assert "skipped" in result.stdout and "end-to-end img/s" in result.stdout
    summary = json.loads((tmp_path / "run.json").read_text())
    assert (summary["images"], summary["written"], summary["failed"], summary["skipped"]) == (6, 5, 1, 0)
    assert summary["ray"]["workers"] == 1
    for p in case["paths"][:5]:
        with Image.open(out / f"{p.stem}_mask.png") as m:
            np.testing.assert_array_equal(np.asarray(m), case["reference"][f"{p.stem}_mask.png"])
    # the rerun skips the five and retries the broken one (still failing)
    result = runner.invoke(app, args)
    summary = json.loads((tmp_path / "run.json").read_text())
    assert result.exit_code == 1 and (summary["skipped"], summary["written"], summary["failed"]) == (5, 0, 1)
