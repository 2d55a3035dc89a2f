"""The ``resunetpp`` command line: a thin Typer layer over the library.

Each command parses options, calls one library function and turns
:class:`resunetpp.errors.ResUNetError` into a one-line message and exit code 1.
"""



from __future__ import annotations

if __name__ != "resunetpp.cli":  # the folder `cli/` installs as `resunetpp.cli`; never as a second, bare copy
    raise ImportError(f"import resunetpp.cli, not {__name__}: this folder is installed as resunetpp.cli "
                      "(pip install -e . or pip install resunetpp)")

import contextlib
import enum as _enum
import json as _json
import sys as _sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from resunetpp.errors import ResUNetError

app = typer.Typer(
    name="resunetpp",
    help="ResUNet++ segmentation: train, evaluate, export (ONNX/OpenVINO/TensorRT), infer and benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# ---- foundation: train / evaluate / info (issue 2) -----------------------------------------



class Architecture(str, _enum.Enum):
    resunetpp = "resunetpp"
    resunetpp_sigmoid_attention = "resunetpp-sigmoid-attention"


class Device(str, _enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _fail(error: BaseException) -> NoReturn:
    """One line on stderr, exit code 1: the CLI's answer to every user-facing problem."""
    typer.echo(f"error: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}",
               err=True)
    raise typer.Exit(1)


@app.command()
def train(
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder in the Kvasir-SEG layout (images/, masks/).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: last/best checkpoints, train_state.pt, history.json.")] = Path("runs/train"),
    train_split: Annotated[Optional[str], typer.Option(help="Split file or name (DATA/NAME.txt); default DATA/train.txt if present, else all images.")] = None,
    val_split: Annotated[Optional[str], typer.Option(help="Split file or name; default DATA/val.txt if present, else no validation.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs (default 100; on --resume, the interrupted run's).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    image_size: Annotated[int, typer.Option(min=8, help="Training resolution (square, a multiple of 8).")] = 256,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW, warmup + cosine).")] = 1e-3,
    device: Annotated[Optional[Device], typer.Option(help="auto picks cuda when torch sees a GPU (default auto).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and augmentation.")] = 0,
    num_classes: Annotated[int, typer.Option(min=1, help="1: binary (sigmoid); C >= 2: softmax over C classes.")] = 1,
    class_names: Annotated[Optional[str], typer.Option(help="Comma-separated, one per class (default 'polyp' for one class).")] = None,
    range_reg: Annotated[float, typer.Option(min=0.0, help="Weight of the activation-range penalty (0: off).")] = 0.0,
    range_tau: Annotated[float, typer.Option(min=0.0, help="Magnitude the range penalty starts at.")] = 8.0,
    time_budget_s: Annotated[Optional[float], typer.Option(min=0.0, help="Fit the number of epochs into this many seconds.")] = None,
    warmup_epochs: Annotated[int, typer.Option(min=0, help="Epochs of linear LR warm-up before the cosine decay.")] = 2,
    init_from: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Start from these weights (fine-tuning; a new schedule, not --resume). Recorded in the checkpoints' provenance.")] = None,
    architecture: Annotated[Architecture, typer.Option(help="resunetpp: the authors' model; resunetpp-sigmoid-attention: opt-in variant with a bounded attention gate.")] = Architecture.resunetpp,
) -> None:
    """Train ResUNet++ (Dice+BCE, or CE+Dice for several classes) and write checkpoints atomically."""
    from resunetpp.training import TrainConfig, default_splits, resume_config, train as run_training

    try:
        if resume:
            cfg = resume_config(out, epochs=epochs, time_budget_s=time_budget_s,
                                device=device.value if device else None)
        else:
            if data is None:
                raise ResUNetError("--data DIR is required (a folder with images/ and masks/), unless --resume")
            names = ([n.strip() for n in class_names.split(",") if n.strip()] if class_names
                     else ["polyp"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)])
            tsplit, vsplit = default_splits(data, train_split, val_split)
            cfg = TrainConfig(data=str(data), out=str(out), train_split=tsplit, val_split=vsplit,
                              epochs=epochs or 100, batch_size=batch_size, image_size=image_size, lr=lr,
                              device=device.value if device else "auto", seed=seed, num_classes=num_classes,
                              class_names=names, range_reg=range_reg, range_tau=range_tau,
                              time_budget_s=time_budget_s, warmup_epochs=warmup_epochs,
                              init_from=str(init_from) if init_from else None,
                              architecture=architecture.value)
        result = run_training(cfg, resume=resume)
    except (ResUNetError, FloatingPointError) as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; the last finished epoch is saved, continue with: resunetpp train --out {out} --resume",
                   err=True)
        raise typer.Exit(130) from None
    best = result["best_val_dice"]
    typer.echo(f"trained {result['epochs']} epochs; checkpoints in {out}"
               + (f" (best val Dice {best:.4f} -> best.safetensors)" if best >= 0 else " (no validation split)"))


