"""Reports of a :class:`~benchmarks.harness.BenchResult`: rich table, JSON, Markdown, PNG chart.

Every file is written under a temporary name and renamed (:mod:`resunetpp.atomic`), so an
interrupted run leaves no half-written report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from resunetpp.atomic import atomic_path, write_json_atomic, write_text_atomic
from resunetpp.errors import ResUNetError

if TYPE_CHECKING:
    from rich.table import Table

    from resunetpp.bench.harness import BenchResult, BenchRow

#: (header, cell) of the main table, shared by the terminal and Markdown.
Column = tuple[str, Callable[["BenchRow"], str]]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _dice_ref(r: BenchRow) -> str:
    if r.dice_vs_reference is None:
        return "-"
    return f"{r.dice_vs_reference:.4f} (min {r.dice_vs_reference_min:.4f})"


def _e2e(r: BenchRow) -> str:
    if r.end_to_end_ips is None:
        return "-"
    ratio = f" ({100 * r.end_to_end_ratio:.0f}%)" if r.end_to_end_ratio is not None else ""
    return f"{r.end_to_end_ips:.1f}{ratio}"


def _gflops(r: BenchRow) -> str:
    if r.gflops_per_s is None:
        return "-"
    return f"{r.gflops_per_s:.0f}" + (f" ({r.peak_pct:.0f}%)" if r.peak_pct is not None else "")


def _overhead(r: BenchRow) -> str:
    return "-" if r.overhead_pct is None else f"{r.overhead_pct:+.1f}"


COLUMNS: tuple[Column, ...] = (
    ("backend", lambda r: r.backend),
    ("precision", lambda r: r.precision),
    ("batch", lambda r: "-" if r.batch_size is None else str(r.batch_size)),
    ("status", lambda r: r.status),
    ("size MB", lambda r: _num(r.size_mb, ".2f")),
    ("Dice vs ref", _dice_ref),
    ("Dice vs GT", lambda r: _num(r.dice_vs_gt, ".4f")),
    ("max |dp|", lambda r: _num(r.max_abs_diff, ".2g")),
    ("p50 ms", lambda r: _num(r.latency_ms_p50, ".2f")),
    ("p99 ms", lambda r: _num(r.latency_ms_p99, ".2f")),
    ("img/s", lambda r: _num(r.throughput_ips, ".1f")),
    ("speed-up", lambda r: "-" if r.speedup is None else f"{r.speedup:.2f}x"),
    ("GFLOP/s", _gflops),
    ("e2e img/s", _e2e),
    ("overhead %", _overhead),
)
#: The terminal's narrower selection (Markdown and JSON have everything).
TERMINAL: tuple[Column, ...] = tuple(
    ("Dice vs ref", lambda r: _num(r.dice_vs_reference, ".4f")) if h == "Dice vs ref" else (h, cell)
    for h, cell in COLUMNS if h not in ("max |dp|", "p99 ms"))
#: Width the terminal table is laid out for when stdout is not a terminal (a file, CI logs).
PIPE_WIDTH = 160
NUMERIC = {"batch", "size MB", "Dice vs ref", "Dice vs GT", "max |dp|", "p50 ms", "p99 ms", "img/s", "speed-up",
           "GFLOP/s", "e2e img/s", "overhead %"}


def _is_reference(r: BenchRow) -> bool:
    return r.is_reference


def _measured(result: BenchResult) -> list[BenchRow]:
    return [r for r in result.rows if r.ok]


def _not_measured(result: BenchResult) -> list[BenchRow]:
    seen, out = set(), []
    for r in result.rows:
        if not r.ok and (r.label, r.reason) not in seen:
            seen.add((r.label, r.reason))
            out.append(r)
    return out


def machine_line(result: BenchResult) -> str:
    """One line: CPU (cores, key flags), GPU, thread count."""
    env = result.environment
    cpu = env.get("cpu") or {}
    gpu = env.get("gpu") or None
    flags = " ".join(cpu.get("flags_present") or []) or "no listed flags"
    gpu_text = gpu.get("name", "unusable") if isinstance(gpu, dict) else "none"
    threads = (env.get("threads") or {}).get("requested")
    return (f"{cpu.get('model') or 'unknown CPU'} ({cpu.get('cores')} logical cores; {flags}); GPU: {gpu_text}; "
            f"threads: {threads if threads else 'runtime defaults'}")


def versions_line(result: BenchResult) -> str:
    versions = result.environment.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


# ---- progress ----------------------------------------------------------------------------------------
class LineReporter:
    """Progress for logs (stderr is not a terminal): one line per finished step, with its duration.

    Implements the :class:`export.report.Reporter` protocol, like the rich progress bars used on
    a terminal; a context manager so both are used the same way.
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def __enter__(self) -> LineReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        start = time.perf_counter()
        yield lambda n=1: None
        self.echo(f"  {description} ({time.perf_counter() - start:.1f} s)")

    def warn(self, message: str) -> None:
        self.echo(f"warning: {message}")

    def info(self, message: str) -> None:
        self.echo(message)


