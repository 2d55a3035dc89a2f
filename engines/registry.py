"""The backend registry: every fact about a backend, declared once, beside its engine class.

Each ``engines/<name>_engine.py`` declares its backend with :func:`register_backend` on its engine
class -- the suffixes it opens, the runtime package it needs, how to install it, which devices it
sees, and how ``resunetpp bench`` runs it::

    @register_backend(suffixes=(".onnx",), default_for=(".onnx",), runtime="onnxruntime",
                      install_hint="pip install onnxruntime (or onnxruntime-gpu)", devices=devices, order=10)
    class OnnxRuntimeEngine(Engine):
        backend = "onnxruntime"
        ...

Everything that lists backends -- :func:`resunetpp.engines.open` and its suffix map, the
availability report, ``resunetpp info``'s backend table, the benchmark matrix -- reads
:func:`backends`. The registry finds the engine modules itself: on first access it imports every
``resunetpp.engines.*_engine`` module (:mod:`pkgutil`), so adding a backend is one new file.
Engine modules import only numpy and the base at module level (runtimes load inside functions),
so discovery stays cheap: no onnxruntime, openvino or tensorrt is imported by it.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resunetpp.engines.base import Engine, EngineError

__all__ = ["Backend", "BenchPrecision", "BenchSpec", "backends", "find", "get", "register_backend"]


def _same_device(requested: str) -> str:
    return requested


@dataclass(frozen=True)
class BenchPrecision:
    """One precision ``resunetpp bench`` runs on a backend: a row of the benchmark matrix."""

    precision: str
    #: The export artifact ``(format, precision)`` the row opens; ``None``: the checkpoint itself.
    artifact: tuple[str, str] | None = None
    #: Engine options of this precision (``dtype``, an OpenVINO precision hint ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Why the row cannot run when its device is the CPU (``None``: it can).
    cpu_problem: str | None = None
    #: On the CPU the row computes in bf16: it needs a CPU with native bf16 arithmetic.
    cpu_bf16: bool = False
    #: ``(module, why)`` pairs: the row is skipped with ``why`` unless ``module`` is installed.
    requires: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BenchSpec:
    """How ``resunetpp bench`` runs a backend."""

    #: The precisions it runs, in report order.
    precisions: tuple[BenchPrecision, ...] = ()
    #: ``bench --device`` (``auto``, ``cpu``, ``cuda``) -> the device its engines open on.
    device: Callable[[str], str] = _same_device
    #: The engine option that takes ``--threads`` (``None``: the backend has none).
    threads_option: str | None = None
    #: Options of a second engine that measures async throughput (it must have ``infer_async_many``);
    #: ``None``: throughput is batch / mean latency.
    throughput_options: Mapping[str, Any] | None = None
    #: ``(precision, device, engine details) -> "f32" | "bf16" | None``: the precision every
    #: convolution of a row computes in on the CPU, to read its rate against the CPU's peak.
    arithmetic: Callable[[str, str | None, dict], str | None] | None = None
    #: Matplotlib colour of its points in the benchmark plot.
    color: str = "tab:gray"


@dataclass(frozen=True)
class Backend:
    """A backend: its engine class and what the toolkit needs to know to offer it."""

    name: str
    engine: type[Engine]
    #: File suffixes it can open (lower case, with the dot).
    suffixes: tuple[str, ...]
    #: The suffixes it runs when ``backend="auto"`` (each suffix has one default backend).
    default_for: tuple[str, ...] = ()
    #: The importable runtime package, probed with :func:`importlib.util.find_spec` (nothing imported).
    runtime: str = ""
    #: pip distributions that may provide ``runtime`` (first installed one gives the version).
    distributions: tuple[str, ...] = ()
    #: How to install the runtime, for the "not installed" message.
    install_hint: str = ""
    #: The devices (or providers) it can use here; may raise (ImportError: not installed).
    devices: Callable[[], list[str]] | None = None
    #: Why it cannot run although its runtime is installed (TensorRT without a CUDA device), or ``None``.
    check: Callable[[], str | None] | None = None
    #: The device of :func:`resunetpp.engines.open` when none is given.
    default_device: str = "cpu"
    #: Whether its engine opens an in-memory checkpoint (``engine.from_checkpoint``).
    opens_checkpoints: bool = False
    #: Position in every listing (lower first; ties by name).
    order: int = 100
    bench: BenchSpec = field(default_factory=BenchSpec)

    def problem(self) -> str | None:
        """``None`` when usable here, else why not; imports nothing heavy."""
        try:
            installed = importlib.util.find_spec(self.runtime) is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            return f"{self.runtime} is not installed ({self.install_hint})"
        return self.check() if self.check is not None else None


_REGISTRY: dict[str, Backend] = {}
_discovered = False


def register_backend(*, suffixes: tuple[str, ...], runtime: str, install_hint: str,
                     **fields: Any) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: register the decorated :class:`Engine` subclass as the backend named by its
    ``backend`` attribute, with the :class:`Backend` fields given here."""

    def decorate(cls: type[Engine]) -> type[Engine]:
        if not (isinstance(cls, type) and issubclass(cls, Engine)):
            raise TypeError(f"register_backend decorates an Engine subclass, not {cls!r}")
        name = cls.backend
        if not name or name == Engine.backend:
            raise TypeError(f"{cls.__qualname__} sets no backend name (class attribute 'backend')")
        known = _REGISTRY.get(name)
        if known is not None and _qualified(known.engine) != _qualified(cls):
            raise EngineError(f"backend {name!r} is registered twice: by {_qualified(known.engine)} and "
                              f"{_qualified(cls)}")
        fields["default_for"] = tuple(s.lower() for s in fields.get("default_for", ()))
        fields.setdefault("distributions", (runtime,))
        backend = Backend(name=name, engine=cls, suffixes=tuple(s.lower() for s in suffixes), runtime=runtime,
                          install_hint=install_hint, **fields)
        _check_suffixes(backend)
        _REGISTRY[name] = backend
        return cls

    return decorate


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_suffixes(backend: Backend) -> None:
    bad = [s for s in backend.default_for if s not in backend.suffixes]
    if bad:
        raise EngineError(f"backend {backend.name!r} is the default for {', '.join(bad)} but does not open it")
    for other in _REGISTRY.values():
        clash = sorted(set(other.default_for) & set(backend.default_for))
        if other.name != backend.name and clash:
            raise EngineError(f"backend {backend.name!r} and {other.name!r} both claim to be the default for "
                              f"{', '.join(clash)}")


