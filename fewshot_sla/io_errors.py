"""Failures of the file system, HDF5 and serialisation as one-line ``UserError``s: which file, what went wrong,
what to do. Used where the suite reads and writes, and by the CLI as its last line of defence."""

from __future__ import annotations

import errno as errnos
import os
import re
from pathlib import Path

from fewshot_sla.errors import UserError

# errno -> (what happened, what to do)
_KINDS = {
    errnos.ENOSPC: ("no space is left on the device", "free some space (or write elsewhere)"),
    errnos.EDQUOT: ("the disk quota is exceeded", "free some space (or write elsewhere)"),
    errnos.EROFS: ("the file system is read-only", "choose a writable folder"),
    errnos.EACCES: ("permission is denied", "choose a folder you may write to, or fix its permissions"),
    errnos.EPERM: ("the operation is not permitted", "choose a folder you may write to, or fix its permissions"),
    errnos.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path"),
    errnos.EISDIR: ("it is a folder, not a file", "give the path of a file"),
    errnos.ENOENT: ("it does not exist", "check the path"),
    errnos.EEXIST: ("it already exists", "remove it or choose another path"),
    errnos.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errnos.EIO: ("the device reported an input/output error", "check the disk"),
    errnos.EMFILE: ("too many files are open", "close other programs or raise the open-file limit (ulimit -n)"),
}
# HDF5 and torch put the errno, or the C library's message, into their own text.
_IN_TEXT = [
    (re.compile(r"errno\s*=\s*(\d+)"), None),
    (re.compile(r"No space left on device", re.I), errnos.ENOSPC),
    (re.compile(r"Read-only file system", re.I), errnos.EROFS),
    (re.compile(r"Permission denied", re.I), errnos.EACCES),
    (re.compile(r"Disk quota exceeded", re.I), errnos.EDQUOT),
]


def errno_of(err: BaseException) -> int | None:
    """The errno of an OSError, or the one a library wrote into its message."""
    if isinstance(err, OSError) and err.errno:
        return int(err.errno)
    text = str(err)
    for pattern, code in _IN_TEXT:
        match = pattern.search(text)
        if match:
            return code if code is not None else int(match.group(1))
    return None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


class IOFailure(UserError):
    """A failed read or write: ``<problem>; <remedy>, then <next step>`` (by default, running the command again;
    a caller that knows better, such as a run that can resume, gives its own with ``then``)."""

    def __init__(self, problem: str, remedy: str, step: str | None = "run the command again") -> None:
        super().__init__(f"{problem}; {remedy}" + (f", then {step}" if step else ""))
        self.problem, self.remedy = problem, remedy

    def then(self, step: str) -> IOFailure:
        """The same failure with another next step."""
        return IOFailure(self.problem, self.remedy, step)


def io_error(err: BaseException, path: str | os.PathLike[str] | None, action: str, fix: str | None = None) -> IOFailure:
    """``cannot <action> <path>: <what happened>; <what to do>`` for a failed read or write."""
    code = errno_of(err)
    target = path if path is not None else getattr(err, "filename", None)
    where = f" {target}" if target else ""
    what, remedy = _KINDS[code] if code in _KINDS else (_first_line(err), "check the file")
    if fix is not None:  # the caller's advice is complete
        return IOFailure(f"cannot {action}{where}: {what}", fix, None)
    return IOFailure(f"cannot {action}{where}: {what}", remedy)


def read_text(path: str | os.PathLike[str], label: str, fix: str) -> str:
    """The UTF-8 text of a user's file; a file that cannot be read, or is not UTF-8 text, is one line naming
    ``label`` (e.g. 'config file') and ``fix`` (e.g. 'check the --config path')."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"cannot read {label} {path}: it is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8 text"
        ) from None
    except OSError as err:
        raise io_error(err, path, f"read {label}", fix) from None


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing folder), if it can be told."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return usage.f_bavail * usage.f_frsize


def write_error(
    err: BaseException, path: str | os.PathLike[str], what: str | None = None, fix: str | None = None
) -> IOFailure:
    """A failed write of ``path`` (``what`` it holds, e.g. 'the checkpoint'), explained. torch and HDF5 report a
    full disk as a failed write or a wrong position, so an error without an errno on a nearly full file system is
    reported as the full disk it most likely is."""
    action = f"write {what}" if what else "write"
    if errno_of(err) is None:
        free = free_bytes(path)
        if free is not None and free < 64 << 20:
            return io_error(OSError(errnos.ENOSPC, "No space left on device"), path, action, fix)
    return io_error(err, path, action, fix)
