"""``quantize`` output and long-step progress (issue 21, items 6 and 8): group names never cut,
groups with no Q/DQ folded into one line, a warning when a recommendation that differs from the
export default rests on too few images, one progress line per step off a terminal, ETAs."""

from __future__ import annotations

from rich.console import Console

from resunetpp.export.quantize import DEFAULT_INT8_KEEP_MODULES
from resunetpp.export.report import Eta, NullReporter, RichReporter, TimedReporter, format_seconds
from resunetpp.export.sensitivity import (MIN_TRUSTED_EVAL_IMAGES, Goal, GroupSensitivity, SearchStep,
                                          SensitivityReport, recommendation_warning, render)

LONG = "decoder3.attention.out_conv.2"  # the longest kind of name (--depth 4)


def report(chosen=("decoder1.attention",), eval_images=20) -> SensitivityReport:
    groups = [GroupSensitivity(LONG, 3, 0.97, 0.9, 0.01, flops_share=0.05),
              GroupSensitivity("stem", 2, 0.99, 0.95, 0.005, flops_share=0.02),
              GroupSensitivity("decoder1.attention.pool", 0, None, None, None, note="nothing to quantize"),
              GroupSensitivity("aspp_out.act", 0, None, None, None, note="nothing to quantize")]
    steps = [SearchStep(list(chosen), 0.99, 0.95, 0.004, True, 0.03)]
    return SensitivityReport(groups=groups, steps=steps, chosen=list(chosen), goal=Goal(0.98, 0.9), goal_met=True,
                             eval_images=eval_images)


def rendered(r: SensitivityReport, width: int = 80) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    for table in render(r):
        console.print(table)
    return console.export_text()


def test_group_names_are_never_cut_and_empty_groups_are_one_line():
    text = rendered(report())
    ranking = text.split("Mixed precision")[0]
    assert LONG in ranking and "stem" in ranking
    assert not [l for l in ranking.splitlines() if "decoder3" in l and "…" in l]
    assert ranking.count("decoder1.attention.pool") == 1 and ranking.count("aspp_out.act") == 1
    line = next(l for l in ranking.splitlines() if "no Q/DQ inserted" in l)
    assert "decoder1.attention.pool" in ranking.split("no Q/DQ inserted")[1]
    assert "nothing to quantize" not in ranking  # no per-row notes for them
    assert line


def test_recommendation_warning():
    assert recommendation_warning(report(eval_images=20)) is not None
    assert "20 evaluation images" in recommendation_warning(report(eval_images=20))
    assert recommendation_warning(report(eval_images=MIN_TRUSTED_EVAL_IMAGES)) is None
    assert recommendation_warning(report(chosen=DEFAULT_INT8_KEEP_MODULES, eval_images=5)) is None
    assert recommendation_warning(report(eval_images=0)) is None  # not recorded


def test_eta():
    now = [100.0]
    eta = Eta(4, clock=lambda: now[0])
    assert eta.text() == "0/4"
    now[0] += 10
    eta.advance()
    assert eta.text() == "1/4, ETA 0:30"
    now[0] += 10
    eta.advance(3)
    assert eta.text() == "4/4, ETA 0:00"
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "1:05"


def test_export_progress_shows_time_remaining():
    from rich.progress import TimeRemainingColumn

    reporter = RichReporter(Console(file=open("/dev/null", "w")))
    assert any(isinstance(c, TimeRemainingColumn) for c in reporter.progress.columns)


def test_timed_reporter_records_each_step_even_when_it_fails():
    now = [0.0]
    inner = NullReporter()
    timed = TimedReporter(inner, clock=lambda: now[0])
    with timed.task("outer", total=2) as advance:
        advance(1)
        now[0] += 1.5
        with timed.task("inner"):
            now[0] += 2.0
    try:
        with timed.task("broken"):
            now[0] += 0.25
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    timed.warn("careful")
    assert timed.steps == [{"step": "inner", "seconds": 2.0}, {"step": "outer", "seconds": 3.5},
                           {"step": "broken", "seconds": 0.25}]
    assert timed.elapsed() == 3.75 and inner.warnings == ["careful"]
