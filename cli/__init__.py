"""The ``resunetpp`` command line: a thin Typer layer over the library.

Each command parses options, calls one library function and turns
:class:`resunetpp.errors.ResUNetError` into a one-line message and exit code 1. One module per
command group (``train``, ``export``, ``infer``, ``stream``, ``bench``, ``quantize``); their choices come from
the library's tuples and registries (:func:`resunetpp.cli.common.choice_enum`), never from copies.
"""

from __future__ import annotations

if __name__ != "resunetpp.cli":  # the folder `cli/` installs as `resunetpp.cli`; never as a second, bare copy
    raise ImportError(f"import resunetpp.cli, not {__name__}: this folder is installed as resunetpp.cli "
                      "(pip install -e . or pip install resunetpp)")

# Each module registers its commands on import; this order is the order ``--help`` lists them in.
from resunetpp.cli import train  # noqa: E402,F401,I001
from resunetpp.cli import export  # noqa: E402,F401
from resunetpp.cli import infer  # noqa: E402,F401
from resunetpp.cli import stream  # noqa: E402,F401
from resunetpp.cli import bench  # noqa: E402,F401
from resunetpp.cli import quantize  # noqa: E402,F401
from resunetpp.cli.common import app  # noqa: E402

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
