"""The bench plot (issue 21, item 10): speed-up against Dice vs the reference, a legend for colour
(backend) and marker (precision), labels that do not overlap near the reference, the CPU peak
lines, and axes that end just past the data."""

from __future__ import annotations

import pytest

from resunetpp.bench.harness import BenchResult, BenchRow
from resunetpp.bench.report import plot_figure, write_plot


def row(backend, precision, ips, dice, gflops=None, **kw):
    return BenchRow(backend, precision, batch_size=1, throughput_ips=ips, dice_vs_reference=dice,
                    dice_vs_reference_min=dice - 0.01, gflops_per_s=gflops, **kw)


@pytest.fixture
def result():
    ref = row("torch", "fp32", 5.9, 1.0, gflops=185.0)
    rows = [ref, row("torch", "bf16", 10.8, 0.998), row("onnxruntime", "fp32", 6.4, 1.0),
            row("onnxruntime", "fp16", 6.3, 0.9999), row("onnxruntime", "int8", 7.2, 0.9875),
            row("openvino", "fp32", 6.6, 1.0), row("openvino", "bf16", 13.4, 0.9971),
            row("openvino", "fp16", 13.4, 0.9978), row("openvino", "int8", 22.1, 0.9927)]
    for r in rows:
        r.speedup = r.throughput_ips / ref.throughput_ips
    env = {"cpu": {"model": "test CPU", "cores": 2}, "cpu_peak": {"f32": {"gflops": 215.0}, "bf16": {"gflops": 403.0}}}
    return BenchResult(env, {"image_size": [256, 256]}, {}, None, None, rows, [])


def test_plot_axes_legends_and_peak_lines(result):
    fig = plot_figure(result)
    ax = fig.axes[0]
    assert "speed-up" in ax.get_xlabel() and "Dice vs torch fp32" in ax.get_ylabel()
    legends = [a for a in ax.get_children() if type(a).__name__ == "Legend"]
    texts = {t.get_text() for legend in legends for t in legend.get_texts()}
    titles = {legend.get_title().get_text() for legend in legends}
    assert {"torch", "onnxruntime", "openvino"} <= texts and {"fp32", "bf16", "fp16", "int8", "reference"} <= texts
    assert titles == {"backend (colour)", "precision (marker)"}
    notes = [t.get_text() for t in ax.texts]
    assert any(n.startswith("f32 peak") for n in notes) and any(n.startswith("bf16 peak") for n in notes)
    # axes end just past the data: speed-ups 0.9..3.75 and the bf16 peak line at 403/185 = 2.18
    x0, x1 = ax.get_xlim()
    assert 0.7 < x0 < 1.0 and 3.75 < x1 < 4.1
    y0, y1 = ax.get_ylim()
    assert 0.98 < y0 < 0.9875 and 1.0 < y1 < 1.006  # a little headroom for the labels at Dice 1


def test_labels_do_not_overlap(result):
    fig = plot_figure(result)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if type(t).__name__ == "Annotation" and t.get_text()]
    assert len(labels) == len(result.rows) + 2  # and the two peak lines' names
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_write_plot(result, tmp_path):
    path = write_plot(result, tmp_path / "p.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
