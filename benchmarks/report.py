"""Reports of a :class:`~resunetpp.bench.harness.BenchResult`: rich table, JSON, Markdown, PNG chart.

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


def _mean_min(mean: float | None, minimum: float | None) -> str:
    """A Dice as ``mean (min worst)``, ``-`` when not measured."""
    return "-" if mean is None else f"{mean:.4f} (min {minimum:.4f})"


def _rate_share(rate: float, share: float | None) -> str:
    """A rate with its share of another in brackets when known: ``12.3 (95%)``."""
    return f"{rate:.1f}" + (f" ({100 * share:.0f}%)" if share is not None else "")


def _dice_ref(r: BenchRow) -> str:
    return _mean_min(r.dice_vs_reference, r.dice_vs_reference_min)


def _e2e(r: BenchRow) -> str:
    return "-" if r.end_to_end_ips is None else _rate_share(r.end_to_end_ips, r.end_to_end_ratio)


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


def _input(r: BenchRow) -> str:
    return "-" if not r.image_size else "x".join(map(str, r.image_size))


def _video_fps(r: BenchRow) -> str:
    if r.video_fps is None:
        return "-" if not r.details.get("video_error") else "failed"
    return _rate_share(r.video_fps, r.video_share)


def _video_latency(r: BenchRow) -> str:
    if r.video_latency_ms_p50 is None:
        return "-"
    return f"{r.video_latency_ms_p50:.0f} / {r.video_latency_ms_p99:.0f}"


def _video_dice(r: BenchRow) -> str:
    return _mean_min(r.video_dice_vs_reference, r.video_dice_vs_reference_min)


def _keeps_up(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


#: Columns added after the main ones when the run had a video clip (``--video``).
VIDEO_COLUMNS: tuple[Column, ...] = (
    ("video fps (share)", _video_fps),
    ("g2g p50 / p99 ms", _video_latency),
    ("video Dice vs ref", _video_dice),
    ("keeps up", lambda r: _keeps_up(r.video_keeps_up)),
)
NUMERIC |= {"input", "video fps (share)", "g2g p50 / p99 ms", "video Dice vs ref"}


def is_sweep(result: BenchResult) -> bool:
    """Whether the run swept the input size (``--image-size`` with several sizes)."""
    return bool(result.settings.get("image_sizes"))


def columns(result: BenchResult, base: Sequence[Column] = COLUMNS) -> tuple[Column, ...]:
    """``base`` with the input size first in a sweep and the video columns last with a clip."""
    cols = tuple(base)
    if is_sweep(result):
        cols = (("input", _input), *cols)
    if result.settings.get("video"):
        cols = (*cols, *VIDEO_COLUMNS)
    return cols


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


def peaks_line(result: BenchResult) -> str | None:
    """The measured CPU peaks, one phrase each (``None`` when none was measured)."""
    peaks = result.environment.get("cpu_peak") or {}
    parts = [f"{name} {p['gflops']:.0f} {p.get('unit', 'GFLOP/s')} ({p.get('kernel')}"
             + (f" in {p['runtime_precision']}" if p.get("runtime_precision") else "")
             + f", conv {'x'.join(map(str, p.get('shape') or []))}, {p.get('threads')} threads)"
             for name, p in peaks.items() if isinstance(p, dict) and p.get("gflops")]
    return "; ".join(parts) or None


def versions_line(result: BenchResult) -> str:
    versions = result.environment.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


# ---- progress ----------------------------------------------------------------------------------------
class LineReporter:
    """Progress for logs (stderr is not a terminal): one line per finished step, with its duration.

    Implements the :class:`resunetpp.export.report.Reporter` protocol, like the rich progress bars used on
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
    shown = columns(result, TERMINAL)
    for header, _ in shown:
        table.add_column(header, justify="right" if header in NUMERIC else "left",
                         no_wrap=header in ("backend", "precision"))
    for r in _measured(result):
        table.add_row(*(cell(r) for _, cell in shown), style="bold" if _is_reference(r) else None)
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
             *([f"- **CPU peak**: {peaks_line(result)}"] if peaks_line(result) else []),
             f"- **evaluation**: {result.evaluation.get('count')} images of `{result.evaluation.get('source')}`"
             + (f" (split {result.evaluation.get('split')})" if result.evaluation.get("split") else ""),
             f"- **timing**: {settings['warmup_s']:g} s warm-up, {settings['duration_s']:g} s per measurement, "
             f"batch sizes {', '.join(map(str, settings['batch_sizes']))}", ""]
    cols = columns(result)
    if result.settings.get("video"):
        v = result.settings["video"]
        lines[-1:-1] = [f"- **video**: `{Path(str(v.get('file'))).name}`, {v.get('frames')} frames, "
                        f"{v.get('width')}x{v.get('height')} at {v.get('fps') or 0:.3g} fps"
                        + (f" ({v.get('codec')})" if v.get("codec") else "")]
    lines += _md_table([h for h, _ in cols], [[cell(r) for _, cell in cols] for r in _measured(result)], NUMERIC)
    if is_sweep(result):
        lines += ["", "## Input-size sweep", ""] + sweep_table(result)
    missing = _not_measured(result)
    if missing:
        lines += ["", "## Not measured", ""]
        lines += _md_table(["backend", "precision", "batch", "status", "reason"],
                           [[r.backend, r.precision, "-" if r.batch_size is None else str(r.batch_size), r.status,
                             r.reason or ""] for r in missing], set())
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


