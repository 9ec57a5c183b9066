"""The one way this package writes a file: to a temporary file beside it, then a rename, so a
reader (or a run interrupted mid-write) never sees a half-written checkpoint, result or picture."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

NAME_MAX = 255  # bytes in a file name, on the file systems in use
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # .NAME.tmpPID


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path in the same folder, then rename it to ``path``.
    A symbolic link is written through: its target is replaced, the link stays."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    tmp = path.with_name(_temporary_name(path.name))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _temporary_name(name: str) -> str:
    """``.NAME.tmpPID``, NAME shortened (and told apart by a hash) where that would pass the
    file system's 255 bytes for a name."""
    suffix = f".tmp{os.getpid()}"
    if len(f".{name}{suffix}".encode()) <= NAME_MAX:
        return f".{name}{suffix}"
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    keep = name.encode()[: NAME_MAX - len(suffix) - len(digest) - 2].decode(errors="ignore")
    return f".{keep}-{digest}{suffix}"


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine has this id."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files that writers killed mid-write (``kill -9``) left in ``folder``."""
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _TEMPORARY.match(path.name)
        if match and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
