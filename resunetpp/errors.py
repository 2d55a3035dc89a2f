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


class RecordFieldError(ValueError):
    """A field of a metadata record (a checkpoint's or an artifact's) that is missing, of the wrong
    type or out of range; callers name the file: ``InputFileError(path, f"field {field}: {problem}")``."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field {field}: {problem}" if field else problem)

    def within(self, parent: str) -> "RecordFieldError":
        """The same problem, its field named from the record's top (``preprocessing.std``)."""
        return RecordFieldError(f"{parent}.{self.field}" if self.field else parent, self.problem)


class CheckpointError(InputFileError):
    """A checkpoint that is not one, or does not fit the architecture."""


class OutputWriteError(InputFileError, OSError):
    """An output that cannot be written (disk full, read-only, permission): ``<path>: <problem>``.

    Also an :class:`OSError` (``errno``/``strerror`` of the cause), so code that handles a failed
    write as an ``OSError`` keeps working.
    """

    def __init__(self, path: str | Path, problem: str, errno: int | None = None, strerror: str | None = None) -> None:
        InputFileError.__init__(self, path, problem)
        self.errno = errno
        self.strerror = strerror
        self.filename = str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"
