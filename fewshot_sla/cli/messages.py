"""The CLI's voice for the library's messages: settings as flags, actions as ``fewshot-sla ...`` command lines.

The library names settings and actions with the markers of ``errors.py``; ``main`` renders its messages with
``CliVoice`` (``errors.voice``), so that a Python user reads field names and API calls and a shell user flags and
commands.
"""

from __future__ import annotations

from typing import Any

# Settings that are no RunConfig field, or whose flag is not ``--`` + the name with dashes.
FLAGS = {"backbone_options": "--backbone-option", "learner_options": "--learner-option"}
# Options written before the sub-command.
GLOBAL = ("data_root",)


def flag(name: str) -> str:
    """The flag of setting ``name``: its ``Knob.flag`` for a RunConfig field, else ``--`` + the name with dashes."""
    from fewshot_sla.config import knobs

    knob = knobs().get(name)
    if knob is not None and knob.flag:
        return knob.flag
    return FLAGS.get(name, "--" + name.replace("_", "-"))


class CliVoice:
    """Settings as flags, actions as the command lines that do them."""

    def setting(self, name: str) -> str:
        return flag(name)

    def command(self, action: str, args: list[str], options: dict[str, Any]) -> str:
        words = ["fewshot-sla"]
        for name in GLOBAL:
            if name in options:
                words += [flag(name), str(options[name])]
        words += [action, *args]
        for name, value in options.items():
            if name in GLOBAL or value is False:
                continue
            words += [flag(name)] if value is True else [flag(name), str(value)]
        return " ".join(words)
