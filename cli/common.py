"""What every command shares: the Typer app, the one-line error exit, choices from library tuples."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

app = typer.Typer(
    name="resunetpp",
    help="ResUNet++ segmentation: train, evaluate, export (ONNX/OpenVINO/TensorRT), infer and benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _whole_flag_names() -> None:
    """Help at 80 columns keeps flag names whole: in Typer's option panels the columns holding flags
    do not wrap, so rich narrows the help text column instead of cutting ``--no-allow-accur...``."""
    import typer.rich_utils as rich_utils
    from rich.table import Table

    if getattr(rich_utils.Table, "whole_flags", False):
        return

    class OptionsTable(Table):
        whole_flags = True

        def add_row(self, *renderables, **kwargs):  # type: ignore[override]
            super().add_row(*renderables, **kwargs)
            if not self.show_header:
                for column, cell in zip(self.columns, renderables):
                    if str(cell).startswith("-"):
                        column.no_wrap = True
                self.columns[-1].overflow = "fold"  # a long path in the help breaks, never ends in ...

    rich_utils.Table = OptionsTable


_whole_flag_names()


def _version(value: bool) -> None:
    if value:
        from resunetpp._version import __version__

        typer.echo(f"resunetpp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """ResUNet++ segmentation: train, evaluate, export (ONNX/OpenVINO/TensorRT), infer and benchmark."""


def next_run_folder(parent: Path) -> Path:
    """The first ``parent/N`` (N = 1, 2, ...) above every numbered folder already there: a new run's
    own folder (``runs/infer/1``, ``runs/infer/2`` ...); not created here."""
    taken = [int(p.name) for p in parent.iterdir() if p.name.isdigit()] if parent.is_dir() else []
    return parent / str(max(taken, default=0) + 1)


def choice_enum(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A ``str`` enum for Typer's choices, made from a library tuple or registry (never copied by hand)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def fail(error: BaseException) -> NoReturn:
    """One line on stderr, exit code 1: the CLI's answer to every user-facing problem."""
    typer.echo(f"error: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}",
               err=True)
    raise typer.Exit(1)


def fail_os(error: OSError, where: object = None) -> NoReturn:
    """:func:`fail` for an :class:`OSError` a library let through (disk full in a runtime's own
    writer): ``error: <file>: <reason>``, never a traceback."""
    path = error.filename or where
    text = str(error).strip()
    reason = error.strerror or (text.splitlines()[0] if text else type(error).__name__)
    fail(RuntimeError(f"{path}: {reason}" if path else reason))


def comma_list(values: Optional[list[str]], choices: tuple[str, ...], option: str) -> tuple[str, ...] | None:
    """Repeatable and/or comma-separated choices (``--backends torch,openvino``); ``None``: all."""
    if not values:
        return None
    items = tuple(dict.fromkeys(v.strip().lower() for value in values for v in value.split(",") if v.strip()))
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise typer.BadParameter(f"unknown {', '.join(map(repr, bad)) or 'empty value'} (choose from "
                                 f"{', '.join(choices)})", param_hint=option)
    return items


def _option_value(text: str) -> object:
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


def engine_options(pairs: list[str]) -> dict:
    """``-O KEY=VALUE`` pairs (``infer``, ``evaluate``) as a backend's engine options."""
    from resunetpp.errors import ResUNetError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ResUNetError(f"--engine-option {pair!r}: expected KEY=VALUE, e.g. precision=f32")
        options[key.strip().replace("-", "_")] = _option_value(value.strip())
    return options


@contextlib.contextmanager
def sigterm_as_interrupt():
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


def ignore_further_interrupts() -> None:
    """Ctrl-C / SIGTERM ignored from here on, in the main thread: called once an interrupt has been
    cleaned up, so that a second one while the command prints its line and exits cannot end it by
    the signal instead of with exit status 130."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def write_json_report(path, data: dict, what: str = "report") -> None:
    """``--json PATH``: ``data`` written atomically, or one line naming the file (a ResUNetError)."""
    from resunetpp.atomic import write_json_atomic
    from resunetpp.errors import ResUNetError

    try:
        write_json_atomic(path, data)
    except OSError as e:
        raise ResUNetError(f"{path}: cannot write the {what} ({e.strerror or e})") from None
