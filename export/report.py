"""Progress and the summary table of an export (rich), behind a tiny reporter interface.

The pipeline talks to a :class:`Reporter` only; :class:`NullReporter` (library use, tests) and
:class:`RichReporter` (the CLI: progress bars on stderr) implement it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console

    from resunetpp.export.results import ExportReport

Advance = Callable[..., None]


class Reporter(Protocol):
    def task(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager[Advance]: ...

    def warn(self, message: str) -> None: ...

    def info(self, message: str) -> None: ...


class NullReporter:
    """Collects warnings and notes, shows nothing."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.notes: list[str] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n=1: None

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def info(self, message: str) -> None:
        self.notes.append(message)


class TimedReporter:
    """Passes everything to ``inner`` and records each task's wall time: :attr:`steps` is a list of
    ``{"step": description, "seconds": s}`` in the order the tasks ended (a task inside another one is
    counted in both), so an export's report says where its time went."""

    def __init__(self, inner: Reporter, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner, self.clock = inner, clock
        self.start = clock()
        self.steps: list[dict] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        start = self.clock()
        try:
            with self.inner.task(description, total) as advance:
                yield advance
        finally:
            self.steps.append({"step": description, "seconds": round(self.clock() - start, 2)})

    def elapsed(self) -> float:
        return self.clock() - self.start

    def warn(self, message: str) -> None:
        self.inner.warn(message)

    def info(self, message: str) -> None:
        self.inner.info(message)


def format_seconds(seconds: float) -> str:
    """``1:05`` / ``1:02:03``: a duration for a progress line."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Eta:
    """Progress of ``total`` similar steps with the time left, from the mean step so far:
    ``text()`` is ``3/12, ETA 1:05`` (just ``0/12`` before the first step ends)."""

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.clock, self.done = total, clock, 0
        self.start = clock()

    def advance(self, n: int = 1) -> None:
        self.done += n

    def text(self) -> str:
        if self.done == 0:
            return f"0/{self.total}"
        left = (self.clock() - self.start) / self.done * max(0, self.total - self.done)
        return f"{self.done}/{self.total}, ETA {format_seconds(left)}"


class RichReporter:
    """rich progress bars (one per calibration / build / verification step) on ``console``."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console)

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.tasks:
            self.progress.stop()
        else:  # nothing was shown: no blank line (rich's Progress.stop prints one off a terminal)
            self.progress.live.transient = True
            self.progress.live.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        tid = self.progress.add_task(description, total=total)
        try:
            yield lambda n=1: self.progress.advance(tid, n)
        finally:
            done = total if total is not None else 1
            self.progress.update(tid, total=done, completed=done)

    def warn(self, message: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def info(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _share(v: float | None) -> str:
    """A share of the image's pixels, in percent: ``0.12%``."""
    return "-" if v is None else f"{100 * v:.2f}%"


def print_summary(report: ExportReport, console: Console) -> None:
    """The artifacts table (size, parity and accuracy numbers, gate) and the skipped targets."""
    from rich.table import Table

    table = Table(title=f"Exported to {report.out}", title_justify="left")
    for col, just in (("artifact", "left"), ("size", "right"), ("max |dp|", "right"), ("mean |dp|", "right"),
                      ("Dice vs ref mean/min", "right"), ("differing pixels, worst image", "right"),
                      ("Dice vs GT (ref)", "right"), ("gate", "left")):
        table.add_column(col, justify=just)
    for a in report.artifacts:
        m = a.metrics
        gt = "-" if m.get("dice_vs_gt_mean") is None else (
            f"{m['dice_vs_gt_mean']:.4f} ({m['reference_dice_vs_gt_mean']:.4f})")
        gate = "[green]pass[/green]" if a.gate["passed"] else (
            "[yellow]FAIL, kept (--allow-accuracy-drop)[/yellow]" if a.written else "[red]FAIL, not written[/red]")
        table.add_row(a.name, _size(a.size_bytes), _num(m.get("abs_error_max"), ".2e"),
                      _num(m.get("abs_error_mean"), ".2e"),
                      f"{_num(m.get('dice_vs_reference_mean'), '.4f')} / {_num(m.get('dice_vs_reference_min'), '.4f')}",
                      _share(m.get("disagreement_image_share_max")), gt, gate)
    console.print(table)
    if report.verification:
        v = report.verification
        console.print(f"accuracy measured on {v['images']} {v['source']} image(s)"
                      + (f" from {v['from']}" if v.get("from") else ""), highlight=False)
    grouped: dict[tuple[str, str], list[str]] = {}
    for fmt, precision, reason in report.skipped:
        grouped.setdefault((fmt, reason), []).append(precision)
    for (fmt, reason), precisions in grouped.items():
        console.print(f"[dim]skipped {fmt} {', '.join(precisions)}: {reason}[/dim]", highlight=False)
    for line in report.trtexec:
        console.print(f"[dim]{line}[/dim]", highlight=False, soft_wrap=True)
    if report.timing:
        slow = sorted(report.timing["steps"], key=lambda s: -s["seconds"])[:3]
        console.print(f"[dim]took {format_seconds(report.timing['total_s'])}; longest steps: "
                      + ", ".join(f"{s['step']} {format_seconds(s['seconds'])}" for s in slow)
                      + " (every step's time: timing in export_report.json)[/dim]", highlight=False)