SWEEP_HEADERS = ("input", "backend", "precision", "GFLOP/img", "img/s", "model-only fps", "video fps",
                 "Dice vs GT", "Dice vs ref at native", "min", "keeps up")


def sweep_table(result: BenchResult) -> list[str]:
    """The sweep's Markdown table: one line per input size and backend/precision (settings' ``size_sweep``)."""
    settings = result.settings
    by_size = settings.get("gflop_per_image_by_size") or {}
    native = "x".join(map(str, settings.get("native_size") or []))
    fps = next((p.get("target_fps") for p in settings.get("size_sweep") or []), None)
    lines = [f"Dice vs ref at native: against torch fp32 at {native}; keeps up: {fps:g} fps "
             f"({'the clip' if settings.get('video') else 'colonoscopy video'}; video fps when measured, else the "
             "model-only rate).", ""] if fps else []
    rows = []
    for p in settings.get("size_sweep") or []:
        size = "x".join(map(str, p["image_size"]))
        if p["status"] != "ok":
            rows.append([size, p["backend"], p["precision"], _num(by_size.get(size), ".2f"), p["status"], "", "",
                         "", "", p.get("reason") or "", ""])
            continue
        rows.append([size, p["backend"], p["precision"], _num(by_size.get(size), ".2f"), _num(p["throughput_ips"], ".1f"),
                     _num(p["model_only_ips"], ".1f"), _num(p["video_fps"], ".1f"), _num(p["dice_vs_gt"], ".4f"),
                     _num(p["dice_vs_native_reference"], ".4f"), _num(p["dice_vs_native_reference_min"], ".4f"),
                     _keeps_up(p["keeps_up"])])
    return lines + _md_table(SWEEP_HEADERS, rows, set(SWEEP_HEADERS) - {"backend", "precision", "keeps up"})


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
#: The sweep plot's line style per precision (colour is the backend, as in the main plot).
PRECISION_LINES = {"fp32": "-", "bf16": ":", "fp16": "-.", "int8": "--"}


def _speedup(r: BenchRow, reference: BenchRow | None) -> float | None:
    """The row's speed-up over the reference (at its own batch size when measured there)."""
    if r.speedup is not None:
        return r.speedup
    if reference is not None and reference.throughput_ips and r.throughput_ips:
        return r.throughput_ips / reference.throughput_ips
    return None


#: Label offsets (points) tried in turn around each point; the first that overlaps nothing wins.
LABEL_OFFSETS = tuple((dx, dy) for dy in (3, -11, 14, -22, 25, -33, 36, -44, 47, -55, 58, -66, 69, -77, 80, -88)
                      for dx in (7, -7))


