"""The ``resunetpp`` command line: a thin Typer layer over the library.

Each command parses options, calls one library function and turns
:class:`resunetpp.errors.ResUNetError` into a one-line message and exit code 1.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="resunetpp",
    help="ResUNet++ segmentation: train, evaluate, export (ONNX/OpenVINO/TensorRT), infer and benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# ---- foundation: train / evaluate / info (issue 2) -----------------------------------------

# ---- export (issue 3) ---------------------------------------------------------------------

# ---- engines: infer (issue 4) -------------------------------------------------------------

# ---- bench (issue 6) ----------------------------------------------------------------------

# ---- quantize (issue 8) -------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
