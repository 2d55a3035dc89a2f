"""The output folder of an export: no stale files left behind (the one-export-at-a-time lock is
core's :class:`resunetpp.locking.OutLock`, shared with ``infer``)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from resunetpp.locking import EXPORT_LOCK_NAME


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


#: One export into a folder at a time: :class:`resunetpp.locking.OutLock` on this file (the lock
#: ``infer`` takes on its ``--out`` too, under another name).
LOCK_NAME = EXPORT_LOCK_NAME


def remove_stale_work(out: Path) -> None:
    """Work folders left in ``out`` by a killed export (call holding the lock)."""
    for stale in out.glob(".export-work-*"):
        shutil.rmtree(stale, ignore_errors=True)


__all__ = ["LOCK_NAME", "remove_empty_folders", "remove_stale", "remove_stale_work"]
