"""The lock of a run directory: which process trains it. ``train.lock`` holds the trainer's pid,
marked ``flock`` where the trainer also holds an exclusive ``flock`` on the file, which the
system drops when the process dies however it dies.
"""

from __future__ import annotations

import errno
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .atomic import read_regular_text

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK = "train.lock"
LOCK_MARK = " flock"  # after the pid: the writer holds a flock on the file
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # .NAME.tmpPID, as atomic_write names them


class LockError(RuntimeError):
    """The folder is held by a live process, or its lock cannot be read; the message says what
    to do."""


@contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process while the block runs; a LockError names a live holder.
    The folder is made here and removed again on the way out if the block left nothing in it
    (with the folders made for it). A marked lock whose flock is free is stale (its pid may live again in
    another program), and it is taken over atomically: the new lock file is flocked before
    it replaces the old one, so two processes never both train a run. An unmarked lock
    (written where flock is missing, or by an older version) is held while its pid lives;
    taking over such a lock when two processes race for it is not atomic."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        try:
            held = _acquire(folder)
        except BaseException:  # a signal right after the lock appeared: it must not stay
            if _read_lock(folder / LOCK)[0] == os.getpid():
                (folder / LOCK).unlink(missing_ok=True)
            raise
        try:
            remove_stale_temporaries(folder)
            yield
        finally:
            try:
                (folder / LOCK).unlink(missing_ok=True)  # while still flocked
            finally:
                if held is not None:
                    os.close(held)
    finally:
        for path in made:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty (or not ours to remove): keep it
                break


def _acquire(folder: Path) -> int | None:
    """Take the lock; the flocked descriptor to keep until the run is released (None where
    the file system has no flock)."""
    lock = folder / LOCK
    mine = folder / f".{LOCK}.tmp{os.getpid()}"
    fd = None
    try:
        fd = _new_lock_file(mine)
        for attempt in range(5):
            try:
                os.link(mine, lock)  # atomic, and the lock is never seen without its pid
                return fd
            except FileExistsError:
                if _take_over_if_stale(folder, lock, mine):
                    return fd
                # it changed under us, or is being taken over: look again
                time.sleep(0.05 * attempt)
        raise LockError(f"{folder} is being locked by another process; run this command again.")
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    finally:
        mine.unlink(missing_ok=True)


def _take_over_if_stale(folder: Path, lock: Path, mine: Path) -> bool:
    """Replace ``lock`` by ``mine`` if its holder is gone; LockError naming the holder if it
    lives; False if the lock changed meanwhile (the caller looks again)."""
    holder, marked = _read_lock(lock)
    if not marked or fcntl is None:  # no flock to ask: the pid alone says whether the holder lives
        if holder is not None and pid_alive(holder):
            raise LockError(_held_message(folder, holder))
        lock.unlink(missing_ok=True)
        return False
    try:
        old = os.open(lock, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not hang
    except FileNotFoundError:
        return False
    except OSError as e:
        raise LockError(
            f"cannot read the lock {lock} ({e.strerror}); if no process trains {folder}, "
            f"remove that file and run this command again."
        ) from None
    try:
        try:
            fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if holder is not None and pid_alive(holder):
                raise LockError(_held_message(folder, holder)) from None
            return False  # a dead holder's file, flocked by a process taking it over: look again
        try:
            if not os.path.samestat(os.fstat(old), os.stat(lock)):
                return False  # replaced since we opened it
        except FileNotFoundError:
            return False
        os.replace(mine, lock)  # left by a process that died: ours now, flocked before it appears
        return True
    finally:
        os.close(old)


def _new_lock_file(path: Path) -> int | None:
    """Write a lock file naming this process at ``path`` and flock it; the descriptor holding
    the flock, or None (and a file without the ``flock`` mark) where flock is unavailable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        flocked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
                flocked = True
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        os.write(fd, f"{os.getpid()}{LOCK_MARK if flocked else ''}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    if not flocked:
        os.close(fd)
        return None
    return fd


def _held_message(path: Path, holder: int | None) -> str:
    who = f"process {holder}" if holder is not None else "another process"
    stop = f" (or stop it: kill {holder})" if holder is not None else ""
    return (
        f"{path} is being trained by {who}; wait for it to finish{stop} and run this command again."
    )


def _read_lock(lock: Path) -> tuple[int | None, bool]:
    """The pid a lock file names (None if unreadable) and whether it is marked as flocked."""
    text = read_regular_text(lock)
    if text is None:
        return None, False
    words = text.split()
    holder = int(words[0]) if words and words[0].isdigit() else None
    return holder, text.strip().endswith(LOCK_MARK.strip())


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
