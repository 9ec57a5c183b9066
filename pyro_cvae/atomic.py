"""The one way this package writes a file: to a temporary file beside it, then a rename, so a
reader (or a run interrupted mid-write) never sees a half-written checkpoint, result or picture."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Callable

NAME_MAX = 255  # bytes in a file name, on the file systems in use


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


def read_regular_bytes(path: Path, size: int = -1) -> bytes | None:
    """The bytes of ``path`` (the first ``size``) if it is a regular file, else None: a FIFO or
    a device put in a run folder is never opened for reading (that would hang), and a missing
    file is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            return f.read(size)
        except OSError:
            return None


def read_regular_text(path: Path) -> str | None:
    """The text of ``path`` if it is a regular file (``read_regular_bytes``), else None."""
    data = read_regular_bytes(path)
    try:
        return None if data is None else data.decode()
    except UnicodeDecodeError:
        return None