def discover() -> None:
    """Import every ``resunetpp.engines.*_engine`` module once (each registers its backend)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    folder = Path(__file__).resolve().parent
    for module in sorted(pkgutil.iter_modules([str(folder)]), key=lambda m: m.name):
        if module.name.endswith("_engine") and not module.ispkg:
            importlib.import_module(f"{__package__}.{module.name}")


def backends() -> tuple[Backend, ...]:
    """Every registered backend, in listing order (``order``, then name)."""
    discover()
    return tuple(sorted(_REGISTRY.values(), key=lambda b: (b.order, b.name)))


def names() -> tuple[str, ...]:
    """The registered backends' names, in listing order."""
    return tuple(b.name for b in backends())


def find(name: str) -> Backend | None:
    """The backend called ``name``, or ``None``."""
    discover()
    return _REGISTRY.get(name)


def get(name: str) -> Backend:
    """The backend called ``name``; :class:`EngineError` naming the choices when there is none."""
    backend = find(name)
    if backend is None:
        raise EngineError(f"unknown backend {name!r}; choose one of auto, {', '.join(names())}")
    return backend


def suffix_backends() -> dict[str, str]:
    """``{suffix: default backend}`` in listing order (``backend="auto"``)."""
    return {s: b.name for b in backends() for s in b.default_for}


def bench_matrix() -> tuple[tuple[Backend, BenchPrecision], ...]:
    """Every ``(backend, precision)`` the benchmark runs, in report order."""
    return tuple((b, p) for b in backends() for p in b.bench.precisions)


def markdown_table() -> str:
    """The README's backend table, made from the registry (a test keeps the README equal to it)."""
    rows = ["| backend | opens | default for | runtime | install | bench rows |", "|---|---|---|---|---|---|"]
    for b in backends():
        rows.append(f"| `{b.name}` | {', '.join(f'`{s}`' for s in b.suffixes)} | "
                    f"{', '.join(f'`{s}`' for s in b.default_for) or '-'} | `{b.runtime}` | {b.install_hint} | "
                    f"{', '.join(p.precision for p in b.bench.precisions) or '-'} |")
    return "\n".join(rows)
