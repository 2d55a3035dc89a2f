"""``quantize``: INT8 sensitivity analysis, mixed-precision search, or quantization-aware fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from resunetpp.cli.common import app, choice_enum, fail
from resunetpp.errors import ResUNetError
from resunetpp.memory import reuse_freed_memory
from resunetpp.cli.export import (BiasCorrectionOption, EqualizeAlphaOption, EqualizeOption, ExportCalibMethod,
                                  _bias_correction, _equalize_alpha)
from resunetpp.export.quantize import INT8_OPS

QuantOps = choice_enum("QuantOps", INT8_OPS)


@app.command("quantize")
def quantize_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (.safetensors / .pt) to quantize.")],
    calib: Annotated[Path, typer.Option(help="Calibration images: a folder, or a dataset root (split 'train').")],
    eval_: Annotated[Path, typer.Option("--eval", help="Held-out evaluation images (dataset root: split 'val').")],
    out: Annotated[Path, typer.Option(help="Folder for sensitivity.json.")] = Path("quantize"),
    calib_split: Annotated[Optional[str], typer.Option(help="Split of --calib (name or file).")] = None,
    eval_split: Annotated[Optional[str], typer.Option(help="Split of --eval (name or file).")] = None,
    calib_count: Annotated[int, typer.Option(min=1, help="Calibration images (sampled with a fixed seed).")] = 300,
    eval_count: Annotated[int, typer.Option(min=1, help="Evaluation images.")] = 100,
    method: Annotated[ExportCalibMethod, typer.Option(help="Activation range estimator.")] = ExportCalibMethod.percentile,
    percentile: Annotated[float, typer.Option(help="Percentile for --method percentile.")] = 99.99,
    ops: Annotated[QuantOps, typer.Option(help="conv: quantize convolutions only; all: every quantizable op.")] = QuantOps.conv,
    target_dice: Annotated[float, typer.Option(help="Goal: mean Dice vs the FP32 reference masks.")] = 0.98,
    target_min_dice: Annotated[float, typer.Option(help="Goal: no image below this Dice vs reference.")] = 0.90,
    max_keep: Annotated[int, typer.Option(min=0, help="Most module groups the search keeps in float.")] = 6,
    max_float_flops: Annotated[Optional[float], typer.Option(min=0.0, max=100.0, help="Budget: the search skips a group that would keep more than this % of the model's FLOPs in float (float work is what costs INT8 its speed). Default: no budget.")] = None,
    depth: Annotated[int, typer.Option(min=1, help="Group granularity: module path depth (2: decoder1.attention; 3-4: single convolutions such as decoder3.attention.out_conv.2).")] = 2,
    equalize: EqualizeOption = True,
    equalize_alpha: EqualizeAlphaOption = None,
    bias_correction: BiasCorrectionOption = None,
    qat_epochs: Annotated[int, typer.Option(min=0, help="Quantization-aware fine-tuning epochs instead of the search (0: off). Writes OUT/model_qat.safetensors and its INT8 Q/DQ ONNX and OpenVINO IR, judged against CHECKPOINT.")] = 0,
    qat_images: Annotated[Optional[int], typer.Option(min=1, help="QAT training images from --calib's split (default: all of them).")] = None,
    qat_lr: Annotated[float, typer.Option(min=0.0, help="QAT peak learning rate (Adam, cosine to 0).")] = 2e-5,
    qat_batch_size: Annotated[int, typer.Option(min=1)] = 4,
    qat_keep_float: Annotated[Optional[list[str]], typer.Option(help="Module kept in float during QAT and in its INT8 artifacts (repeatable; default none: every convolution INT8).")] = None,
    qat_dice_weight: Annotated[float, typer.Option(min=0.0, help="QAT: weight of a per-image soft-Dice term against the FP32 model's masks, added to the KL distillation (0: KL only).")] = 0.0,
) -> None:
    """INT8 sensitivity analysis and mixed-precision search; writes OUT/sensitivity.json.

    Quantizes one module group at a time (the rest in float) and ranks the groups by Dice drop
    against the FP32 reference, then keeps the most sensitive groups in float until the goal
    holds (within --max-float-flops of the model's work, when given). With --qat-epochs, fine-tunes through simulated INT8 instead (distillation from
    CHECKPOINT) and exports the result. Exit code 1 when the goal is not met.
    """
    from rich.console import Console

    from resunetpp.export.sensitivity import Goal, QuantizeOptions, quantize_checkpoint, recommendation_warning, render

    console = Console(stderr=True)
    opts = QuantizeOptions(checkpoint, calib, eval_, out, calib_split, eval_split, calib_count, eval_count,
                           method.value, percentile, ops.value, Goal(target_dice, target_min_dice), max_keep,
                           equalize_alpha=_equalize_alpha(equalize, equalize_alpha),
                           **_bias_correction(bias_correction), depth=depth,
                           max_float_share=None if max_float_flops is None else max_float_flops / 100.0)
    if qat_epochs:
        from resunetpp.export.qat import QATOptions, qat_and_export
        from resunetpp.export.report import print_summary

        qopts = QATOptions(epochs=qat_epochs, lr=qat_lr, batch_size=qat_batch_size, percentile=percentile,
                           method=method.value,
                           keep_modules=tuple(qat_keep_float or ()), dice_weight=qat_dice_weight)
        try:
            report = qat_and_export(opts, qopts, qat_images, log=lambda m: console.print(m, highlight=False))
        except ResUNetError as e:
            fail(e)
        print_summary(report, Console())
        goal = opts.goal
        failed = [a for a in report.artifacts if not goal.met(a.metrics)]
        verdict = "NOT met" if failed else "met"
        Console().print(f"goal (mean Dice vs {checkpoint.name} >= {goal.mean_dice:g}, no image below "
                        f"{goal.min_dice:g}) {verdict}; QAT checkpoint: {out / 'model_qat.safetensors'}")
        if failed:
            raise typer.Exit(1)
        return
    reuse_freed_memory()  # the search's PyTorch passes reuse freed tensors' pages
    try:
        if console.is_terminal:
            with console.status("quantize") as status:
                report = quantize_checkpoint(opts, progress=lambda m: status.update(m))
        else:  # a log file or a pipe: one line per step instead of a spinner nobody sees
            report = quantize_checkpoint(opts, progress=lambda m: typer.echo(m, err=True))
    except ResUNetError as e:
        fail(e)
    out_console = Console()
    for table in render(report):
        out_console.print(table)
    verdict = "met" if report.goal_met else "NOT met"
    kept = ", ".join(report.chosen) or "nothing"
    share = report.steps[-1].float_flops_share
    cost = "" if share is None else f" ({100 * share:.1f}% of the FLOPs)"
    out_console.print(f"goal {verdict}; keep in float: {kept}{cost}; report: {out / 'sensitivity.json'}")
    warning = recommendation_warning(report)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    if not report.goal_met:
        raise typer.Exit(1)


