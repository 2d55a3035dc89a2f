"""The output folder of an export: one export at a time (a lock), no stale files left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from resunetpp.export.report import Reporter


def remove_stale(files: list[Path]) -> None:
    """A refused artifact must not leave an earlier export's file under its name: ``files`` (the
    artifact, then the files beside it) and the artifact's sidecar."""
    from resunetpp.artifact import sidecar_path

    for p in (*files, sidecar_path(files[0])):
        if p.is_file():
            p.unlink()


def remove_empty_folders(out: Path, folders: list[str]) -> None:
    """Remove the ``folders`` of ``out`` (relative) this export left empty."""
    for sub in folders:
        with contextlib.suppress(OSError):
            (out / sub).rmdir()  # only succeeds when empty


LOCK_NAME = ".export.lock"


class OutLock:
    """An exclusive ``flock`` on ``out/.export.lock`` for one export; the file is removed on release.

    A second export into the same folder waits for the first, so an artifact and its sidecar (an
    IR's ``.xml`` and ``.bin``) always come from the same export and no export removes a folder
    another is writing into. The lock dies with its process (a killed export blocks nothing); a
    waiter that wakes on a lock file already removed takes the new one instead.
    """

    def __init__(self, out: Path, reporter: Reporter) -> None:
        self.path = out / LOCK_NAME
        self.handle = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, exports are not serialized
            return
        waited = False
        while self.handle is None:
            handle = open(self.path, "a+b")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    reporter.info(f"waiting for another export into {out} to finish")
                    waited = True
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.handle = handle
            else:
                handle.close()

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.handle.close()
            self.handle = None


def remove_stale_work(out: Path) -> None:
    """Work folders left in ``out`` by a killed export (call holding the lock)."""
    for stale in out.glob(".export-work-*"):
        shutil.rmtree(stale, ignore_errors=True)


__all__ = ["LOCK_NAME", "OutLock", "remove_empty_folders", "remove_stale", "remove_stale_work"]
