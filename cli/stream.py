"""``stream``: segment a live source (camera, RTSP/HTTP/UDP URL, or a file played live)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from resunetpp import engines
from resunetpp.cli.common import app, choice_enum, engine_options as _engine_options, fail, sigterm_as_interrupt, \
    write_json_report
from resunetpp.engines.stream import DROP_POLICIES
from resunetpp.errors import ResUNetError

StreamBackend = choice_enum("StreamBackend", ("auto", *engines.backends()))
DropPolicy = choice_enum("DropPolicy", DROP_POLICIES)


def live_text(snapshot: dict) -> str:
    """The live line: FPS, latency p50 over the last frames, drops."""
    p50 = snapshot.get("latency_p50_ms")
    return (f"stream  {snapshot['fps']:5.1f} fps | latency p50 {'-' if p50 is None else f'{p50:.0f} ms'} | "
            f"dropped {snapshot['frames_dropped']} | frames {snapshot['frames_output']}/{snapshot['frames_decoded']} "
            f"| {snapshot['seconds']:.0f} s")


def summary_table(result, title: str):
    from rich.table import Table

    from resunetpp.engines.base import engine_line

    table = Table(title=f"{title}: {engine_line(result.engine)}", title_justify="left")
    for name in ("decoded", "inferred", "dropped", "fps", "latency p50", "latency p99", "source fps", "kept up"):
        table.add_column(name, justify="right")
    kept = {True: "yes", False: "no", None: "-"}[result.kept_up]
    ms = lambda v: "-" if v is None else f"{v:.0f} ms"  # noqa: E731
    table.add_row(str(result.frames_decoded), str(result.frames_inferred), str(result.frames_dropped),
                  f"{result.fps:.1f}", ms(result.latency_p50_ms), ms(result.latency_p99_ms),
                  "-" if result.source_fps is None else f"{result.source_fps:.3g}", kept)
    return table


@app.command("stream")
def stream_command(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="A camera index (0), an rtsp:// http:// udp:// URL, or a video file.")],
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint, .onnx, OpenVINO .xml or TensorRT .engine; 'default': the shipped model.")],
    backend: Annotated[StreamBackend, typer.Option(help="auto: from the model's suffix.")] = StreamBackend.auto,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N]; onnxruntime also tensorrt[:N]; openvino also gpu, npu.")] = "auto",
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", "-O", help="Backend option KEY=VALUE, repeatable (e.g. precision=f32).")] = None,
    realtime: Annotated[bool, typer.Option("--realtime", help="Play a file at its own frame rate, like a live source (else as fast as it decodes).")] = False,
    loop: Annotated[bool, typer.Option("--loop", help="Start a file again at its end (a demo that stays up; stop with Ctrl-C or --frames).")] = False,
    drop: Annotated[DropPolicy, typer.Option(help="latest: always infer the newest frame, drop (and count) the ones that waited; none: every frame, the decoder waits.")] = DropPolicy.latest,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the overlay video here (.mp4, .mkv ...; with --drop latest the inferred frames at their source times).")] = None,
    serve: Annotated[Optional[int], typer.Option("--serve", metavar="PORT", help="Serve an MJPEG page of the overlay at http://127.0.0.1:PORT/ (this machine only).")] = None,
    host: Annotated[str, typer.Option(help="Address --serve listens on; 0.0.0.0 shows the page to the network (unauthenticated).")] = "127.0.0.1",
    frames: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many decoded frames.")] = None,
    threshold: Annotated[float, typer.Option(help="Foreground threshold on the probability (one-class models).")] = 0.5,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the summary here (JSON).")] = None,
) -> None:
    """Segment a live source frame by frame: overlay file, MJPEG page, live FPS/latency/drops."""
    from rich.console import Console

    from resunetpp.defaults import resolve_model
    from resunetpp.engines.stream import StreamOptions, stream_source

    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    live = None
    if sys.stderr.isatty():
        from rich.live import Live
        from rich.text import Text

        live = Live(Text("stream: opening the source, loading the model"), console=err_console, refresh_per_second=2, transient=True)
    tick = (lambda snap: live.update(Text(live_text(snap)))) if live is not None else None
    try:
        model = str(resolve_model(model))
        options = StreamOptions(drop=drop.value, out=out, frames=frames, threshold=threshold)
        with sigterm_as_interrupt():
            if live is not None:
                live.start()
            try:
                result = stream_source(source, model, options, backend=backend.value, device=device,
                                       engine_options=_engine_options(engine_option or []), realtime=realtime,
                                       loop=loop, serve_port=serve, serve_host=host, on_tick=tick,
                                       on_ready=lambda line: err_console.print(line, markup=False),
                                       other_outputs=[json_path] if json_path is not None else [])
            finally:
                if live is not None:
                    live.stop()
        if json_path is not None:
            write_json_report(json_path, result.as_dict(), "summary")
    except ResUNetError as e:
        fail(e)
    except KeyboardInterrupt:  # before frames flowed (while loading); a running stream returns its summary
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    shown = result.source if "://" in result.source or result.source.startswith("camera ") else Path(result.source).name
    Console().print(summary_table(result, title=shown))
    if result.warning:
        typer.echo(f"warning: {result.warning}", err=True)
    if result.out:
        typer.echo(f"overlay video: {result.out} ({result.frames_output} frames)")
    if result.interrupted:
        typer.echo("stopped (Ctrl-C); everything inferred before it was written", err=True)
        raise typer.Exit(130)
