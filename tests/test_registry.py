"""The backend registry: one declaration per backend, and everything that lists backends derived from it.

A fake backend (a tiny :class:`Engine` subclass defined here) is registered for one test at a time
and removed afterwards (the registry's table is monkeypatched); with no edit anywhere else it is
opened by ``engines.open()`` on its suffix, reported by ``available_backends()``, listed by
``resunetpp info`` and planned by the benchmark.
"""

from __future__ import annotations

import dataclasses
import pkgutil
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import tiny_checkpoint
from resunetpp import engines
from resunetpp.artifact import read_record, write_sidecar
from resunetpp.bench import env, harness, report
from resunetpp.checkpoint import load_checkpoint
from resunetpp.engines import info, registry
from resunetpp.engines.base import Engine, EngineError
from resunetpp.engines.registry import BenchPrecision, BenchSpec, register_backend
from resunetpp.errors import InputFileError, ResUNetError

REAL = ("torch", "onnxruntime", "openvino", "tensorrt")


# ---- the registry of the real backends ------------------------------------------------------------------
def test_every_engine_module_registers_its_backend() -> None:
    folder = Path(registry.__file__).parent
    modules = {f"resunetpp.engines.{m.name}" for m in pkgutil.iter_modules([str(folder)]) if m.name.endswith("_engine")}
    found = registry.backends()
    assert {b.engine.__module__ for b in found} == modules
    assert registry.names()[:4] == REAL and engines.BACKENDS == engines.backends() == registry.names()
    for b in found:
        assert b.engine.backend == b.name and engines.engine_class(b.name) is b.engine
        assert b.runtime and b.install_hint and b.distributions[0] == b.runtime
        assert set(b.default_for) <= set(b.suffixes)


def test_suffix_map_is_derived_from_the_registry() -> None:
    expected = {s: b.name for b in registry.backends() for s in b.default_for}
    assert engines.SUFFIX_BACKEND == expected
    assert list(expected) == [".safetensors", ".pt", ".pth", ".onnx", ".xml", ".engine", ".plan"]
    assert engines.BACKEND_SUFFIXES == {b.name: b.suffixes for b in registry.backends()}
    assert engines.BACKEND_SUFFIXES["openvino"] == (".xml", ".onnx")  # OpenVINO also reads ONNX
    for suffix, name in expected.items():
        assert engines.backend_for(f"model{suffix.upper()}") == name
    with pytest.raises(InputFileError, match="expected one of " + ", ".join(expected).replace(".", r"\.")):
        engines.backend_for("model.tflite")


def test_availability_and_install_hints_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    available = engines.available_backends()
    assert list(available) == list(registry.names()) and available["torch"] is None
    for b in registry.backends():
        assert available[b.name] == b.problem()
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)  # nothing installed
    gone = engines.available_backends()
    for b in registry.backends():
        assert gone[b.name] == f"{b.runtime} is not installed ({b.install_hint})"
    assert gone["tensorrt"] == "tensorrt is not installed (pip install tensorrt cuda-python; needs an NVIDIA GPU and driver)"
    assert gone["onnxruntime"] == "onnxruntime is not installed (pip install onnxruntime (or onnxruntime-gpu))"


def test_unknown_backend_names_the_registered_ones() -> None:
    with pytest.raises(EngineError, match=r"^unknown backend 'tflite'; choose one of auto, torch, onnxruntime, "
                                          r"openvino, tensorrt"):
        engines.engine_class("tflite")
    assert registry.find("tflite") is None


def test_bench_matrix_is_the_backends_bench_options() -> None:
    assert harness.matrix() == tuple((b.name, p.precision) for b, p in registry.bench_matrix())
    assert harness.MATRIX[:13] == (
        ("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"),
        ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8"),
        ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "fp16"), ("openvino", "int8"),
        ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8"))
    assert harness.MATRIX[0] == harness.REFERENCE
    assert harness.PRECISIONS[:4] == ("fp32", "bf16", "fp16", "int8") and harness.BACKENDS[:4] == REAL
    assert harness.ARTIFACT_OF[("openvino", "bf16")] == ("openvino", "fp32")  # a precision hint on the FP32 IR
    assert ("torch", "fp32") not in harness.ARTIFACT_OF  # the checkpoint itself


def test_info_and_environment_list_every_runtime() -> None:
    assert list(info.libraries())[:6] == ["torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"]
    assert info.libraries()["onnxruntime"][1] == "onnxruntime-gpu"
    assert env.runtimes()[:9] == ("torch", "numpy", "onnx", "onnxruntime", "onnxslim", "openvino", "nncf",
                                  "tensorrt", "cuda-python")
    found, problems = info.backends()
    assert list(found) == list(registry.names()) and found["torch"][0] == "cpu"


