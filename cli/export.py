"""``export``: a checkpoint to verified ONNX, OpenVINO and TensorRT artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from resunetpp.cli.common import app, choice_enum, comma_list, fail, fail_os
from resunetpp.errors import ResUNetError
from resunetpp.memory import reuse_freed_memory
from resunetpp.cli.common import ignore_further_interrupts, sigterm_as_interrupt
from resunetpp.export.formats import PRECISIONS, declared_names
from resunetpp.export.options import OPENVINO_INT8_SOURCES
from resunetpp.export.quantize import CALIBRATION_METHODS, INT8_OPS, NNCF_PRESETS
from resunetpp.export.tensorrt_plan import CALIBRATORS, FP16_MODES

ExportCalibMethod = choice_enum("ExportCalibMethod", CALIBRATION_METHODS)
ExportNNCFPreset = choice_enum("ExportNNCFPreset", NNCF_PRESETS)
ExportOpenVINOInt8 = choice_enum("ExportOpenVINOInt8", OPENVINO_INT8_SOURCES)
ExportTRTCalibrator = choice_enum("ExportTRTCalibrator", CALIBRATORS)
ExportTRTFP16Mode = choice_enum("ExportTRTFP16Mode", FP16_MODES)


def _export_batch(value: str) -> int | None:
    if value.strip().lower() == "dynamic":
        return None
    try:
        n = int(value)
    except ValueError:
        raise typer.BadParameter(f"expected 'dynamic' or a positive integer, got {value!r}") from None
    if n < 1:
        raise typer.BadParameter(f"expected 'dynamic' or a positive integer, got {value!r}")
    return n


def _export_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"expected S or HxW (e.g. 256 or 256x320), got {value!r}") from None
    if len(hw) not in (1, 2):
        raise typer.BadParameter(f"expected S or HxW (e.g. 256 or 256x320), got {value!r}")
    return (hw[0], hw[0]) if len(hw) == 1 else (hw[0], hw[1])




#: INT8 range equalization options, shared by ``export`` and ``quantize``.
EqualizeOption = Annotated[bool, typer.Option(
    "--equalize/--no-equalize", rich_help_panel="INT8 recipe",
    help="INT8: equalize activation ranges across channels before calibration (cross-layer "
         "equalization; same FP32 function, checked).")]
EqualizeAlphaOption = Annotated[Optional[float], typer.Option(
    rich_help_panel="INT8 recipe", min=0.0, max=1.0, help="INT8 equalization strength (SmoothQuant alpha): 1 gives every channel the "
                           "same range, 0 equalizes the weights instead; default: the recipe's.")]

BiasCorrectionOption = Annotated[Optional[int], typer.Option(
    rich_help_panel="INT8 recipe", min=0, help="INT8: bias correction over this many calibration images (each convolution's mean shift "
                "under simulated INT8 removed from its bias); 0: off; default: the recipe's.")]


def _bias_correction(images: int | None) -> dict:
    return {} if images is None else {"bias_correction_images": images}


def _equalize_alpha(equalize: bool, alpha: float | None) -> float | None:
    """``--equalize/--no-equalize`` and ``--equalize-alpha`` as one recipe value (None: off)."""
    from resunetpp.export.quantize import DEFAULT_EQUALIZE_ALPHA

    if not equalize:
        return None
    return DEFAULT_EQUALIZE_ALPHA if alpha is None else alpha


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                             help="Trained checkpoint (.safetensors, .pt).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", rich_help_panel="Output", file_okay=False,
                                                    help="Folder for the artifacts and their .json sidecars.")],
    formats: Annotated[list[str] | None, typer.Option(
        "--format", "-f", metavar="NAMES", rich_help_panel="Output",
        help=f"Comma-separated or repeated: {', '.join(declared_names())}. Default: every format this machine can build, except opt-in packagings (triton: a Triton "
             "model repository of the other formats' verified artifacts).")] = None,
    precisions: Annotated[list[str] | None, typer.Option(
        "--precision", "-p", metavar="NAMES", rich_help_panel="Output",
        help=f"Comma-separated or repeated: {', '.join(PRECISIONS)}. Default: fp32, fp16, and int8 when --calib is "
             "given.")] = None,
    calib: Annotated[Path | None, typer.Option(
        rich_help_panel="Data",
        exists=True, file_okay=False, help="Calibration images: a folder, or a dataset root (images/, masks/, "
                                           "train.txt) whose train split is used.")] = None,
    calib_split: Annotated[str | None, typer.Option(
        rich_help_panel="Data", help="Split name or file for --calib.")] = None,
    calib_count: Annotated[int, typer.Option(
        rich_help_panel="Data", min=1, help="Calibration images (sampled).")] = 300,
    eval_dir: Annotated[Path | None, typer.Option(
        "--eval", rich_help_panel="Data", exists=True, file_okay=False, help="Held-out images for accuracy (default: the --calib "
                                                     "dataset's val split).")] = None,
    eval_split: Annotated[str | None, typer.Option(
        rich_help_panel="Data", help="Split name or file for --eval.")] = None,
    eval_count: Annotated[int, typer.Option(
        rich_help_panel="Data", min=1, help="Held-out images (sampled).")] = 100,
    batch: Annotated[str, typer.Option(
        rich_help_panel="Shape and graph", help="'dynamic' or a fixed batch size.")] = "dynamic",
    image_size: Annotated[str | None, typer.Option(
        rich_help_panel="Shape and graph",
        help="S or HxW (multiples of 8); default: the checkpoint's preprocessing size.")] = None,
    dynamic_size: Annotated[bool, typer.Option(
        "--dynamic-size/--static-size", rich_help_panel="Shape and graph", help="Dynamic input height and width.")] = True,
    opset: Annotated[int, typer.Option(
        rich_help_panel="Shape and graph", help="ONNX opset (18 or newer).")] = 18,
    simplify: Annotated[bool, typer.Option(
        "--simplify/--no-simplify", rich_help_panel="Shape and graph", help="onnxslim pass.")] = True,
    allow_accuracy_drop: Annotated[bool, typer.Option(
        rich_help_panel="Accuracy gate", show_default=False,
        help="Write artifacts that fail their accuracy gate (INT8/FP16 Dice vs the FP32 reference). "
             "Default: refuse them.")] = False,
    int8_max_disagreement: Annotated[float | None, typer.Option(
        rich_help_panel="Accuracy gate", min=0.0, max=100.0, metavar="PERCENT",
        help="INT8 gate: the largest share of any held-out image's pixels (percent) on which the INT8 "
             "and FP32 masks may differ (default 2: resunetpp.export.verify.INT8_MAX_DISAGREEMENT).")] = None,
    int8_min_image_dice: Annotated[float | None, typer.Option(
        rich_help_panel="Accuracy gate", min=0.0, max=1.0, metavar="DICE",
        help="INT8 gate: no held-out image's Dice vs the FP32 mask below this (default 0.9: "
             "resunetpp.export.verify.INT8_MIN_IMAGE_DICE). Dice explodes on small polyps; the other "
             "limits still apply.")] = None,
    calib_method: Annotated[ExportCalibMethod, typer.Option(
        rich_help_panel="INT8 recipe", metavar="METHOD",
        help=f"INT8 Q/DQ ONNX activation ranges: {', '.join(CALIBRATION_METHODS)}.")] = ExportCalibMethod.percentile,
    per_channel: Annotated[bool, typer.Option(
        "--per-channel/--per-tensor", rich_help_panel="INT8 recipe", help="INT8 weight scales per output channel.")] = True,
    keep_float: Annotated[list[str] | None, typer.Option(
        rich_help_panel="INT8 recipe", metavar="MODULE",
        help="Repeatable module path kept in float in INT8 artifacts, e.g. decoder1.attention, head "
             "(default: the 10 convolutions in DEFAULT_INT8_KEEP_MODULES of export/quantize.py, 7.7% of the "
             "FLOPs: those that buy the most accuracy per unit of float work, section 11 of benchmarks/INT8.md; "
             "'none': keep nothing).")] = None,
    int8_ops: Annotated[str, typer.Option(
        rich_help_panel="INT8 recipe",
        help="INT8: 'conv' quantizes convolutions only (default), 'all' every quantizable op.")] = "conv",
    int8_outputs: Annotated[bool, typer.Option(
        "--int8-outputs/--no-int8-outputs",
        rich_help_panel="INT8 recipe", show_default=False,
        help="Also quantize each INT8 convolution's output (ONNX Runtime's default; off, the default here: inputs "
             "and weights only, as NNCF and TensorRT place them, measurably closer to FP32).")] = False,
    equalize: EqualizeOption = True,
    equalize_alpha: EqualizeAlphaOption = None,
    bias_correction: BiasCorrectionOption = None,
    openvino_int8: Annotated[ExportOpenVINOInt8, typer.Option(
        rich_help_panel="OpenVINO",
        help="OpenVINO INT8 IR: 'qdq' converts the INT8 Q/DQ ONNX (same scales as ONNX Runtime/TensorRT), "
             "'nncf' quantizes the IR with NNCF.")] = ExportOpenVINOInt8.qdq,
    nncf_preset: Annotated[ExportNNCFPreset, typer.Option(
        rich_help_panel="OpenVINO", metavar="PRESET",
        help=f"NNCF preset for the OpenVINO INT8 IR (--openvino-int8 nncf): {', '.join(NNCF_PRESETS)}.")] = ExportNNCFPreset.performance,
    fast_bias_correction: Annotated[bool, typer.Option(
        "--fast-bias-correction/--full-bias-correction", rich_help_panel="OpenVINO", show_default=False,
        help="NNCF bias correction (default: fast).")] = True,
    workspace: Annotated[int, typer.Option(
        rich_help_panel="TensorRT", min=1, help="TensorRT workspace limit, MiB.")] = 2048,
    max_batch: Annotated[int, typer.Option(
        rich_help_panel="TensorRT", min=1, help="TensorRT profile max batch.")] = 8,
    dla_core: Annotated[int | None, typer.Option(
        rich_help_panel="TensorRT", min=0, help="Build TensorRT engines for this DLA core "
                                                                    "(Jetson).")] = None,
    calibrator: Annotated[ExportTRTCalibrator | None, typer.Option(
        rich_help_panel="TensorRT",
        help="TensorRT 10 only: implicit INT8 with IInt8EntropyCalibrator2 instead of the Q/DQ ONNX.")] = None,
    trt_fp16: Annotated[ExportTRTFP16Mode, typer.Option(
        rich_help_panel="TensorRT",
        help="TensorRT 10 only: 'flag' builds FP16 with BuilderFlag.FP16 from the FP32 ONNX.")] = ExportTRTFP16Mode.onnx,
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", rich_help_panel="INT8 recipe", show_default=False,
        help="Reuse calibration statistics and reference outputs from an earlier export of the same checkpoint "
             "and images ($RESUNETPP_CACHE_DIR, else $XDG_CACHE_HOME/resunetpp or ~/.cache/resunetpp; default: "
             "on). --no-cache recomputes everything and stores nothing.")] = True,
    int8_reference: Annotated[Optional[Path], typer.Option(
        rich_help_panel="Data",
        exists=True, dir_okay=False,
        help="Judge INT8 artifacts against this FP32 checkpoint instead of CHECKPOINT (e.g. the model a "
             "`quantize --qat-epochs` checkpoint was fine-tuned from).")] = None,
) -> None:
    """Export a checkpoint to ONNX, OpenVINO IR and TensorRT, each artifact verified against PyTorch."""
    from rich.console import Console

    from resunetpp.export.fp16 import FP16Recipe
    from resunetpp.export.formats import format_names
    from resunetpp.export.pipeline import ExportOptions, TensorRTOptions, run_export
    from resunetpp.export.quantize import NNCFRecipe, QDQRecipe
    from resunetpp.export.report import RichReporter, print_summary
    from resunetpp.errors import ResUNetError as _ExportError

    from resunetpp.export.quantize import DEFAULT_INT8_KEEP_MODULES

    if int8_ops not in INT8_OPS:
        fail(ResUNetError(f"--int8-ops must be {' or '.join(map(repr, INT8_OPS))}, got {int8_ops!r}"))
    keep = DEFAULT_INT8_KEEP_MODULES if keep_float is None else tuple(k for k in keep_float if k.lower() != "none")
    conv_only = int8_ops == "conv"
    try:
        options = ExportOptions(
            checkpoint=checkpoint, out=out,
            formats=comma_list(formats, format_names(), "--format"),
            precisions=comma_list(precisions, PRECISIONS, "--precision"),
            calib=calib, calib_split=calib_split, calib_count=calib_count,
            eval=eval_dir, eval_split=eval_split, eval_count=eval_count,
            batch=_export_batch(batch), image_size=_export_size(image_size), dynamic_size=dynamic_size,
            opset=opset, simplify=simplify, allow_accuracy_drop=allow_accuracy_drop,
            int8_max_disagreement=None if int8_max_disagreement is None else int8_max_disagreement / 100.0,
            int8_min_image_dice=int8_min_image_dice,
            qdq=QDQRecipe(method=calib_method.value, per_channel=per_channel, keep_modules=keep, conv_only=conv_only,
                          quantize_outputs=int8_outputs, equalize_alpha=_equalize_alpha(equalize, equalize_alpha),
                          **_bias_correction(bias_correction)),
            openvino_int8=openvino_int8.value,
            nncf=NNCFRecipe(preset=nncf_preset.value, fast_bias_correction=fast_bias_correction, keep_modules=keep,
                            conv_only=conv_only),
            fp16=FP16Recipe(),
            tensorrt=TensorRTOptions(workspace_mib=workspace, dla_core=dla_core, max_batch=max_batch,
                                     calibrator=calibrator.value if calibrator else None, fp16_mode=trt_fp16.value),
            reference=int8_reference, cache=cache,
        )
        reuse_freed_memory()  # PyTorch's passes reuse freed tensors' pages instead of faulting in new ones
        with sigterm_as_interrupt(), RichReporter(Console(stderr=True)) as reporter:
            report = run_export(options, reporter)
        print_summary(report, Console())
        report.raise_for_gate()
    except _ExportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except OSError as e:  # a runtime's own writer (disk full: OSError 28) -- one line, not a traceback
        fail_os(e, out)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: temporary files are gone, finished artifacts kept
        ignore_further_interrupts()
        typer.echo("interrupted; artifacts finished before the interrupt are kept, nothing half-written",
                   err=True)
        raise typer.Exit(130) from None


