"""The ``fewshot-sla`` command: a thin argparse front over the library.

Each sub-command lives in its own module of this package exposing ``register(subparsers)``, which
adds its parser and sets ``handler`` (a function taking the parsed namespace, returning an exit code).
Handlers import the engine when they run, not when the parser is built, so ``--help`` and the light
commands start without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from fewshot_sla.cli.messages import CliVoice
from fewshot_sla.errors import UserError, render, voice
from fewshot_sla.preemption import Preempted, preemption_signals
from fewshot_sla.version import __version__

# Sub-command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "fewshot_sla.cli.data",
    "fewshot_sla.cli.episodes",
    "fewshot_sla.cli.listing",
    "fewshot_sla.cli.run",
    "fewshot_sla.cli.evaluate",
    "fewshot_sla.cli.compare",
    "fewshot_sla.cli.predict",
    "fewshot_sla.cli.leaderboard",
)

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (what is wrong and where to look) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> Parser:
    parser = Parser(
        prog="fewshot-sla",
        description="Few-shot meta-learning benchmarks with self-supervised label augmentation (SLA).",
    )
    parser.add_argument("--version", action="version", version=f"fewshot-sla {__version__}")
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="folder holding prepared dataset stores (default: $FEWSHOT_SLA_DATA, else ~/.cache/fewshot-sla)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


class _ConsoleHandler(logging.Handler):
    """The library's notes and warnings (``logging`` under ``fewshot_sla``) as the CLI's ``fewshot-sla: ...`` lines
    on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        label = "warning: " if record.levelno >= logging.WARNING else ""
        sys.stderr.write(f"fewshot-sla: {label}{render(record.getMessage(), CliVoice())}\n")


def _show_library_messages() -> None:
    """Route the library's log records to the console (once per process); a library user routes them instead."""
    library = logging.getLogger("fewshot_sla")
    if not any(isinstance(h, _ConsoleHandler) for h in library.handlers):
        library.addHandler(_ConsoleHandler())
        library.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    _show_library_messages()
    with voice(CliVoice()):  # the library's messages name flags and command lines here
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        with preemption_signals():  # SIGTERM, SIGUSR1, SIGUSR2: save what can be saved, then one line
            args = build_parser().parse_args(argv)
            return int(args.handler(args) or 0)
    except Preempted as err:
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"fewshot-sla: {err}\n")
        return err.exit_code
    except UserError as err:
        if not (err.shared and os.environ.get("RANK", "0") != "0"):  # one line per run, not per process
            sys.stderr.write(f"fewshot-sla: error: {err}\n")
        return EXIT_USER_ERROR
    except (OSError, UnicodeDecodeError, MemoryError) as err:  # the last line of defence: still one line
        sys.stderr.write(f"fewshot-sla: error: {_environment_error(err)}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("fewshot-sla: interrupted\n")
        return 130


def _environment_error(err: BaseException) -> str:
    """One line for a failure of the machine rather than of the suite: a file that cannot be read or written, a
    file that is not text, memory running out."""
    if isinstance(err, MemoryError):
        return (
            "out of memory; lower --meta-batch, pass --micro-batch or --checkpointing, or use a machine with more "
            "memory"
        )
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({err.reason} at offset {err.start}); save it as UTF-8 text"
    from fewshot_sla.io_errors import io_error

    return str(io_error(err, None, "read or write"))


if __name__ == "__main__":
    sys.exit(main())