# ---- open with a given record (verify an artifact before its sidecar is written) -----------------------------
def test_open_with_a_record_instead_of_the_sidecar(tmp_path: Path) -> None:
    from test_engines import export_onnx

    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    record = {**load_checkpoint(ckpt).metadata(), "class_names": ["lesion"]}
    with engines.open(ckpt, record=record) as engine:  # torch: the record replaces the checkpoint's
        assert engine.class_names == ["lesion"] and engine.record is record
        from_record = engine.infer(x)
    with engines.open(ckpt) as engine:
        assert engine.class_names != ["lesion"]
        np.testing.assert_array_equal(engine.infer(x), from_record)
    if engines.available_backends()["onnxruntime"] is not None:
        return
    onnx = export_onnx(ckpt, tmp_path / "m.onnx")
    staged = tmp_path / "staged.onnx"
    shutil.copyfile(onnx, staged)  # no sidecar, no embedded record
    with pytest.raises(InputFileError, match="no resunetpp metadata"):
        engines.open(staged)
    with engines.open(staged, record=read_record(onnx)) as engine:
        assert engine.name == "onnxruntime"
        np.testing.assert_allclose(engine.infer(x), from_record, atol=1e-4)
    with pytest.raises(InputFileError, match="model file not found"):  # the file checks still apply
        engines.open(tmp_path / "absent.onnx", record=read_record(onnx))
    partial = tmp_path / ".model_fp32.onnx.k3j2x9.onnx.partial"  # what atomic_path stages it as
    shutil.copyfile(onnx, partial)
    assert engines.artifact_suffix(partial) == ".onnx" and engines.backend_for(partial) == "onnxruntime"
    with engines.open(partial, record=read_record(onnx)) as engine:
        np.testing.assert_allclose(engine.infer(x), from_record, atol=1e-4)
    with pytest.raises(InputFileError, match=r"the torch backend cannot run a \.partial file"):
        engines.open(partial, backend="torch", record=read_record(onnx))
    assert engines.artifact_suffix("m.partial") == ".partial" and engines.artifact_suffix("M.ONNX") == ".ONNX"


# ---- a backend added by one declaration -------------------------------------------------------------------
class EchoEngine(Engine):
    """A backend that answers ``scale / 2`` everywhere (``scale`` an option, default 1)."""

    backend = "echo"
    option_names = ("scale", "threads")

    def _load_impl(self) -> None:
        pass

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        value = 0.5 * float(self.options.get("scale", 1))
        return np.full((batch.shape[0], self.num_classes, *batch.shape[2:]), value, np.float32)

    def _close_impl(self) -> None:
        pass


ECHO_BENCH = BenchSpec(
    precisions=(BenchPrecision("fp32", artifact=("echo", "fp32")),
                BenchPrecision("int4", artifact=("echo", "int4"), options={"scale": 1.5}),
                BenchPrecision("fp16", artifact=("echo", "fp16"), cpu_problem="echo fp16 needs an echo chip")),
    device=lambda requested: "echo0", threads_option="threads", color="tab:olive")


def _register_echo(monkeypatch: pytest.MonkeyPatch, runtime: str = "json", check=None) -> registry.Backend:
    """Register :class:`EchoEngine` until the test ends (the registry's table is restored then)."""
    monkeypatch.setattr(registry, "_REGISTRY", {b.name: b for b in registry.backends()})
    register_backend(suffixes=(".echo", ".onnx"), default_for=(".echo",), runtime=runtime,
                     install_hint="pip install echo-runtime", devices=lambda: ["cpu", "echo0"], check=check,
                     bench=ECHO_BENCH)(EchoEngine)
    return registry.get("echo")


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> registry.Backend:
    return _register_echo(monkeypatch)


@pytest.fixture
def echo_file(tmp_path: Path) -> Path:
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    path = tmp_path / "model.echo"
    path.write_bytes(b"echo")
    write_sidecar(path, {**load_checkpoint(ckpt).metadata(), "artifact": {"format": "echo", "precision": "fp32"}})
    return path


def test_fake_backend_is_opened_on_its_suffix(echo: registry.Backend, echo_file: Path) -> None:
    assert engines.BACKENDS == (*REAL, "echo") and engines.SUFFIX_BACKEND[".echo"] == "echo"
    assert engines.backend_for(echo_file) == "echo" and engines.backend_for("m.onnx") == "onnxruntime"
    with engines.open(echo_file, scale=1.5) as engine:
        assert isinstance(engine, EchoEngine) and engine.device == "cpu"  # the default device
        out = engine.infer(np.zeros((2, 3, 32, 32), np.float32))
    assert out.shape == (2, 1, 32, 32) and np.all(out == 0.75)
    with pytest.raises(EngineError, match=r"engine: echo \| unknown option\(s\) dtype"):
        engines.open(echo_file, dtype="bf16")
    (echo_file.parent / "m.xml").write_text("<xml/>")
    with pytest.raises(InputFileError, match=r"the echo backend cannot run a \.xml file \(it runs \.echo, \.onnx\)"):
        engines.open(echo_file.parent / "m.xml", backend="echo")


