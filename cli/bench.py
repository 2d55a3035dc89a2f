"""``bench``: accuracy against PyTorch FP32 and speed of every backend and precision."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from resunetpp.cli.common import app, choice_enum, comma_list, fail, sigterm_as_interrupt
from resunetpp.bench import matrix as harness  # the row choices, without the harness's imports
from resunetpp.defaults import TORCH_DEVICES
from resunetpp.errors import ResUNetError

BenchDevice = choice_enum("BenchDevice", TORCH_DEVICES)


def _bench_image_sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes:
        raise typer.BadParameter(f"expected sizes separated by commas (e.g. 256 or 160,192,224,256,320), got {text!r}",
                                 param_hint="--image-size")
    return sizes


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
    models: Annotated[Optional[list[Path]], typer.Argument(
        metavar="MODEL...", exists=True, dir_okay=False,
        help="A checkpoint: exported to every format and precision, then benchmarked (default: the shipped "
             "model). Or model files as they are (.onnx, .xml, .engine, checkpoints), compared with each other "
             "and with the reference (--reference, else the first checkpoint given, else the first FP32 file).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False, help="Evaluation images: a folder, or a dataset root (images/, masks/) "
                                           "(default: the shipped sample images).")] = None,
    split: Annotated[Optional[str], typer.Option(
        help="Split file or name of --data (default DATA/val.txt if present, else every image).")] = None,
    backends: Annotated[Optional[list[str]], typer.Option(
        metavar="NAMES", help=f"Comma-separated or repeated: {', '.join(harness.backends())} (default: all).")] = None,
    precisions: Annotated[Optional[list[str]], typer.Option(
        metavar="NAMES", help=f"Comma-separated or repeated: {', '.join(harness.precisions())} (default: all).")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes to time.")] = "1,8",
    image_size: Annotated[Optional[str], typer.Option(
        metavar="S[,S...]", help="Network input side (a multiple of 8, at most 4096; default: the checkpoint's). "
                                 "Several (e.g. 160,192,224,256,320): a sweep -- every row at each size on artifacts "
                                 "exported once, with Dice vs ground truth and vs the reference at the checkpoint's "
                                 "own size, and the accuracy/speed curve in --plot.")] = None,
    warmup_s: Annotated[float, typer.Option(min=0.0, help="Warm-up seconds before each timing (at most 3600).")] = 1.0,
    duration_s: Annotated[float, typer.Option(min=0.001, help="Seconds each timing window lasts (at most 3600).")] = 3.0,
    threads: Annotated[Optional[int], typer.Option(
        help="Threads for torch, ONNX Runtime and OpenVINO (at least 1; default: each runtime's own).")] = None,
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
    video: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, metavar="CLIP",
        help="Also run infer's video pipeline on this clip per row: end-to-end FPS, glass-to-glass latency "
             "p50/p99, share of the model-only rate, per-frame Dice vs torch FP32, keeps up with its frame rate.")]
    = None,
    reference: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="With model files: measure accuracy and speed-up against this "
                                          "checkpoint or artifact (default: the first checkpoint given, else the "
                                          "first FP32 file).")] = None,
) -> None:
    """Every backend and precision this machine runs: accuracy against PyTorch FP32 and speed, side by side."""
    from rich.console import Console

    from resunetpp.bench.harness import BenchOptions, gate_failures, run_bench
    from resunetpp.bench.report import LineReporter, print_report, write_json, write_markdown, write_plot
    from resunetpp.export.report import RichReporter

    from resunetpp.bench.harness import is_checkpoint, run_bench_files

    models = list(models or [])
    sizes = _bench_image_sizes(image_size)
    try:
        files_mode = len(models) > 1 or reference is not None or (models and not is_checkpoint(models[0]))
    except ResUNetError as e:
        fail(e)
    options = BenchOptions(
        model=None if files_mode or not models else models[0], data=data, split=split, backends=comma_list(backends, harness.backends(), "--backends"),
        precisions=comma_list(precisions, harness.precisions(), "--precisions"), batch_sizes=_bench_batch_sizes(batch_sizes),
        image_size=sizes[0] if sizes and len(sizes) == 1 else None,
        image_sizes=sizes if sizes and len(sizes) > 1 else None, video=video, warmup_s=warmup_s, duration_s=duration_s, threads=threads, device=device.value,
        artifacts=artifacts, calib=calib, end_to_end=end_to_end)
    try:
        progress = RichReporter(Console(stderr=True)) if sys.stderr.isatty() \
            else LineReporter(lambda line: typer.echo(line, err=True))
        with sigterm_as_interrupt(), progress as reporter:
            result = run_bench_files(models, options, reporter, reference) if files_mode \
                else run_bench(options, reporter)
        print_report(result, Console())
        for path, write in ((json_path, write_json), (markdown, write_markdown), (plot, write_plot)):
            if path is not None:
                write(result, path)
                typer.echo(f"wrote {path}")
    except ResUNetError as e:
        fail(e)
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


