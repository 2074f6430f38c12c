"""One writer at a time: an exclusive lock on a run folder while ``run`` or ``eval`` writes it, and on a dataset
store while it is prepared.

A lock is an ``fcntl`` lock on a small file (``.<name>.lock`` beside what it guards), so it goes away with the
process that held it: a killed process never leaves a stale lock. The file records who holds it, so that a
second writer is told whom to wait for, and it is removed on release. Where ``fcntl`` is missing (Windows) there
is no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from fewshot_sla.errors import UserError
from fewshot_sla.io_errors import io_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


def lock_path(target: Path) -> Path:
    """The lock file of ``target`` (a folder or a file): ``.<name>.lock`` beside it."""
    return target.parent / f".{target.name}.lock"


def _created_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created (deepest first)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _acquire(path: Path, wait: bool, created: list[Path]) -> int | None:
    """A descriptor of ``path`` holding its lock, or None when another process holds it (and ``wait`` is off).
    The lock is only good if ``path`` still names the locked file (a releasing holder removes it, and the folders
    it made for it); the folders made here are added to ``created``."""
    for attempt in range(100):
        created += _created_parents(path.parent)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a releasing holder removed the folder just made again: make it once more
            if attempt == 99:
                raise
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as we locked it: lock the new one
    raise FileNotFoundError(errno.ENOENT, "the lock file kept disappearing", str(path))


def _holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str, fix: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock ``lock_file`` while the block runs. When another process holds it, wait for it (``wait``),
    or raise a UserError: ``<what> is being written by <holder>; <fix>``."""
    if fcntl is None:
        yield
        return
    lock_file = Path(lock_file)
    created: list[Path] = []
    try:
        fd = _acquire(lock_file, wait, created)
    except OSError as err:
        _remove_empty(created)
        raise io_error(err, lock_file, f"create the lock file for {what}") from None
    if fd is None:
        _remove_empty(created)
        raise UserError(f"{what} is being written by {_holder(lock_file)}; {fix}")
    try:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {stamp} ({command})".encode(), 0)
        except OSError as err:  # a full disk: the holder's name needs a block
            raise io_error(err, lock_file, "write the lock file") from None
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()
        os.close(fd)  # releases the lock
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders made for a lock file that nothing else was put in (deepest first)."""
    for folder in sorted(set(folders), key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