def test_fake_backend_availability(monkeypatch: pytest.MonkeyPatch, echo_file: Path) -> None:
    _register_echo(monkeypatch, runtime="resunetpp_no_such_runtime")
    reason = "resunetpp_no_such_runtime is not installed (pip install echo-runtime)"
    assert engines.available_backends()["echo"] == reason
    with pytest.raises(engines.BackendUnavailableError, match=re.escape(f"engine: echo | unavailable: {reason}")):
        engines.open(echo_file)
    _register_echo(monkeypatch, check=lambda: "no echo chip here")  # installed, but its check fails
    assert engines.available_backends()["echo"] == "no echo chip here"
    with pytest.raises(engines.BackendUnavailableError, match=re.escape("engine: echo | unavailable: no echo chip here")):
        engines.open(echo_file)


def test_fake_backend_is_available(echo: registry.Backend) -> None:
    available = engines.available_backends()
    assert available["echo"] is None and list(available)[-1] == "echo"


def test_fake_backend_in_info(echo: registry.Backend) -> None:
    data = info.collect_info()
    assert data["backends"]["echo"] == ["cpu", "echo0"] and "echo" in data["available_backends"]
    assert data["versions"]["json"]  # its runtime's version is listed (json: the stdlib's own)
    assert "json" in env.runtimes()
    console = Console(record=True, width=200)
    for table in info.info_tables(data):
        console.print(table)
    line = next(ln for ln in console.export_text().splitlines() if "json (echo)" in ln)
    assert "cpu, echo0" in line


def test_fake_backend_in_bench_planning(echo: registry.Backend) -> None:
    assert harness.matrix()[-3:] == (("echo", "fp32"), ("echo", "int4"), ("echo", "fp16"))
    assert "int4" in harness.PRECISIONS and "echo" in harness.BACKENDS
    harness.BenchOptions(backends=("echo",), precisions=("int4",)).validate()
    available = {**engines.available_backends(), "tensorrt": "no CUDA device"}
    targets, skipped = harness.plan_targets(harness.backends(), harness.precisions(), device="cpu",
                                            cpu_flags={"avx2": True}, available=available, calib_missing=None,
                                            threads=2)
    by_label = {t.label: t for t in targets}
    assert by_label["echo fp32"] == harness.Target("echo", "fp32", "echo0", {"threads": 2}, ("echo", "fp32"))
    assert by_label["echo int4"].options == {"threads": 2, "scale": 1.5}
    assert "echo fp16" in by_label  # its device is the echo chip, not the CPU: its cpu_problem does not apply
    assert by_label["openvino fp32"].options == {"threads": 2, "precision": "f32"}  # the real rows are unchanged
    order = [label for label in (f"{b} {p}" for b, p in harness.matrix())]
    assert [t.label for t in targets] == [label for label in order if label in by_label]
    assert harness.arithmetic_precision(harness.BenchRow("echo", "fp32", device="cpu")) is None
    assert report.backend_color("echo") == "tab:olive" and report.backend_color("nobody") == "tab:gray"


def test_fake_backend_skips_explained(echo: registry.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    on_the_cpu = dataclasses.replace(echo, bench=dataclasses.replace(ECHO_BENCH, device=lambda requested: requested))
    monkeypatch.setitem(registry._REGISTRY, "echo", on_the_cpu)
    _, skipped = harness.plan_targets(("echo",), ("fp16", "int4"), device="cpu", cpu_flags={}, available={},
                                      calib_missing=None, threads=None)
    assert [(r.label, r.reason) for r in skipped] == [("echo fp16", "echo fp16 needs an echo chip")]
    _, skipped = harness.plan_targets(("echo",), ("fp32",), device="cpu", cpu_flags={},
                                      available={"echo": "not here"}, calib_missing=None, threads=None)
    assert [(r.label, r.reason, r.status) for r in skipped] == [("echo fp32", "not here", "skipped")]


def test_fake_backend_is_gone_after_its_test() -> None:
    assert "echo" not in engines.BACKENDS and ".echo" not in engines.SUFFIX_BACKEND
    assert "echo" not in harness.BACKENDS and "int4" not in harness.PRECISIONS


def test_registration_is_checked(echo: registry.Backend) -> None:
    class Other(EchoEngine):
        pass

    with pytest.raises(ResUNetError, match=r"backend 'echo' is registered twice: by .*EchoEngine and .*Other"):
        register_backend(suffixes=(".echo2",), runtime="json", install_hint="-")(Other)

    class Clash(EchoEngine):
        backend = "clash"

    with pytest.raises(ResUNetError, match=r"backend 'clash' and 'onnxruntime' both claim to be the default for \.onnx"):
        register_backend(suffixes=(".onnx",), default_for=(".onnx",), runtime="json", install_hint="-")(Clash)
    with pytest.raises(ResUNetError, match=r"the default for \.zip but does not open it"):
        register_backend(suffixes=(".clash",), default_for=(".zip",), runtime="json", install_hint="-")(Clash)

    class Nameless(Engine):
        pass

    with pytest.raises(TypeError, match="sets no backend name"):
        register_backend(suffixes=(".x",), runtime="json", install_hint="-")(Nameless)
    assert "clash" not in engines.BACKENDS


def test_readme_backend_table_is_the_registry() -> None:
    """The README's backend table is derived, not hand-kept: it must equal the registry's table."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    between = readme.split("<!-- backends:start -->\n", 1)[1].split("\n<!-- backends:end -->", 1)[0]
    assert between == registry.markdown_table()
