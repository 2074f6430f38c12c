"""mkdocs hook: replace ``<!-- cli-help -->`` with every command's ``--help`` (``fewshot_sla.cli.build_parser``),
so the command-line reference is the parser's own text, never a copy that drifts."""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-help -->"


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, f"{prefix} {name}")
    return found


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from fewshot_sla.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width: fix it
    sections = []
    for name, parser in _commands(build_parser(), "fewshot-sla"):
        parser.prog = name
        sections.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return markdown.replace(MARKER, "\n".join(sections))
