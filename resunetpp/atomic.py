"""Write files under a temporary name in the same folder, then rename: never half-written.

Also what every command does with its output folder before writing: create it with a one-line
error (:func:`make_output_folder`) and sweep the temporaries a killed run left there
(:func:`clean_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from resunetpp.errors import InputFileError, OutputWriteError

#: A temporary without its writer's pid (older versions) is stale after this many seconds; one
#: whose writer is known is stale as soon as that process is gone (or after STALE_PID_AGE_S,
#: in case the pid was reused).
STALE_AGE_S = 3600.0
STALE_PID_AGE_S = 24 * 3600.0
#: ``.<name>.<pid>-<8 random chars><suffixes>.partial``: an atomic write's temporary (a file, or a
#: folder staged the same way); ``.tmpXXXXXX``: safetensors' own temporary (its Rust writer).
_PARTIAL = re.compile(r"^\..+\.partial$")
_PID = re.compile(r"\.(\d+)-[a-z0-9_]{8}")
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
#: Errors of a write that fails for lack of room or permission (not a missing input read inside it).
WRITE_ERRNOS = frozenset(getattr(errno_codes, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                                           "EFBIG") if hasattr(errno_codes, n))


def write_problem(error: OSError) -> str:
    """``cannot write (No space left on device)``: the one-line reason of a failed write."""
    return f"cannot write ({error.strerror or type(error).__name__})"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path``
    is left as it was. The temporary name starts with ``.`` and ends with ``.partial`` (and holds
    the writer's pid, for :func:`clean_stale_temporaries`) so a killed process leaves nothing under
    a final name. An :class:`OSError` of the write or the rename (disk full, read-only folder)
    is raised as :class:`~resunetpp.errors.OutputWriteError` naming ``path``.
    """
    path = Path(path)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f"{sfx}.partial", dir=path.parent)
    except OSError as e:
        raise OutputWriteError(path, write_problem(e), e.errno, e.strerror) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and not isinstance(e, OutputWriteError) \
                and (e.errno in WRITE_ERRNOS or e.filename in (None, str(tmp_path), str(path))):
            raise OutputWriteError(path, write_problem(e), e.errno, e.strerror) from None
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---- output folders -----------------------------------------------------------------------------------
def make_output_folder(folder: str | Path, option: str = "--out") -> Path:
    """Create ``folder`` (and its parents) for a command's outputs, or raise one line naming it.

    Refused, as :class:`~resunetpp.errors.InputFileError`: a file, a dangling symbolic link, a
    symbolic link loop, a path under a file, a folder that cannot be created (read-only place,
    no permission) or that is not writable.
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        try:
            folder.stat()
        except OSError as e:
            if e.errno == errno_codes.ELOOP:
                raise InputFileError(folder, f"{option} is a symbolic link loop") from None
        raise InputFileError(folder, f"{option} is a symbolic link to a missing target "
                                     f"({os.readlink(folder)})") from None
    if folder.exists() and not folder.is_dir():
        raise InputFileError(folder, f"{option} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputFileError(folder, f"{option} exists and is not a folder") from None
    except NotADirectoryError:
        raise InputFileError(folder, f"cannot create the {option} folder: a part of its path is a file") from None
    except OSError as e:
        reason = "a symbolic link loop" if e.errno == errno_codes.ELOOP else (e.strerror or type(e).__name__)
        raise InputFileError(folder, f"cannot create the {option} folder ({reason})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputFileError(folder, f"cannot write into the {option} folder (Permission denied)")
    return folder


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError, ValueError):
        return True  # exists (another user's), or cannot be asked: keep its files
    return True


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary of this toolkit's writers that nobody will finish.

    Only our own names: ``.*.partial`` (:func:`atomic_path`; an export's staged OpenVINO folder)
    and safetensors' ``.tmpXXXXXX``. Stale when the writer's pid (in the name) is no longer
    running, or when older than :data:`STALE_AGE_S` where the name holds no pid
    (:data:`STALE_PID_AGE_S` where it does, in case the pid was reused).
    """
    name = path.name
    ours = _PARTIAL.match(name) is not None
    if not ours and _SAFETENSORS_TMP.match(name) is None:
        return False
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    pids = _PID.findall(name) if ours else []
    if pids:
        return not _pid_alive(int(pids[-1])) or age > STALE_PID_AGE_S
    return age > STALE_AGE_S


def clean_stale_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the stale temporaries (:func:`is_stale_temporary`) in ``folder``; returns them.

    Called by ``infer`` (holding its ``--out`` lock) and ``train`` as they start; ``recursive``
    also sweeps sub-folders (an export's ``openvino/`` and ``tensorrt/``). Nothing else is touched.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        if is_stale_temporary(p, now):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError:
                continue
            removed.append(p)
        elif recursive and p.is_dir() and not p.is_symlink():
            removed += clean_stale_temporaries(p, recursive=True)
    return removed
