"""What an export produced: one :class:`ArtifactResult` per artifact, the :class:`ExportReport`
(``export_report.json``) and the error a refused artifact raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resunetpp.errors import ResUNetError


@dataclass
class ArtifactResult:
    format: str
    precision: str
    path: Path
    written: bool
    size_bytes: int | None
    metrics: dict
    gate: dict

    @property
    def name(self) -> str:
        return f"{self.format} {self.precision}"

    def as_dict(self) -> dict:
        return {"format": self.format, "precision": self.precision, "path": str(self.path), "written": self.written,
                "size_bytes": self.size_bytes, "accuracy": self.metrics, "gate": self.gate}


@dataclass
class ExportReport:
    out: Path
    artifacts: list[ArtifactResult] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    trtexec: list[str] = field(default_factory=list)
    verification: dict | None = None
    warnings: list[str] = field(default_factory=list)
    #: wall time of the whole export and of each step (``{"total_s": s, "steps": [{"step", "seconds"}]}``)
    timing: dict | None = None

    @property
    def refused(self) -> list[ArtifactResult]:
        return [a for a in self.artifacts if not a.gate["passed"] and not a.written]

    def raise_for_gate(self) -> None:
        """Raise :class:`AccuracyGateError` naming every artifact refused by its gate."""
        if self.refused:
            parts = [f"{a.name}: {a.gate['reason']}" for a in self.refused]
            raise AccuracyGateError("accuracy gate failed, not written -- " + "; ".join(parts)
                                    + " (pass --allow-accuracy-drop to write them anyway)")

    def as_dict(self) -> dict:
        return {"out": str(self.out), "artifacts": [a.as_dict() for a in self.artifacts],
                "skipped": [{"format": f, "precision": p, "reason": r} for f, p, r in self.skipped],
                "trtexec": self.trtexec, "verification": self.verification, "warnings": self.warnings,
                "timing": self.timing}


class AccuracyGateError(ResUNetError):
    """An artifact's accuracy against the FP32 reference is below its gate."""


__all__ = ["AccuracyGateError", "ArtifactResult", "ExportReport"]