def _place_labels(ax, points: Sequence[tuple[BenchRow, float, float]]) -> list:
    """Annotate each point at the first offset (:data:`LABEL_OFFSETS`) whose label box overlaps no
    label placed before and no point, inside the axes; a moved label gets a leader line. Returns
    the annotations (their boxes are what a test checks)."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the axes' transform
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = []  # display-space boxes: texts already there (the peak lines' names), labels placed, markers
    for text in list(ax.texts):
        box = text.get_window_extent(renderer)
        taken.append((box.x0, box.y0, box.x1, box.y1))
    for _, x, y in points:
        px, py = ax.transData.transform((x, y))
        taken.append((px - 6, py - 6, px + 6, py + 6))
    labels = []
    order = sorted(points, key=lambda p: (-p[2], p[1]))
    for r, x, y in order:
        text = r.label + (f" b{r.batch_size}" if r.batch_size else "")
        chosen = None
        for dx, dy in LABEL_OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7.5,
                              ha="left" if dx > 0 else "right", va="bottom")
            box = ann.get_window_extent(renderer)
            rect = (box.x0, box.y0, box.x1, box.y1)
            inside = frame.x0 <= rect[0] and rect[2] <= frame.x1 and frame.y0 <= rect[1] and rect[3] <= frame.y1
            if inside and not any(_overlap(rect, t) for t in taken):
                chosen = (ann, rect, (dx, dy))
                break
            ann.remove()
        if chosen is None:  # nowhere free: the first offset, overlapping
            dx, dy = LABEL_OFFSETS[0]
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7.5, va="bottom")
            box = ann.get_window_extent(renderer)
            chosen = (ann, (box.x0, box.y0, box.x1, box.y1), (dx, dy))
        ann, rect, offset = chosen
        if abs(offset[1]) > 11:  # moved away from its point: a leader line back to it
            ax.annotate("", (x, y), textcoords="offset points", xytext=(offset[0], offset[1] + 4),
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.55", "shrinkA": 0, "shrinkB": 3})
        taken.append(rect)
        labels.append(ann)
    return labels


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _padded(low: float, high: float, share: float = 0.08, minimum: float = 0.002) -> tuple[float, float]:
    span = max(high - low, minimum)
    return low - share * span, high + share * span


def plot_figure(result: BenchResult):
    """The bench plot as a matplotlib Figure: speed-up over the reference (x) against Dice vs the
    reference (y), one point per backend and precision (its fastest batch size), labelled; colour
    is the backend and marker the precision, both in legends; dashed vertical lines where a row
    would run at the CPU's measured peak (f32, bf16, int8 in GOP/s); the axes end just past the data."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = _best_rows(result)
    reference = next((r for r in rows if _is_reference(r)), None)
    points = [(r, sx, r.dice_vs_reference) for r in rows
              if (sx := _speedup(r, reference)) is not None and r.dice_vs_reference is not None]
    fig = Figure(figsize=(9, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # a canvas with a renderer: label boxes are measured before they are placed
    ax = fig.add_subplot()
    for r, x, y in points:
        ax.scatter(x, y, s=130 if _is_reference(r) else 45, zorder=3, color=backend_color(r.backend),
                   marker="*" if _is_reference(r) else PRECISION_MARKERS.get(r.precision, "o"),
                   edgecolors="black", linewidths=0.4)
    xs = [x for _, x, _ in points]
    peaks = result.environment.get("cpu_peak") or {}
    if reference is not None and reference.gflops_per_s:
        for name, peak in peaks.items():
            if isinstance(peak, dict) and peak.get("gflops"):
                at = peak["gflops"] / reference.gflops_per_s
                ax.axvline(at, color="0.35", lw=0.8, ls="--", zorder=1)
                ax.annotate(f"{name} peak ({peak['gflops']:.0f} {peak.get('unit', 'GFLOP/s')})", (at, 0), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, color="0.35", ha="right", va="bottom", xytext=(-2, 2),
                            textcoords="offset points")  # at the bottom: the rows near Dice 1 are at the top
                xs.append(at)
    if points:
        ys = [y for _, _, y in points]
        ax.set_xlim(*_padded(min(xs), max(xs), minimum=0.05))
        low, high = _padded(min(ys), max(ys), share=0.15)
        ax.set_ylim(low, high + 0.15 * (high - low))  # headroom for the labels of the rows at Dice 1
        ax.axhline(1.0, color="0.8", lw=0.6, zorder=0)
        ax.axvline(1.0, color="0.8", lw=0.6, zorder=0)
        fig.canvas.draw()
        _place_labels(ax, points)
        backends = list(dict.fromkeys(r.backend for r, _, _ in points))
        precisions = list(dict.fromkeys(r.precision for r, _, _ in points))
        colour = ax.legend(handles=[Line2D([], [], ls="", marker="o", color=backend_color(b), label=b)
                                    for b in backends], title="backend (colour)", loc="upper left",
                           bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=8, frameon=False)
        ax.add_artist(colour)
        ax.legend(handles=[Line2D([], [], ls="", marker=PRECISION_MARKERS.get(p, "o"), color="0.3", label=p)
                           for p in precisions]
                  + [Line2D([], [], ls="", marker="*", markersize=10, color="0.3", label="reference")],
                  title="precision (marker)", loc="upper left", bbox_to_anchor=(1.01, 0.55), fontsize=8,
                  title_fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no row was measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"speed-up over {result.reference} (throughput ratio, fastest batch size)")
    ax.set_ylabel(f"Dice vs {result.reference} reference mask")
    cpu = result.environment.get("cpu") or {}
    gpu = result.environment.get("gpu")
    ax.set_title(f"resunetpp bench: {cpu.get('model') or 'unknown CPU'} ({cpu.get('cores')} logical cores)"
                 + (f", {gpu['name']}" if isinstance(gpu, dict) and gpu.get("name") else "")
                 + f"; input {'x'.join(map(str, result.settings.get('image_size', [])))}", fontsize=9, loc="left")
    ax.grid(True, alpha=0.3)
    return fig


def sweep_figure(result: BenchResult):
    """The input-size sweep as a matplotlib Figure: speed (x: video FPS when a clip was run, else the
    model-only rate, images/s at batch 1) against Dice vs ground truth (left) and Dice vs the
    reference at the native size (right); one line per backend/precision through its sizes, each
    point labelled with its size; a dashed line at the frame rate to keep up with. A user picks the
    operating point right of that line with the highest Dice."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [p for p in result.settings.get("size_sweep") or [] if p["status"] == "ok"]
    video = bool(result.settings.get("video"))
    fps = next((p["target_fps"] for p in result.settings.get("size_sweep") or []), 25.0)
    fig = Figure(figsize=(11, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    native = "x".join(map(str, result.settings.get("native_size") or []))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, label in ((axes[0], "dice_vs_gt", "Dice vs ground truth (original resolution)"),
                           (axes[1], "dice_vs_native_reference", f"Dice vs torch fp32 at {native}")):
        for name in dict.fromkeys((p["backend"], p["precision"]) for p in points):
            line = sorted((p for p in points if (p["backend"], p["precision"]) == name
                           and p[key] is not None and _sweep_speed(p, video) is not None),
                          key=lambda p: p["image_size"][0])
            if not line:
                continue
            xs = [_sweep_speed(p, video) for p in line]
            ys = [p[key] for p in line]
            ax.plot(xs, ys, color=backend_color(name[0]), marker=PRECISION_MARKERS.get(name[1], "o"), lw=1.2,
                    ls=PRECISION_LINES.get(name[1], "-"),
                    ms=6, label=f"{name[0]} {name[1]}", markeredgecolor="black", markeredgewidth=0.4)
            for p, x, y in zip(line, xs, ys):
                ax.annotate(str(p["image_size"][0]), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.axvline(fps, color="0.35", lw=0.8, ls="--")
        ax.annotate(f"{fps:g} fps", (fps, 0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    color="0.35", ha="right", va="bottom", xytext=(-2, 2), textcoords="offset points")
        ax.set_ylabel(label)
        ax.set_xlabel("video fps (end to end)" if video else "model-only images/s (batch 1)")
        ax.grid(True, alpha=0.3)
    if points:
        axes[1].legend(loc="lower left", fontsize=8, frameon=False, title="backend precision", title_fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no row was measured", ha="center", va="center", transform=axes[0].transAxes)
    cpu = result.environment.get("cpu") or {}
    fig.suptitle(f"resunetpp bench: input size sweep on {cpu.get('model') or 'unknown CPU'} "
                 f"({cpu.get('cores')} logical cores); labels: input side", fontsize=9, x=0.01, ha="left")
    return fig


def _sweep_speed(point: dict, video: bool) -> float | None:
    return point.get("video_fps") if video else point.get("model_only_ips")


def write_plot(result: BenchResult, path: str | Path) -> Path:
    """:func:`plot_figure` (:func:`sweep_figure` for an input-size sweep) as a PNG, written atomically."""
    path = Path(path)
    fig = sweep_figure(result) if is_sweep(result) else plot_figure(result)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as e:
        raise _cannot_write(path, e) from None
    return path
