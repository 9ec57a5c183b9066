"""The one way this package writes a file: to a temporary file beside it, then a rename, so a
reader (or a run interrupted mid-write) never sees a half-written checkpoint, result or picture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path in the same folder, then rename it to ``path``.
    A symbolic link is written through: its target is replaced, the link stays."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
