"""Preemption: the signals a scheduler sends before it kills a job, turned into a saved state and one line.

Slurm, Kubernetes and ``kill`` send SIGTERM some seconds before SIGKILL; Slurm's ``--signal`` and submitit warn
with SIGUSR1 or SIGUSR2. While ``preemption_signals()`` is active these signals never kill the process outright:

- inside a ``deferred()`` section (the training steps) a signal is only recorded; the trainer finishes the step
  it is in, saves a checkpoint at that step and stops (``requested()`` says which signal asked);
- anywhere else, and inside an ``immediate()`` section (planning, loading data, validation, the test evaluation),
  it raises ``Preempted`` at once, which unwinds through the normal clean-up (no half-written file is left);
  whatever was saved before is resumable.

Handlers are installed from the main thread only (Python delivers signals there); elsewhere both context managers
do nothing. ``preemption_signals()`` nests: only the outermost installs and restores the handlers.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from fewshot_sla.errors import render

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(BaseException):
    """A preemption signal arrived outside a deferred section. A ``BaseException`` (like ``KeyboardInterrupt``),
    so that no ``except Exception`` swallows it; ``exit_code`` is the shell's ``128 + signal number``."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(message or f"stopped by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def then(self, advice: str) -> Preempted:
        """The same stop, its message ending in what to do next."""
        return Preempted(self.signum, f"{self.args[0]}; {advice}")

    def __str__(self) -> str:
        return render(str(self.args[0]))  # what to do next may name settings and actions (errors.py)


class _State:
    installed = 0  # nesting depth of preemption_signals()
    deferring = 0  # nesting depth of deferred()
    requested: int | None = None  # the signal recorded inside a deferred section


def _handler(signum: int, frame: FrameType | None) -> None:
    if _State.deferring:
        if _State.requested is None:
            _State.requested = signum
        return
    raise Preempted(_State.requested or signum)


@contextlib.contextmanager
def preemption_signals() -> Iterator[None]:
    """While active, SIGTERM, SIGUSR1 and SIGUSR2 stop the process through ``Preempted`` or a deferred stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    if not _State.installed:
        _State.requested = None
        previous = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}
        for s in PREEMPTION_SIGNALS:
            signal.signal(s, _handler)
    _State.installed += 1
    try:
        yield
    finally:
        _State.installed -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section in which a preemption signal is only recorded (``requested()``). A signal still recorded when
    the outermost section ends normally is raised then, so that none is lost."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if not _State.deferring and _State.installed and _State.requested is not None:
        raise Preempted(_State.requested)


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """A section inside a deferred one where a preemption signal raises at once (a long evaluation); a signal
    recorded before it raises on entry."""
    depth, _State.deferring = _State.deferring, 0
    try:
        if _State.installed and _State.requested is not None:
            raise Preempted(_State.requested)
        yield
    finally:
        _State.deferring = depth


def requested() -> int | None:
    """The preemption signal recorded in a deferred section, or None."""
    return _State.requested


def clear() -> None:
    """Forget a recorded signal (the caller has acted on it)."""
    _State.requested = None
