"""Which (backend, precision) rows ``resunetpp bench`` runs, from the backend registry, without the
harness's heavy imports: the command line takes its ``--backends`` / ``--precisions`` choices from
here (:mod:`resunetpp.bench.harness` re-exports every name)."""

from __future__ import annotations

from resunetpp.engines import registry

__all__ = ["artifact_of", "backends", "matrix", "precisions"]


def matrix() -> tuple[tuple[str, str], ...]:
    """Every (backend, precision) the harness runs, in report order: each registered backend's
    bench precisions (:class:`~resunetpp.engines.registry.BenchSpec`); the first is the reference."""
    return tuple((b.name, p.precision) for b, p in registry.bench_matrix())


def backends() -> tuple[str, ...]:
    """The backends that have benchmark rows, in report order."""
    return tuple(dict.fromkeys(b for b, _ in matrix()))


def precisions() -> tuple[str, ...]:
    """Every precision some backend runs, in order of first appearance in :func:`matrix`."""
    return tuple(dict.fromkeys(p for _, p in matrix()))


def artifact_of() -> dict[tuple[str, str], tuple[str, str]]:
    """The export artifact (format, precision) behind each row that does not run the checkpoint."""
    return {(b.name, p.precision): p.artifact for b, p in registry.bench_matrix() if p.artifact is not None}
