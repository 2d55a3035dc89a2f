"""INT8 sensitivity analysis and the accuracy-driven search for what to keep in floating point.

The method (``resunetpp quantize``):

1. Export the FP32 ONNX, run it on held-out evaluation images: the reference probabilities.
2. Calibrate activation ranges once (:func:`resunetpp.export.quantize.calibrate_ranges`).
3. **Per-group sensitivity**: for each module group (``stem``, ``encoder1``, ...,
   ``decoder1.attention``, ``decoder1.block``, ``head_aspp``, ``head``) build a Q/DQ graph in
   which *only that group* is quantized and measure the mean / minimum Dice of its masks against
   the reference masks. The drop ``1 - dice`` ranks the groups.
4. **Greedy mixed precision**: starting from the base recipe (everything quantized), keep the
   most sensitive group in float, then the next, ... until the goal holds (mean Dice vs
   reference >= ``target_mean`` and no image below ``target_min``) or ``max_keep`` groups are
   kept. Each step is measured, so the history shows what every kept group bought.
   With a FLOP budget (``max_float_share``) a group whose FLOPs would take the float part past
   it is skipped: float work is what costs the speed (``resunetpp.flops``), so the budget keeps
   the result within a speed target.

Calibrating once and re-quantizing from the cached ranges makes each measurement cost one
graph rewrite plus one ONNX Runtime pass over the evaluation images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from resunetpp.export.metadata import graph_record
from resunetpp.export.onnx_graph import module_groups, node_scopes
from resunetpp.export.quantize import DEFAULT_BIAS_CORRECTION_IMAGES, DEFAULT_EQUALIZE_ALPHA, QDQRecipe, quantize_qdq
from resunetpp.export.verify import artifact_predict, compare_outputs, predict_batched
from resunetpp.errors import ResUNetError
from resunetpp.flops import FlopCount


@dataclass(frozen=True)
class Goal:
    """Accuracy an INT8 artifact must keep against the FP32 reference masks."""

    mean_dice: float = 0.98
    min_dice: float = 0.90

    def met(self, metrics: dict) -> bool:
        return (metrics["dice_vs_reference_mean"] >= self.mean_dice
                and metrics["dice_vs_reference_min"] >= self.min_dice
                and not metrics["nonfinite_images"])


@dataclass
class GroupSensitivity:
    group: str
    nodes: int
    dice_mean: float | None
    dice_min: float | None
    abs_error_mean: float | None
    note: str = ""
    #: the group's share of the model's FLOPs (what keeping it in float costs); None: not counted
    flops_share: float | None = None

    @property
    def drop(self) -> float:
        return 0.0 if self.dice_mean is None else 1.0 - self.dice_mean


@dataclass
class SearchStep:
    kept_in_float: list[str]
    dice_mean: float
    dice_min: float
    abs_error_mean: float
    goal_met: bool
    #: share of the model's FLOPs left in float by this step (None: not counted)
    float_flops_share: float | None = None


@dataclass
class SensitivityReport:
    groups: list[GroupSensitivity] = field(default_factory=list)
    full_int8: dict | None = None
    steps: list[SearchStep] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    goal: Goal = field(default_factory=Goal)
    goal_met: bool = False
    base_recipe: dict = field(default_factory=dict)
    #: largest share of the FLOPs the search was allowed to keep in float (None: no budget)
    max_float_share: float | None = None
    #: groups skipped because they would have exceeded ``max_float_share``
    over_budget: list[str] = field(default_factory=list)
    #: evaluation images the Dice was measured on (0: not recorded)
    eval_images: int = 0

    def ranking(self) -> list[GroupSensitivity]:
        return sorted(self.groups, key=lambda g: (-g.drop, g.group))

    def as_dict(self) -> dict:
        return {
            "goal": asdict(self.goal),
            "base_recipe": self.base_recipe,
            "full_int8": self.full_int8,
            "ranking": [{**asdict(g), "drop": g.drop} for g in self.ranking()],
            "search": [asdict(s) for s in self.steps],
            "kept_in_float": self.chosen,
            "goal_met": self.goal_met,
            "max_float_flops_share": self.max_float_share,
            "skipped_over_budget": self.over_budget,
        }


class Evaluator:
    """Quantizes the FP32 ONNX with a recipe and scores it against the reference outputs."""

    def __init__(self, fp32_onnx: str | Path, ranges_cache: str | Path, inputs: Sequence[np.ndarray],
                 reference: Sequence[np.ndarray] | None = None, work: str | Path | None = None,
                 batch_size: int = 4, num_classes: int = 1) -> None:
        import onnx

        self.fp32_onnx = Path(fp32_onnx)
        self.ranges_cache = Path(ranges_cache)
        self.inputs = list(inputs)
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.model = onnx.load(str(self.fp32_onnx))
        self.scopes = node_scopes(self.model)
        self.all_nodes = [n.name for n in self.model.graph.node]
        self._tmp = tempfile.TemporaryDirectory(prefix="resunetpp-sens-") if work is None else None
        self.work = Path(work) if work is not None else Path(self._tmp.name)
        self.record = graph_record(self.model)  # what an engine needs to run the graph and its probes
        self.reference = list(reference) if reference is not None else self._run(self.fp32_onnx)
        self.runs = 0

    def _run(self, path: Path) -> list[np.ndarray]:
        """Outputs of the graph at ``path`` on the evaluation inputs (ONNX Runtime, CPU)."""
        with artifact_predict(path, "onnxruntime", self.record) as predict:
            return predict_batched(predict, self.inputs, self.batch_size)

    def groups(self, depth: int = 2) -> dict[str, list[str]]:
        return module_groups(self.scopes, depth)

    def score(self, recipe: QDQRecipe) -> dict:
        path = self.work / f"probe_{self.runs}.onnx"
        self.runs += 1
        quantize_qdq(self.fp32_onnx, self.ranges_cache, path, recipe)
        probs = self._run(path)
        path.unlink(missing_ok=True)
        return compare_outputs(probs, self.reference, num_classes=self.num_classes)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def analyze(ev: Evaluator, base: QDQRecipe, depth: int = 2,
            progress: Callable[[str], None] | None = None, flops: FlopCount | None = None) -> list[GroupSensitivity]:
    """Quantize one module group at a time (the rest in float) and measure its Dice vs reference.
    With ``flops``, each row also carries the share of the model's FLOPs in the group's own nodes
    (a parent module's row, e.g. ``decoder1`` at depth 2, holds only the ops run directly in it)."""
    from resunetpp.export.report import Eta

    rows = []
    own = flops.groups(depth) if flops is not None else None
    groups = ev.groups(depth)
    eta = Eta(len(groups))
    for group, nodes in groups.items():
        share = None if own is None else own.get(group, 0) / flops.total
        if progress:
            progress(f"{group} ({eta.text()})")
        eta.advance()
        others = tuple(n for n in ev.all_nodes if n not in set(nodes))
        recipe = replace(base, keep_nodes=tuple(sorted(set(base.keep_nodes) | set(others))))
        try:
            m = ev.score(recipe)
        except ResUNetError as e:  # e.g. the group has nothing the recipe quantizes
            rows.append(GroupSensitivity(group, len(nodes), None, None, None, note=str(e), flops_share=share))
            continue
        rows.append(GroupSensitivity(group, len(nodes), m["dice_vs_reference_mean"], m["dice_vs_reference_min"],
                                     m["abs_error_mean"], flops_share=share))
    return rows


def search(ev: Evaluator, base: QDQRecipe, ranking: Sequence[GroupSensitivity], goal: Goal,
           max_keep: int = 6, progress: Callable[[str], None] | None = None, flops: FlopCount | None = None,
           max_float_share: float | None = None) -> tuple[list[SearchStep], list[str], list[str]]:
    """Keep the most sensitive groups in float, one more per step, until ``goal`` holds.

    With ``max_float_share`` (needs ``flops``), a group that would take the float share of the
    FLOPs (the base recipe's kept modules included) past it is skipped. A kept group is kept as
    ``export --keep-float`` keeps it, with every module below it, and costs accordingly. Returns the steps, the
    groups kept and the groups skipped for the budget.
    """
    if max_float_share is not None and flops is None:
        raise ValueError("a FLOP budget (max_float_share) needs the model's FLOP count")
    candidates = [g.group for g in ranking if g.dice_mean is not None and g.drop > 0]

    def float_share(groups: Sequence[str]) -> float | None:
        return None if flops is None else flops.share([*base.keep_modules, *groups])

    kept: list[str] = []
    skipped: list[str] = []
    steps: list[SearchStep] = []
    queue = iter(candidates)
    while True:
        recipe = replace(base, keep_modules=tuple(sorted(set(base.keep_modules) | set(kept))))
        if progress:
            progress(", ".join(kept) or "(all quantized)")
        m = ev.score(recipe)
        ok = goal.met(m)
        steps.append(SearchStep(list(kept), m["dice_vs_reference_mean"], m["dice_vs_reference_min"],
                                m["abs_error_mean"], ok, float_share(kept)))
        if ok or len(kept) >= max_keep:
            return steps, kept, skipped
        for group in queue:
            if max_float_share is not None and float_share([*kept, group]) > max_float_share:
                skipped.append(group)
                continue
            kept.append(group)
            break
        else:  # no candidate left that fits
            return steps, kept, skipped


def run_analysis(ev: Evaluator, base: QDQRecipe, goal: Goal = Goal(), max_keep: int = 6, depth: int = 2,
                 progress: Callable[[str], None] | None = None, flops: FlopCount | None = None,
                 max_float_share: float | None = None) -> SensitivityReport:
    report = SensitivityReport(goal=goal, base_recipe=base.to_dict(), max_float_share=max_float_share)
    report.groups = analyze(ev, base, depth, progress, flops)
    report.steps, report.chosen, report.over_budget = search(ev, base, report.ranking(), goal, max_keep, progress,
                                                             flops, max_float_share)
    first = report.steps[0]
    report.full_int8 = {"dice_mean": first.dice_mean, "dice_min": first.dice_min,
                        "abs_error_mean": first.abs_error_mean}
    report.goal_met = report.steps[-1].goal_met
    return report


# ---- the `resunetpp quantize` command ------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeOptions:
    checkpoint: Path
    calib: Path
    eval: Path
    out: Path
    calib_split: str | None = None
    eval_split: str | None = None
    calib_count: int = 300
    eval_count: int = 100
    method: str = "percentile"
    percentile: float = 99.99
    ops: str = "conv"  # "conv": quantize convolutions only; "all": every op ONNX Runtime can
    goal: Goal = Goal()
    max_keep: int = 6
    image_size: tuple[int, int] | None = None
    #: Cross-layer equalization before calibration (``QDQRecipe.equalize_alpha``); None: off.
    equalize_alpha: float | None = DEFAULT_EQUALIZE_ALPHA
    #: Bias correction images (``QDQRecipe.bias_correction_images``); 0: off.
    bias_correction_images: int = DEFAULT_BIAS_CORRECTION_IMAGES
    #: Module path depth of the groups (2: ``decoder1.attention``; deeper: single convolutions).
    depth: int = 2
    #: Largest share (0-1) of the model's FLOPs the search may keep in float; None: no budget.
    max_float_share: float | None = None


def quantize_checkpoint(o: QuantizeOptions, progress: Callable[[str], None] | None = None) -> SensitivityReport:
    """Sensitivity analysis and mixed-precision search for one checkpoint; see the module docstring.

    Writes ``sensitivity.json`` into ``o.out`` and returns the report; the recipe it finds is
    what ``resunetpp export --keep-float`` applies.
    """
    import onnx

    from resunetpp.export import calibration as cal
    from resunetpp.export.bias_correction import bias_correct
    from resunetpp.export.equalize import equalize
    from resunetpp.export.onnx_graph import ShapeSpec, export_onnx
    from resunetpp.export.quantsim import sim_ranges
    from resunetpp.export.quantize import CALIBRATION_METHODS, calibrate_ranges
    from resunetpp.atomic import write_json_atomic
    from resunetpp.checkpoint import load_checkpoint
    from resunetpp.flops import count_flops
    from resunetpp.model import WithActivation

    if o.method not in CALIBRATION_METHODS:
        raise ResUNetError(f"--method must be one of {', '.join(CALIBRATION_METHODS)}, got {o.method!r}")
    if o.ops not in ("conv", "all"):
        raise ResUNetError(f"--ops must be 'conv' or 'all', got {o.ops!r}")
    if o.depth < 1:
        raise ResUNetError(f"--depth must be at least 1, got {o.depth}")
    if o.max_float_share is not None and not 0.0 <= o.max_float_share <= 1.0:
        raise ResUNetError(f"--max-float-flops must be a percentage in [0, 100], got {100 * o.max_float_share:g}")
    say = progress or (lambda _m: None)
    ckpt = load_checkpoint(o.checkpoint)
    pre = ckpt.preprocessing if o.image_size is None else ckpt.preprocessing.with_size(o.image_size)
    calib = cal.select_images(o.calib, o.calib_split, o.calib_count, role="calibration", default_split="train")
    evset = cal.select_images(o.eval, o.eval_split, o.eval_count, role="evaluation", default_split="val")
    cal.check_disjoint(calib, evset)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-work-", dir=out) as tmp:
        work = Path(tmp)
        net = ckpt.build_model()
        flops = count_flops(net, (ckpt.config.in_channels, *pre.size))
        images = [x[None] for x in calib.inputs(pre)]  # decoded once: equalization, bias correction, ranges
        source: dict = {"equalization": None, "bias_correction": None}  # what the INT8 source went through
        if o.equalize_alpha is not None:
            say(f"equalizing activation ranges (alpha {o.equalize_alpha:g}) on {len(calib)} images")
            source["equalization"] = equalize(net, images, o.equalize_alpha).record()
        if o.bias_correction_images:
            say(f"correcting INT8 biases on {min(o.bias_correction_images, len(calib))} images")
            source["bias_correction"] = bias_correct(net, images, o.bias_correction_images,
                                                     **sim_ranges(o.method, o.percentile))
        say("exporting the FP32 ONNX")
        model = export_onnx(WithActivation(net),
                            ShapeSpec(ckpt.config.in_channels, ckpt.config.num_classes, pre.size))
        fp32 = work / "fp32.onnx"
        onnx.save(model, str(fp32))
        say(f"calibrating ({o.method}) on {len(calib)} images")
        cache = calibrate_ranges(fp32, images, work / "ranges.calib",
                                 method=o.method, percentile=o.percentile)
        base = QDQRecipe(method=o.method, percentile=o.percentile, keep_modules=(), conv_only=o.ops == "conv",
                         equalize_alpha=o.equalize_alpha, bias_correction_images=o.bias_correction_images)
        ev = Evaluator(fp32, cache, list(evset.inputs(pre)), work=work, num_classes=ckpt.config.num_classes)
        try:
            report = run_analysis(ev, base, o.goal, o.max_keep, o.depth, progress=lambda g: say(f"measuring {g}"),
                                  flops=flops, max_float_share=o.max_float_share)
        finally:
            ev.close()
    report.eval_images = len(evset)
    record = report.as_dict()
    record["checkpoint"] = {"path": str(o.checkpoint), "sha256": ckpt.sha256}
    record["gflop_per_image"] = flops.total / 1e9
    record["calibration"] = calib.record()
    record["evaluation"] = evset.record()
    record.update(source)
    write_json_atomic(out / "sensitivity.json", record)
    return report


#: A search on fewer evaluation images than this does not justify departing from the export default.
MIN_TRUSTED_EVAL_IMAGES = 50


def recommendation_warning(report: SensitivityReport) -> str | None:
    """A warning when the groups the search keeps in float differ from the export default
    (``DEFAULT_INT8_KEEP_MODULES``) and were chosen on fewer than :data:`MIN_TRUSTED_EVAL_IMAGES`
    evaluation images: a Dice difference of a few thousandths between recipes is noise there."""
    from resunetpp.export.quantize import DEFAULT_INT8_KEEP_MODULES

    n = report.eval_images
    if not n or n >= MIN_TRUSTED_EVAL_IMAGES or set(report.chosen) == set(DEFAULT_INT8_KEEP_MODULES):
        return None
    return (f"the search measured only {n} evaluation images; a keep-in-float set that differs from the export "
            f"default (export.quantize.DEFAULT_INT8_KEEP_MODULES) needs at least {MIN_TRUSTED_EVAL_IMAGES} to be "
            "trusted (pass --eval with more images, --eval-count 100)")


def render(report: SensitivityReport):
    """Rich renderables: the ranked sensitivity table and the search steps. Group names are never
    cut; groups in which the recipe inserted no Q/DQ (nothing to quantize) are one line under the
    ranking instead of a row each."""
    from rich.table import Table

    def pct(share: float | None) -> str:
        return "-" if share is None else f"{100 * share:.1f}"

    ranked = report.ranking()
    empty = [g.group for g in ranked if g.dice_mean is None]
    measured = [g for g in ranked if g.dice_mean is not None]
    caption = (f"no Q/DQ inserted (nothing the recipe quantizes), not ranked: {', '.join(empty)}" if empty else None)
    from rich import box

    t = Table(title="INT8 sensitivity: only this group quantized (rest in float); mean, min: Dice vs the FP32 "
                    "reference", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    for col in ("#", "group", "nodes", "FLOPs%", "mean", "min", "drop"):  # names and numbers whole at 80 columns
        t.add_column(col, justify="left" if col == "group" else "right", no_wrap=True)
    for i, g in enumerate(measured, 1):
        t.add_row(str(i), g.group, str(g.nodes), pct(g.flops_share), f"{g.dice_mean:.4f}", f"{g.dice_min:.4f}",
                  f"{g.drop:.4f}")
    budget = ("" if report.max_float_share is None
              else f", float budget {100 * report.max_float_share:g}% of the FLOPs")
    s = Table(title=f"Mixed precision search (goal: mean >= {report.goal.mean_dice}, "
                    f"min >= {report.goal.min_dice}{budget})")
    s.add_column("kept in float", overflow="fold")  # wraps between names, never cuts one
    for col in ("float FLOPs %", "Dice mean", "Dice min", "mean |dp|", "goal"):
        s.add_column(col, no_wrap=True)
    for st in report.steps:
        s.add_row(", ".join(st.kept_in_float) or "(none)", pct(st.float_flops_share), f"{st.dice_mean:.4f}",
                  f"{st.dice_min:.4f}", f"{st.abs_error_mean:.4f}", "met" if st.goal_met else "-")
    return t, s
