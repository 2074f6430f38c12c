"""Atomic, durable file writing: output appears complete under its final name or not at all, and survives a crash.

A file is written to ``.<name>.<pid>.<random>.tmp`` beside its final name, flushed to disk (fsync), renamed onto
the final name, and the folder is flushed too. A failed write removes its temporary file; a killed process cannot,
so ``remove_temporaries`` removes them the next time a run or prepare writes there.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fewshot_sla.io_errors import write_error

_TEMPORARY = re.compile(r"^\.(.+)\.\d+\.[A-Za-z0-9_]+\.tmp$")


def _current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's (or folder's) content to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the file itself was flushed
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def _make_folder(folder: Path, created: list[Path]) -> None:
    """Create ``folder`` and its missing parents, adding each one made to ``created`` (deepest first)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
        created.insert(0, made)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; flush and rename it onto ``path`` only if the block succeeds.
    A failed write (the block's or the rename's) is an ``IOFailure`` naming ``path``; it leaves nothing behind:
    neither the temporary file nor the folders made for it (when still empty)."""
    final = Path(path)
    tmp = None
    created: list[Path] = []
    done = False
    try:
        _make_folder(final.parent, created)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual permissions
        fsync_path(tmp)
        os.replace(tmp, final)
        done = True
        fsync_path(final.parent)
    except OSError as err:
        raise write_error(err, final) from None
    finally:
        if tmp is not None and not done:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if not done:
            for folder in created:
                with contextlib.suppress(OSError):  # not empty: another writer's
                    folder.rmdir()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_temporaries(folder: str | os.PathLike[str], name: str | None = None, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that failed or killed writers left in ``folder`` (those of final name ``name``
    only, when given); returns them. The caller must hold the lock of what it cleans (see ``locks``), so that
    no live writer's temporary file is among them."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for path in root.rglob("*.tmp") if recursive else root.glob("*.tmp"):
        match = _TEMPORARY.match(path.name)
        if match and (name is None or match.group(1) == name):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