@app.command()
def evaluate(
    model: Annotated[Optional[Path], typer.Argument(metavar="MODEL", help="Checkpoint to evaluate (default: the shipped model).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder in the Kvasir-SEG layout (default: the shipped sample data).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split file or name (DATA/NAME.txt); default every image.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the scores and per-image rows here (JSON).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    device: Annotated[Device, typer.Option(help="Where torch runs a checkpoint.")] = Device.auto,
) -> None:
    """Mean Dice, IoU, precision and recall, per image at the original mask resolution."""
    from rich.console import Console

    from resunetpp.atomic import write_json_atomic
    from resunetpp.defaults import default_data_path, default_model_path
    from resunetpp.evaluation import evaluate_path, results_table

    try:
        model = model or default_model_path()
        data = data or default_data_path()
        if model is None:
            raise ResUNetError("no MODEL given and this install ships no default model; pass a checkpoint, "
                               "e.g. resunetpp evaluate runs/train/best.safetensors --data DIR")
        if data is None:
            raise ResUNetError("no --data given and this install ships no sample data; pass --data DIR "
                               "(a folder with images/ and masks/)")
        result = evaluate_path(model, data, split, batch_size=batch_size, device=device.value,
                               show_progress=_sys.stderr.isatty())
        if json_path is not None:
            try:
                write_json_atomic(json_path, result.as_dict())
            except OSError as e:
                raise ResUNetError(f"{json_path}: cannot write the report ({e.strerror or e})") from None
    except ResUNetError as e:
        _fail(e)
    Console().print(results_table(result, title=f"{model.name} on {data}" + (f" ({split})" if split else "")))
    if json_path is not None:
        typer.echo(f"wrote {json_path}")


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Versions, available backends, CPU features, GPU, and the shipped default model."""
    from rich.console import Console

    from resunetpp.info import collect_info, info_tables

    data = collect_info()
    if as_json:
        typer.echo(_json.dumps(data, indent=2))
        return
    console = Console()
    for table in info_tables(data):
        console.print(table)


# ---- export (issue 3) ---------------------------------------------------------------------


class ExportFormat(str, _enum.Enum):
    onnx = "onnx"
    openvino = "openvino"
    tensorrt = "tensorrt"


class ExportPrecision(str, _enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class ExportCalibMethod(str, _enum.Enum):
    minmax = "minmax"
    percentile = "percentile"
    entropy = "entropy"
    mse = "mse"


class ExportNNCFPreset(str, _enum.Enum):
    performance = "performance"
    mixed = "mixed"


class ExportOpenVINOInt8(str, _enum.Enum):
    qdq = "qdq"
    nncf = "nncf"


class ExportTRTCalibrator(str, _enum.Enum):
    entropy = "entropy"


class ExportTRTFP16Mode(str, _enum.Enum):
    onnx = "onnx"
    flag = "flag"


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


@contextlib.contextmanager
def _export_sigterm_as_interrupt():
    """``kill`` (SIGTERM) unwinds like Ctrl-C, so temporary files are removed on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: INT8 range equalization options, shared by ``export`` and ``quantize``.
EqualizeOption = Annotated[bool, typer.Option(
    "--equalize/--no-equalize",
    help="INT8: equalize activation ranges across channels before calibration (cross-layer "
         "equalization; same FP32 function, checked).")]
EqualizeAlphaOption = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, help="INT8 equalization strength (SmoothQuant alpha): 1 gives every channel the "
                           "same range, 0 equalizes the weights instead; default: the recipe's.")]

