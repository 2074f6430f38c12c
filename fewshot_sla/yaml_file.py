"""Reading a user's YAML file (config or grid): read errors and syntax errors become one-line UserErrors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fewshot_sla.errors import UserError
from fewshot_sla.io_errors import read_text


def read_yaml(path: Path, label: str, fix: str) -> tuple[yaml.Node | None, Any]:
    """``(node tree, data)`` of the YAML file ``path``; ``label`` names it in errors (e.g. 'config file'),
    ``fix`` is the advice when it cannot be read (e.g. 'check the --config path'). The node tree gives line
    numbers."""
    text = read_text(path, label, fix)
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise UserError(f"{label} {path}{where}: {problem}; fix the YAML syntax") from None


def key_lines(root: yaml.Node | None) -> dict[str, int]:
    """Line number (1-based) of each top-level key of a YAML mapping's node tree."""
    if not isinstance(root, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
