"""The one exception type for mistakes a user can fix (bad path, bad setting, impossible request), and the markers
its messages use for what the user would change or run.

The library speaks in configuration fields and actions, not in flags: a message names a setting with
``setting("train_ways")`` and an action with ``command("eval", run_dir, dataset="cub")``, small tokens embedded in the
message text. ``render`` turns them into words in the voice in effect: the library's own (a setting is its field or
keyword name, ``train_ways``; an action the Python API call, ``fewshot_sla.api.evaluate("RUN", dataset="cub")``), or,
inside ``voice(...)``, another one: the CLI renders flags (``--train-ways``) and command lines (``fewshot-sla eval
RUN --dataset cub``) with ``cli/messages.py``. ``str(UserError)`` and the ``fewshot_sla`` log records (``note``)
are rendered in the voice in effect when they are read.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol

_TOKEN = re.compile("\x00(setting|command):([^\x00]*)\x00")


def setting(name: str) -> str:
    """A marker naming the setting ``name`` (a ``RunConfig`` field or an API keyword such as ``out``) in a message."""
    return f"\x00setting:{name}\x00"


def command(action: str, *args: Any, **options: Any) -> str:
    """A marker naming the action that fixes something, with its arguments: ``action`` is the CLI sub-command
    (``"eval"``, ``"run"``, ``"data prepare"``, ``"episodes make"``, ``"leaderboard run"``), ``args`` its positional
    values, ``options`` its settings (``True``: a switch), in order."""
    return "\x00command:" + json.dumps([action, [str(a) for a in args], _plain(options)]) + "\x00"


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """The options a command line would show: ``None`` and ``False`` (unset, a switch left off) left out."""
    return {
        k: v if isinstance(v, (bool, int, float)) else str(v)
        for k, v in options.items()
        if v is not None and v is not False
    }


class Voice(Protocol):
    """How markers read: ``setting(name)`` and ``command(action, args, options)`` as words."""

    def setting(self, name: str) -> str: ...

    def command(self, action: str, args: list[str], options: dict[str, Any]) -> str: ...


class LibraryVoice:
    """Settings as their field or keyword names, actions as Python API calls (or, without one, described)."""

    def setting(self, name: str) -> str:
        return name

    def command(self, action: str, args: list[str], options: dict[str, Any]) -> str:
        options = dict(options)
        options.pop("data_root", None)  # the API takes the data root as an argument of every call
        if action == "run" and options.pop("resume", False):
            return _call("resume", args + [options.pop("out", "RUN_DIR")], options)
        if action == "run":
            return "fewshot_sla.api.train"
        if action == "eval":
            return _call("evaluate", args, options)
        if action == "data prepare":
            own = options.pop("layout", None) == "imagefolder"
            return _call("prepare_image_folder" if own else "prepare_dataset", args, options)
        words = _arguments(args, options)
        return f"the {action} action" + (f" with {words}" if words else "")


def _call(function: str, args: list[str], options: dict[str, Any]) -> str:
    """``fewshot_sla.api.evaluate("runs/a", dataset="cub")``; without arguments, the function's name."""
    arguments = _arguments(args, options)
    return f"fewshot_sla.api.{function}" + (f"({arguments})" if arguments else "")


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _arguments(args: list[str], options: dict[str, Any]) -> str:
    """Python arguments, strings in double quotes (messages quote a whole call in single ones)."""
    return ", ".join(
        [*map(_quoted, args), *(f"{k}={_quoted(v) if isinstance(v, str) else v}" for k, v in options.items())]
    )


_LIBRARY = LibraryVoice()
_VOICE: ContextVar[Voice | None] = ContextVar("fewshot_sla_voice", default=None)


@contextlib.contextmanager
def voice(speaker: Voice) -> Iterator[None]:
    """Render markers with ``speaker`` inside the block (the CLI's ``main``)."""
    token = _VOICE.set(speaker)
    try:
        yield
    finally:
        _VOICE.reset(token)


def render(text: str, speaker: Voice | None = None) -> str:
    """``text`` with its markers as words, in ``speaker``'s voice or the one in effect."""
    if "\x00" not in text:
        return text
    who = speaker or _VOICE.get() or _LIBRARY

    def word(match: re.Match[str]) -> str:
        if match.group(1) == "setting":
            return who.setting(match.group(2))
        action, args, options = json.loads(match.group(2))
        return who.command(action, args, options)

    return _TOKEN.sub(word, text)


class note:  # used as a function
    """A log argument with markers, rendered when a handler formats the record (``log.info("%s", note(text))``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return render(self.text)


class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line and exits with code 2.

    The message must say what is wrong and how to fix it, in one line, naming settings and actions with the markers
    above. ``shared``: every process of a distributed run raises the same error at the same point, so only process
    0 prints it.
    """

    def __init__(self, message: str, *, shared: bool = False) -> None:
        super().__init__(message)
        self.shared = shared

    @property
    def message(self) -> str:
        """The message with its markers."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return render(self.message)