BiasCorrectionOption = Annotated[Optional[int], typer.Option(
    min=0, help="INT8: bias correction over this many calibration images (each convolution's mean shift "
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
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False,
                                                    help="Folder for the artifacts and their .json sidecars.")],
    formats: Annotated[list[ExportFormat] | None, typer.Option(
        "--format", "-f", help="Repeatable. Default: every format this machine can build.")] = None,
    precisions: Annotated[list[ExportPrecision] | None, typer.Option(
        "--precision", "-p", help="Repeatable. Default: fp32, fp16, and int8 when --calib is given.")] = None,
    calib: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="Calibration images: a folder, or a dataset root (images/, masks/, "
                                           "train.txt) whose train split is used.")] = None,
    calib_split: Annotated[str | None, typer.Option(help="Split name or file for --calib.")] = None,
    calib_count: Annotated[int, typer.Option(min=1, help="Calibration images (sampled).")] = 300,
    eval_dir: Annotated[Path | None, typer.Option(
        "--eval", exists=True, file_okay=False, help="Held-out images for accuracy (default: the --calib "
                                                     "dataset's val split).")] = None,
    eval_split: Annotated[str | None, typer.Option(help="Split name or file for --eval.")] = None,
    eval_count: Annotated[int, typer.Option(min=1, help="Held-out images (sampled).")] = 100,
    batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size.")] = "dynamic",
    image_size: Annotated[str | None, typer.Option(
        help="S or HxW (multiples of 8); default: the checkpoint's preprocessing size.")] = None,
    dynamic_size: Annotated[bool, typer.Option(
        "--dynamic-size/--static-size", help="Dynamic input height and width.")] = True,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer).")] = 18,
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="onnxslim pass.")] = True,
    allow_accuracy_drop: Annotated[bool, typer.Option(
        help="Write artifacts that fail their accuracy gate (INT8/FP16 Dice vs the FP32 reference).")] = False,
    calib_method: Annotated[ExportCalibMethod, typer.Option(
        help="INT8 Q/DQ ONNX activation ranges.")] = ExportCalibMethod.percentile,
    per_channel: Annotated[bool, typer.Option(
        "--per-channel/--per-tensor", help="INT8 weight scales per output channel.")] = True,
    keep_float: Annotated[list[str] | None, typer.Option(
        help="Repeatable module path kept in float in INT8 artifacts, e.g. decoder1.attention, head "
             "(default: the 10 convolutions export.quantize.DEFAULT_INT8_KEEP_MODULES lists, 7.7% of the "
             "FLOPs: those that buy the most accuracy per unit of float work, benchmarks/INT8.md section 11; "
             "'none': keep nothing).")] = None,
    int8_ops: Annotated[str, typer.Option(
        help="INT8: 'conv' quantizes convolutions only (default), 'all' every quantizable op.")] = "conv",
    int8_outputs: Annotated[bool, typer.Option(
        "--int8-outputs/--no-int8-outputs",
        help="Also quantize each INT8 convolution's output (ONNX Runtime's default; off: inputs and weights "
             "only, as NNCF and TensorRT place them, measurably closer to FP32).")] = False,
    equalize: EqualizeOption = True,
    equalize_alpha: EqualizeAlphaOption = None,
    bias_correction: BiasCorrectionOption = None,
    openvino_int8: Annotated[ExportOpenVINOInt8, typer.Option(
        help="OpenVINO INT8 IR: 'qdq' converts the INT8 Q/DQ ONNX (same scales as ONNX Runtime/TensorRT), "
             "'nncf' quantizes the IR with NNCF.")] = ExportOpenVINOInt8.qdq,
    nncf_preset: Annotated[ExportNNCFPreset, typer.Option(
        help="NNCF preset for the OpenVINO INT8 IR (--openvino-int8 nncf).")] = ExportNNCFPreset.performance,
    fast_bias_correction: Annotated[bool, typer.Option(
        "--fast-bias-correction/--full-bias-correction", help="NNCF bias correction.")] = True,
    workspace: Annotated[int, typer.Option(min=1, help="TensorRT workspace limit, MiB.")] = 2048,
    max_batch: Annotated[int, typer.Option(min=1, help="TensorRT profile max batch.")] = 8,
    dla_core: Annotated[int | None, typer.Option(min=0, help="Build TensorRT engines for this DLA core "
                                                                    "(Jetson).")] = None,
    calibrator: Annotated[ExportTRTCalibrator | None, typer.Option(
        help="TensorRT 10 only: implicit INT8 with IInt8EntropyCalibrator2 instead of the Q/DQ ONNX.")] = None,
    trt_fp16: Annotated[ExportTRTFP16Mode, typer.Option(
        help="TensorRT 10 only: 'flag' builds FP16 with BuilderFlag.FP16 from the FP32 ONNX.")] = ExportTRTFP16Mode.onnx,
    int8_reference: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False,
        help="Judge INT8 artifacts against this FP32 checkpoint instead of CHECKPOINT (e.g. the model a "
             "`quantize --qat-epochs` checkpoint was fine-tuned from).")] = None,
) -> None:
    """Export a checkpoint to ONNX, OpenVINO IR and TensorRT, each artifact verified against PyTorch."""
    from rich.console import Console

    from resunetpp.export.fp16 import FP16Recipe
    from resunetpp.export.pipeline import ExportOptions, TensorRTOptions, run_export
    from resunetpp.export.quantize import NNCFRecipe, QDQRecipe
    from resunetpp.export.report import RichReporter, print_summary
    from resunetpp.errors import ResUNetError as _ExportError

    from resunetpp.export.quantize import DEFAULT_INT8_KEEP_MODULES

    if int8_ops not in ("conv", "all"):
        _fail(ResUNetError(f"--int8-ops must be 'conv' or 'all', got {int8_ops!r}"))
    keep = DEFAULT_INT8_KEEP_MODULES if keep_float is None else tuple(k for k in keep_float if k.lower() != "none")
    conv_only = int8_ops == "conv"
    try:
        options = ExportOptions(
            checkpoint=checkpoint, out=out,
            formats=tuple(f.value for f in formats) if formats else None,
            precisions=tuple(p.value for p in precisions) if precisions else None,
            calib=calib, calib_split=calib_split, calib_count=calib_count,
            eval=eval_dir, eval_split=eval_split, eval_count=eval_count,
            batch=_export_batch(batch), image_size=_export_size(image_size), dynamic_size=dynamic_size,
            opset=opset, simplify=simplify, allow_accuracy_drop=allow_accuracy_drop,
            qdq=QDQRecipe(method=calib_method.value, per_channel=per_channel, keep_modules=keep, conv_only=conv_only,
                          quantize_outputs=int8_outputs, equalize_alpha=_equalize_alpha(equalize, equalize_alpha),
                          **_bias_correction(bias_correction)),
            openvino_int8=openvino_int8.value,
            nncf=NNCFRecipe(preset=nncf_preset.value, fast_bias_correction=fast_bias_correction, keep_modules=keep,
                            conv_only=conv_only),
            fp16=FP16Recipe(),
            tensorrt=TensorRTOptions(workspace_mib=workspace, dla_core=dla_core, max_batch=max_batch,
                                     calibrator=calibrator.value if calibrator else None, fp16_mode=trt_fp16.value),
            reference=int8_reference,
        )
        with _export_sigterm_as_interrupt(), RichReporter(Console(stderr=True)) as reporter:
            report = run_export(options, reporter)
        print_summary(report, Console())
        report.raise_for_gate()
    except _ExportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: temporary files are gone, finished artifacts kept
        typer.echo("interrupted; artifacts finished before the interrupt are kept, nothing half-written",
                   err=True)
        raise typer.Exit(130) from None


