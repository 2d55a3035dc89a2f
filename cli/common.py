"""What every command shares: the Typer app, the one-line error exit, choices from library tuples."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from typing import NoReturn, Optional

import typer

app = typer.Typer(
    name="resunetpp",
    help="ResUNet++ segmentation: train, evaluate, export (ONNX/OpenVINO/TensorRT), infer and benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