# ---- terminal ----------------------------------------------------------------------------------------
def results_table(result: BenchResult, title: str = "resunetpp bench") -> Table:
    """The main rich table: one line per measured row, then the rows that were not measured."""
    from rich.table import Table

    table = Table(title=f"{title}: {machine_line(result)}", title_justify="left", caption=_caption(result),
                  caption_justify="left")
    for header, _ in TERMINAL:
        table.add_column(header, justify="right" if header in NUMERIC else "left",
                         no_wrap=header in ("backend", "precision"))
    for r in _measured(result):
        table.add_row(*(cell(r) for _, cell in TERMINAL), style="bold" if _is_reference(r) else None)
    return table


def not_measured_table(result: BenchResult) -> Table | None:
    """Skipped and failed rows with their reasons (``None`` when every row was measured)."""
    from rich.table import Table

    rows = _not_measured(result)
    if not rows:
        return None
    table = Table(title="not measured", title_justify="left")
    for header in ("backend", "precision", "batch", "status", "reason"):
        table.add_column(header, overflow="fold")
    for r in rows:
        style = "red" if r.failed else "dim"
        table.add_row(r.backend, r.precision, "-" if r.batch_size is None else str(r.batch_size),
                      f"[{style}]{r.status}[/{style}]", r.reason or "")
    return table


def _caption(result: BenchResult) -> str:
    return (f"Dice vs ref: mean (min) against the {result.reference} masks; img/s: OpenVINO async THROUGHPUT, others "
            "batch / mean latency; GFLOP/s (share of this CPU's measured peak at the row's precision); e2e: infer "
            "pipeline (share of the model-only rate); overhead: Engine.infer over the runtime's own call")


def print_report(result: BenchResult, console=None) -> None:
    """Print the tables and the notes on ``console`` (a rich Console; stdout by default)."""
    from rich.console import Console

    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, PIPE_WIDTH)
    console.print(results_table(result))
    extra = not_measured_table(result)
    if extra is not None:
        console.print(extra)
    for note in result.notes:
        console.print(f"[dim]note:[/dim] {note}", highlight=False)


# ---- files -------------------------------------------------------------------------------------------
def _cannot_write(path: Path, e: OSError) -> ResUNetError:
    return ResUNetError(f"{path}: cannot write the report ({e.strerror or e})")