# ---- engines: infer (issue 4) -------------------------------------------------------------


class InferBackend(str, _enum.Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    tensorrt = "tensorrt"


class InferProbsDtype(str, _enum.Enum):
    float16 = "float16"
    float32 = "float32"


def _infer_option_value(text: str) -> object:
    """``KEY=VALUE`` values: true/false, integers, floats, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _infer_engine_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ResUNetError(f"--engine-option {pair!r}: expected KEY=VALUE, e.g. precision=f32")
        options[key.strip().replace("-", "_")] = _infer_option_value(value.strip())
    return options


def _infer_progress(console):
    """``progress_factory`` for :func:`resunetpp.inference.infer_path`: a rich bar with images/s."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} img/s" if task.speed else "- img/s", style="progress.data.speed")

    def factory(total: int):
        bar = Progress(TextColumn("infer"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                       console=console, transient=True)
        bar.start()
        task = bar.add_task("infer", total=total)
        return (lambda n: bar.advance(task, n)), bar.stop

    return factory


@app.command("infer")
def infer_command(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint, .onnx, OpenVINO .xml or TensorRT .engine; 'default': the shipped model.")],
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Image files, folders or quoted globs ('scans/**/*.png').")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <stem>_mask.png (and overlays, probabilities).")],
    backend: Annotated[InferBackend, typer.Option(help="auto: from the model's suffix.")] = InferBackend.auto,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N]; onnxruntime also tensorrt[:N]; openvino also gpu, npu.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call (equal input sizes are batched).")] = 1,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write <stem>_overlay.png (fill and contour over the image).")] = False,
    save_probs: Annotated[bool, typer.Option("--save-probs", help="Also write <stem>_probs.npy (K, H, W) at the original size.")] = False,
    probs_dtype: Annotated[InferProbsDtype, typer.Option(help="dtype of the saved probabilities.")] = InferProbsDtype.float16,
    tta: Annotated[bool, typer.Option("--tta", help="Average the predictions of the image and its horizontal and vertical flips.")] = False,
    threshold: Annotated[float, typer.Option(help="Foreground threshold on the probability (one-class models).")] = 0.5,
    threads: Annotated[int, typer.Option(min=1, help="Threads decoding/preprocessing (and as many writing) alongside inference.")] = 2,
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", "-O", help="Backend option KEY=VALUE, repeatable (e.g. precision=f32, channels_last=true, intra_op_num_threads=4).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the run summary and failures here (JSON).")] = None,
) -> None:
    """Segment images with any engine; write masks at the original resolution."""
    from rich.console import Console

    from resunetpp.atomic import write_json_atomic
    from resunetpp.defaults import default_model_path
    from resunetpp.inference import InferOptions, infer_path, summary_table

    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    show_bar = _sys.stderr.isatty()

    def report(line: str) -> None:
        if show_bar:
            err_console.print(f"error: {line}", markup=False)
        else:
            typer.echo(f"error: {line}", err=True)

    try:
        if model == "default":
            shipped = default_model_path()
            if shipped is None:
                raise ResUNetError("MODEL 'default': this install ships no default model; pass a model file")
            model = str(shipped)
        options = InferOptions(out=out, batch_size=batch_size, overlay=overlay, save_probs=save_probs,
                               probs_dtype=probs_dtype.value, tta=tta, threshold=threshold, threads=threads)
        result = infer_path(model, inputs, options, backend=backend.value, device=device,
                            engine_options=_infer_engine_options(engine_option or []),
                            progress_factory=_infer_progress(err_console) if show_bar else None, on_error=report)
        if json_path is not None:
            try:
                write_json_atomic(json_path, result.as_dict())
            except OSError as e:
                raise ResUNetError(f"{json_path}: cannot write the summary ({e.strerror or e})") from None
    except ResUNetError as e:
        _fail(e)
    Console().print(summary_table(result, title=Path(model).name))
    if result.failures:
        typer.echo(f"{len(result.failures)} of {result.images} image(s) failed; the others are in {out}", err=True)
        raise typer.Exit(1)

