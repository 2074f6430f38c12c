"""Reading a user's YAML (config or grid files, ``--set`` and option values): read errors and syntax errors become
one-line UserErrors, a key given twice in one mapping is an error naming both lines (PyYAML would keep the last),
and numbers in exponent form (``1e-3``, ``5E-4``) are numbers (YAML 1.2; PyYAML's YAML 1.1 reads them as strings
unless they have a dot and a signed exponent)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from fewshot_sla.errors import UserError
from fewshot_sla.io_errors import read_text


class UserYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (an integer stays an integer)."""


# YAML 1.2's exponent floats that YAML 1.1's float pattern misses (no dot, or no sign in the exponent).
UserYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """The value of a YAML text (a ``--set`` value, say), read as ``read_yaml`` reads files."""
    return yaml.load(text, Loader=UserYamlLoader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml(path: Path, label: str, fix: str) -> tuple[yaml.Node | None, Any]:
    """``(node tree, data)`` of the YAML file ``path``; ``label`` names it in errors (e.g. 'config file'),
    ``fix`` is the advice when it cannot be read (e.g. 'check the --config path'). The node tree gives line
    numbers."""
    text = read_text(path, label, fix)
    try:
        root = yaml.compose(text, Loader=UserYamlLoader)
        _refuse_repeated_keys(root, f"{label} {path}")
        return root, parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise UserError(f"{label} {path}{where}: {problem}; fix the YAML syntax") from None


def _refuse_repeated_keys(node: yaml.Node | None, where: str) -> None:
    """A key given twice in one mapping (anywhere in the tree) is a UserError naming both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise UserError(
                        f"{where}: '{key.value}' is given twice (lines {seen[key.value]} and {line}); keep one"
                    )
                seen[key.value] = line
            _refuse_repeated_keys(value, where)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, where)


def key_lines(root: yaml.Node | None) -> dict[str, int]:
    """Line number (1-based) of each top-level key of a YAML mapping's node tree."""
    if not isinstance(root, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
