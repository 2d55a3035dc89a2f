"""One writer per output folder: an exclusive ``flock`` held for a whole run.

``resunetpp infer`` takes ``OUT/.infer.lock`` and ``resunetpp export`` ``OUT/.export.lock``, so two
runs into the same folder never mix their files: the second waits until the first is done, then
writes all of its own (every file of a folder comes from one run).

Semantics (those of the export's lock, which this module generalises):

* the lock file is created on acquire and removed on release;
* the lock dies with its process (a killed run blocks nothing: the kernel drops the ``flock``);
* a waiter that wakes on a lock file already removed (the holder released it) opens the new one
  instead, so two waiters never both believe they hold it;
* not POSIX (no ``fcntl``): no advisory locks, runs are not serialized (:attr:`OutLock.held` is False).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

INFER_LOCK_NAME = ".infer.lock"
EXPORT_LOCK_NAME = ".export.lock"


class OutLock:
    """An exclusive ``flock`` on ``folder/name``, taken when created (waiting if another run holds it).

    ``on_wait(message)`` is called once when the lock is busy, before waiting (e.g. to print
    "waiting for another infer into OUT to finish"); ``what`` names the run in that message.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, folder: str | Path, name: str, *, what: str = "run",
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.handle = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, runs are not serialized
            return
        waited = False
        while self.handle is None:
            handle = open(self.path, "a+b")  # noqa: SIM115 - held until close()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    if on_wait is not None:
                        on_wait(f"waiting for another {what} into {self.folder} to finish")
                    waited = True
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                except BaseException:  # Ctrl-C / SIGTERM while waiting
                    handle.close()
                    raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.handle = handle
            else:
                handle.close()

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (False where advisory locks do not exist)."""
        return self.handle is not None

    def close(self) -> None:
        """Release the lock and remove its file (idempotent)."""
        if self.handle is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "OutLock":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