# ---- bench (issue 6) ----------------------------------------------------------------------


class BenchDevice(str, _enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _bench_list(values: Optional[list[str]], choices: tuple[str, ...], option: str) -> tuple[str, ...] | None:
    """Repeatable and/or comma-separated choices (``--backends torch,openvino``); ``None``: all."""
    if not values:
        return None
    items = tuple(dict.fromkeys(v.strip().lower() for value in values for v in value.split(",") if v.strip()))
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise typer.BadParameter(f"unknown {', '.join(map(repr, bad)) or 'empty value'} (choose from "
                                 f"{', '.join(choices)})", param_hint=option)
    return items


def _bench_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"expected positive integers separated by commas (e.g. 1,8), got {text!r}",
                                 param_hint="--batch-sizes")
    return sizes


@app.command("bench")
def bench_command(
    model: Annotated[Optional[Path], typer.Argument(
        metavar="MODEL", exists=True, dir_okay=False,
        help="Checkpoint to benchmark (default: the shipped model, with the shipped sample images).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False, help="Evaluation images: a folder, or a dataset root (images/, masks/) "
                                           "(default: the shipped sample images).")] = None,
    split: Annotated[Optional[str], typer.Option(
        help="Split file or name of --data (default DATA/val.txt if present, else every image).")] = None,
    backends: Annotated[Optional[list[str]], typer.Option(
        metavar="NAMES", help="Comma-separated or repeated: torch, onnxruntime, openvino, tensorrt (default: all).")] = None,
    precisions: Annotated[Optional[list[str]], typer.Option(
        metavar="NAMES", help="Comma-separated or repeated: fp32, bf16, fp16, int8 (default: all).")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes to time.")] = "1,8",
    image_size: Annotated[Optional[int], typer.Option(
        min=8, help="Network input side (a multiple of 8; default: the checkpoint's).")] = None,
    warmup_s: Annotated[float, typer.Option(min=0.0, help="Warm-up seconds before each timing.")] = 1.0,
    duration_s: Annotated[float, typer.Option(min=0.001, help="Seconds each timing window lasts.")] = 3.0,
    threads: Annotated[Optional[int], typer.Option(
        min=1, help="Threads for torch, ONNX Runtime and OpenVINO (default: each runtime's own).")] = None,
    device: Annotated[BenchDevice, typer.Option(
        help="Where torch (and ONNX Runtime with CUDA) run; OpenVINO runs on the CPU, TensorRT on CUDA.")]
    = BenchDevice.auto,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", dir_okay=False, help="Write the environment and every row here (JSON).")] = None,
    markdown: Annotated[Optional[Path], typer.Option(
        dir_okay=False, help="Write a Markdown report here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        dir_okay=False, help="Write an accuracy-vs-throughput chart here (PNG).")] = None,
    max_dice_drop: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="Exit 1 when a row's Dice drop against the reference (1 - Dice vs the "
                               "reference mask) exceeds this, or a row fails (default: no gate).")] = None,
    artifacts: Annotated[Optional[Path], typer.Option(
        file_okay=False, help="Export into / reuse this folder (default: ~/.cache/resunetpp/artifacts/<key>/, "
                              "key = checkpoint hash + options).")] = None,
    calib: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False, help="INT8 calibration images (a folder, or a dataset root whose train "
                                           "split is used); must not overlap the evaluation images.")] = None,
    end_to_end: Annotated[bool, typer.Option(
        "--end-to-end/--no-end-to-end", help="Also time the infer pipeline (decode to PNG) per row.")] = True,
) -> None:
    """Every backend and precision this machine runs: accuracy against PyTorch FP32 and speed, side by side."""
    from rich.console import Console

    from resunetpp.bench.harness import BACKENDS, PRECISIONS, BenchOptions, gate_failures, run_bench
    from resunetpp.bench.report import LineReporter, print_report, write_json, write_markdown, write_plot
    from resunetpp.export.report import RichReporter

    options = BenchOptions(
        model=model, data=data, split=split, backends=_bench_list(backends, BACKENDS, "--backends"),
        precisions=_bench_list(precisions, PRECISIONS, "--precisions"), batch_sizes=_bench_batch_sizes(batch_sizes),
        image_size=image_size, warmup_s=warmup_s, duration_s=duration_s, threads=threads, device=device.value,
        artifacts=artifacts, calib=calib, end_to_end=end_to_end)
    try:
        progress = RichReporter(Console(stderr=True)) if _sys.stderr.isatty() \
            else LineReporter(lambda line: typer.echo(line, err=True))
        with progress as reporter:
            result = run_bench(options, reporter)
        print_report(result, Console())
        for path, write in ((json_path, write_json), (markdown, write_markdown), (plot, write_plot)):
            if path is not None:
                write(result, path)
                typer.echo(f"wrote {path}")
    except ResUNetError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo("interrupted; exported artifacts are kept (each written atomically) and reused next time",
                   err=True)
        raise typer.Exit(130) from None
    if max_dice_drop is not None:
        failing = gate_failures(result.rows, max_dice_drop)
        if failing:
            typer.echo(f"error: {len(failing)} row(s) fail --max-dice-drop {max_dice_drop:g}: " + "; ".join(failing),
                       err=True)
            raise typer.Exit(1)


