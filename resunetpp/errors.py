"""Errors that the CLI turns into one-line messages and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class ResUNetError(Exception):
    """Base class: a user-facing problem with a file or an argument (no traceback shown)."""


class InputFileError(ResUNetError):
    """A file that cannot be used: ``<path>: <problem>``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CheckpointError(InputFileError):
    """A checkpoint that is not one, or does not fit the architecture."""