def write_json(result: BenchResult, path: str | Path) -> Path:
    """The whole result (environment, settings, one object per row) as JSON."""
    path = Path(path)
    try:
        write_json_atomic(path, result.as_dict())
    except OSError as e:
        raise _cannot_write(path, e) from None
    return path


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[str]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if h in numeric else "---" for h in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(result: BenchResult) -> str:
    """A Markdown report: machine, versions, notes, the main table and the rows not measured."""
    settings = result.settings
    lines = ["# resunetpp bench", "",
             f"- **model**: `{Path(settings['model']).name}` (sha256 {str(settings.get('checkpoint_sha256'))[:12]}), "
             f"input {settings['image_size'][0]}x{settings['image_size'][1]}"
             + (f", {settings['gflop_per_image']:.2f} GFLOP per image" if settings.get("gflop_per_image") else ""),
             f"- **machine**: {machine_line(result)}",
             f"- **versions**: {versions_line(result)}",
             f"- **evaluation**: {result.evaluation.get('count')} images of `{result.evaluation.get('source')}`"
             + (f" (split {result.evaluation.get('split')})" if result.evaluation.get("split") else ""),
             f"- **timing**: {settings['warmup_s']:g} s warm-up, {settings['duration_s']:g} s per measurement, "
             f"batch sizes {', '.join(map(str, settings['batch_sizes']))}", ""]
    lines += _md_table([h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in _measured(result)],
                       NUMERIC)
    missing = _not_measured(result)
    if missing:
        lines += ["", "## Not measured", ""]
        lines += _md_table(["backend", "precision", "batch", "status", "reason"],
                           [[r.backend, r.precision, "-" if r.batch_size is None else str(r.batch_size), r.status,
                             r.reason or ""] for r in missing], set())
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def write_markdown(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    try:
        write_text_atomic(path, to_markdown(result))
    except OSError as e:
        raise _cannot_write(path, e) from None
    return path


def _best_rows(result: BenchResult) -> list[BenchRow]:
    """Per backend/precision, the measured row with the highest throughput."""
    best: dict[str, BenchRow] = {}
    for r in _measured(result):
        if r.throughput_ips is not None and (r.label not in best or r.throughput_ips > best[r.label].throughput_ips):
            best[r.label] = r
    return list(best.values())


def backend_color(backend: str) -> str:
    """The plot colour of a backend's points (its bench options' ``color``; grey when unknown)."""
    from resunetpp.engines import registry

    found = registry.find(backend)
    return found.bench.color if found is not None else "tab:gray"


PRECISION_MARKERS = {"fp32": "o", "bf16": "s", "fp16": "^", "int8": "D"}


def _place_labels(ax, rows: Sequence[BenchRow]) -> None:
    """Annotate each point; a label that would overlap one already placed moves up (leader line)."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the axes' transform
    placed: list[tuple[float, float]] = []
    order = sorted(rows, key=lambda r: (-r.dice_vs_reference, r.throughput_ips))
    for r in order:
        x, y = ax.transData.transform((r.throughput_ips, r.dice_vs_reference))
        dy = 0.0
        while any(abs(x - px) < 130 and abs(y + dy - py) < 12 for px, py in placed):
            dy += 12
        placed.append((x, y + dy))
        ax.annotate(f"{r.label} (b{r.batch_size})", (r.throughput_ips, r.dice_vs_reference),
                    textcoords="offset pixels", xytext=(8, 4 + dy), fontsize=7.5,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if dy else None)


def write_plot(result: BenchResult, path: str | Path) -> Path:
    """PNG scatter: throughput (best batch, log x) against Dice vs the reference, points labelled
    (colour: backend, marker: precision)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    path = Path(path)
    rows = _best_rows(result)
    fig = Figure(figsize=(9, 5.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for r in rows:
        ax.scatter(r.throughput_ips, r.dice_vs_reference, s=110 if _is_reference(r) else 45, zorder=3,
                   color=backend_color(r.backend),
                   marker="*" if _is_reference(r) else PRECISION_MARKERS.get(r.precision, "o"))
    if rows:
        low = min(r.dice_vs_reference for r in rows)
        ax.set_ylim(max(0.0, low - 0.1 * (1.0 - low) - 0.005), 1.0 + 0.25 * (1.0 - low) + 0.003)
        ax.set_xscale("log")
        xs = [r.throughput_ips for r in rows]
        ax.set_xlim(min(xs) / 1.5, max(xs) * 3.0)  # room for the labels on the right
        _place_labels(ax, rows)
    else:
        ax.text(0.5, 0.5, "no row was measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("throughput (images/s, best batch size; log scale)")
    ax.set_ylabel(f"Dice vs {result.reference} reference mask")
    cpu = result.environment.get("cpu") or {}
    gpu = result.environment.get("gpu")
    ax.set_title(f"resunetpp bench: {cpu.get('model') or 'unknown CPU'} ({cpu.get('cores')} logical cores)"
                 + (f", {gpu['name']}" if isinstance(gpu, dict) and gpu.get("name") else "")
                 + f"; input {'x'.join(map(str, result.settings.get('image_size', [])))}", fontsize=9, loc="left")
    ax.grid(True, which="both", alpha=0.3)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as e:
        raise _cannot_write(path, e) from None
    return path