# ---- quantize (issue 8) -------------------------------------------------------------------
class QuantOps(str, _enum.Enum):
    conv = "conv"
    all = "all"


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

    from resunetpp.export.sensitivity import Goal, QuantizeOptions, quantize_checkpoint, render

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
            _fail(e)
        print_summary(report, Console())
        goal = opts.goal
        failed = [a for a in report.artifacts if not goal.met(a.metrics)]
        verdict = "NOT met" if failed else "met"
        Console().print(f"goal (mean Dice vs {checkpoint.name} >= {goal.mean_dice:g}, no image below "
                        f"{goal.min_dice:g}) {verdict}; QAT checkpoint: {out / 'model_qat.safetensors'}")
        if failed:
            raise typer.Exit(1)
        return
    try:
        with console.status("quantize") as status:
            report = quantize_checkpoint(opts, progress=lambda m: status.update(m))
    except ResUNetError as e:
        _fail(e)
    out_console = Console()
    for table in render(report):
        out_console.print(table)
    verdict = "met" if report.goal_met else "NOT met"
    kept = ", ".join(report.chosen) or "nothing"
    share = report.steps[-1].float_flops_share
    cost = "" if share is None else f" ({100 * share:.1f}% of the FLOPs)"
    out_console.print(f"goal {verdict}; keep in float: {kept}{cost}; report: {out / 'sensitivity.json'}")
    if not report.goal_met:
        raise typer.Exit(1)



def main() -> None:
    app()


if __name__ == "__main__":
    main()
