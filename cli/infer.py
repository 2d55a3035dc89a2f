"""``infer``: segment images and video files with any engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from resunetpp.cli.common import app, choice_enum, engine_options as _infer_engine_options, fail, next_run_folder, \
    sigterm_as_interrupt, write_json_report
from resunetpp.errors import ResUNetError
from resunetpp import engines
from resunetpp.engines.infer import PROBS_DTYPES

InferBackend = choice_enum("InferBackend", ("auto", *engines.backends()))
InferProbsDtype = choice_enum("InferProbsDtype", PROBS_DTYPES)


def _infer_progress(console):
    """``progress_factory`` for :func:`resunetpp.engines.infer.infer_path`: a rich bar with images/s."""
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
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Image files, folders or quoted globs ('scans/**/*.png'); or video files (.mp4, .mkv, .avi, .mov, .webm ...): <stem>_overlay.mp4 and <stem>_frames.json each.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for <stem>_mask.png (and overlays, probabilities) [default: a new runs/infer/N].")] = None,
    backend: Annotated[InferBackend, typer.Option(help="auto: from the model's suffix.")] = InferBackend.auto,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N]; onnxruntime also tensorrt[:N]; openvino also gpu, npu.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per engine call (equal input sizes are batched).")] = 1,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write <stem>_overlay.png (fill and contour over the image).")] = False,
    save_probs: Annotated[bool, typer.Option("--save-probs", help="Also write <stem>_probs.npy (K, H, W) at the original size.")] = False,
    probs_dtype: Annotated[InferProbsDtype, typer.Option(help="dtype of the saved probabilities.")] = InferProbsDtype.float16,
    save_masks: Annotated[bool, typer.Option("--save-masks", help="Videos: also write <stem>_masks/000000.png ... (one mask per frame, named by frame index). Images always get <stem>_mask.png, so it changes nothing for them.")] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average the predictions of the image and its horizontal and vertical flips.")] = False,
    threshold: Annotated[float, typer.Option(help="Foreground threshold on the probability (one-class models).")] = 0.5,
    threads: Annotated[int, typer.Option(help="Threads decoding/preprocessing (and as many writing) alongside inference.")] = 2,
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", "-O", help="Backend option KEY=VALUE, repeatable (e.g. precision=f32, channels_last=true, intra_op_num_threads=4).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the run summary and failures here (JSON).")] = None,
    input_warnings: Annotated[bool, typer.Option("--input-warnings/--no-input-warnings", help="Warn once when an image is grayscale or tiny (the model was trained on RGB colonoscopy frames).")] = True,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", rich_help_panel="Ray cluster", help="Run on Ray: 'local' (a Ray on this machine), 'auto' (this node's cluster or RAY_ADDRESS), 'ray://HOST:10001' or HOST:PORT. Outputs already complete are skipped (a rerun resumes). Needs resunetpp[ray].")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, rich_help_panel="Ray cluster", help="With --ray: worker actors, one engine each [default: 2].")] = None,
    threads_per_worker: Annotated[Optional[int], typer.Option(min=1, rich_help_panel="Ray cluster", help="With --ray: CPUs each worker reserves and its engine's compute threads [default: 1].")] = None,
) -> None:
    """Segment images with any engine; write masks at the original resolution."""
    from rich.console import Console

    from resunetpp.defaults import resolve_model
    from resunetpp.engines.infer import InferOptions, infer_path, summary_table

    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    show_bar = sys.stderr.isatty()

    def warn(line: str) -> None:
        if show_bar:
            err_console.print(f"warning: {line}", markup=False)
        else:
            typer.echo(f"warning: {line}", err=True)

    def report(line: str) -> None:
        if show_bar:
            err_console.print(f"error: {line}", markup=False)
        else:
            typer.echo(f"error: {line}", err=True)

    numbered = out is None
    if numbered:
        out = next_run_folder(Path("runs") / "infer")
        typer.echo(f"writing to {out}", err=True)
    try:
        model = str(resolve_model(model))
        options = InferOptions(out=out, batch_size=batch_size, overlay=overlay, save_probs=save_probs,
                               probs_dtype=probs_dtype.value, tta=tta, save_masks=save_masks, threshold=threshold,
                               threads=threads, input_warnings=input_warnings)
        progress = _infer_progress(err_console) if show_bar else None
        table = summary_table
        engine_options = _infer_engine_options(engine_option or [])
        with sigterm_as_interrupt():
            if ray is None:
                if workers is not None or threads_per_worker is not None:
                    raise ResUNetError("--workers and --threads-per-worker need --ray ADDRESS (e.g. --ray local)")
                result = infer_path(model, inputs, options, backend=backend.value, device=device,
                                    engine_options=engine_options, progress_factory=progress, on_error=report,
                                    on_wait=lambda line: typer.echo(line, err=True),
                                    other_outputs=[json_path] if json_path is not None else [],
                                    on_warning=warn)
            else:
                from resunetpp.video import is_video_path

                if any(is_video_path(i) for i in inputs):
                    raise ResUNetError("--ray runs image files; run videos without --ray")
                from resunetpp.engines.ray_batch import RayOptions, run_ray_batch, summary_table as ray_table

                table = ray_table
                ray_options = RayOptions(address=ray, workers=workers or 2, threads_per_worker=threads_per_worker or 1)
                result = run_ray_batch(model, inputs, options, ray_options, backend=backend.value, device=device,
                                       engine_options=engine_options, progress_factory=progress, on_error=report,
                                       on_wait=lambda line: typer.echo(line, err=True))
        if json_path is not None:
            write_json_report(json_path, result.as_dict(), "summary")
    except ResUNetError as e:
        fail(e)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: finished masks are kept, nothing half-written
        typer.echo(f"interrupted; masks finished before the interrupt are in {out}, nothing half-written", err=True)
        raise typer.Exit(130) from None
    Console().print(table(result, title=Path(model).name))
    if numbered:
        typer.echo(f"results in {out}")
    videos = getattr(result, "videos", None)
    if videos is not None:
        for v in videos:
            if v["overlay"]:
                typer.echo(f"{v['source']}: {v['frames']} frames -> {v['overlay']} ({v['fps']:.1f} fps end to end)")
    if result.failures:
        if videos is not None:
            typer.echo(f"{len(result.failures)} of {len(videos)} video(s) had a problem; the frames that decoded "
                       f"are in {out}", err=True)
        else:
            typer.echo(f"{len(result.failures)} of {result.images} image(s) failed; the others are in {out}", err=True)
        raise typer.Exit(1)

