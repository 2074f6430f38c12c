"""Schema validation with pydantic, reported as one-line ``UserError``s that name the file line or the flag.

pydantic checks types, ranges and unknown keys of run configurations and grid files; ``one_line_error`` turns
the first problem it found into the message a user reads: where (``config file F line N``, ``grid F line N``,
``command line``), which key, what is wrong, and what was given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from fewshot_sla.errors import UserError

# pydantic's error types -> what the value must be, in the words of this project.
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "float_type": "a number",
    "string_type": "text",
    "list_type": "a list",
    "dict_type": "a mapping of name: value",
    "finite_number": "a finite number",
}


def _bound(value: Any) -> str:
    """A range bound as written (0, not 0.0)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(error: Mapping[str, Any], valid_keys: Sequence[str] = ()) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as ``'key' must be ..., got ...``."""
    loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
    key = loc[-1] if loc else "value"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        valid = f"; valid keys: {', '.join(valid_keys)}" if valid_keys else ""
        return f"unknown key '{key}'{valid}"
    if kind == "missing":
        return f"'{key}' is required; add it"
    if value is None and kind in _EXPECTED:
        return f"'{key}' cannot be empty; give a value or remove the key"
    if kind in _EXPECTED:
        return f"'{key}' must be {_EXPECTED[kind]}, got {_shown(value)}"
    ctx = error.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"'{key}' must be at least {_bound(ctx.get('ge'))}, got {_shown(value)}"
    if kind == "greater_than":
        return f"'{key}' must be greater than {_bound(ctx.get('gt'))}, got {_shown(value)}"
    if kind == "less_than_equal":
        return f"'{key}' must be at most {_bound(ctx.get('le'))}, got {_shown(value)}"
    if kind in ("value_error", "assertion_error"):  # a validator's own message, a whole sentence
        return str(ctx.get("error") or error["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        return f"'{key}' must be one of {ctx.get('expected')}, got {_shown(value)}"
    if kind == "string_pattern_mismatch":
        return f"'{key}' does not have the expected form, got {_shown(value)}"
    return f"'{key}': {error['msg'].lower()}, got {_shown(value)}"


def one_line_error(
    err: ValidationError,
    where: Callable[[tuple[Any, ...]], str],
    valid_keys: Sequence[str] = (),
    hint: Callable[[tuple[Any, ...]], str] | None = None,
) -> UserError:
    """The first error of ``err`` as a UserError ``<where(loc)>: <what is wrong>[; <hint(loc)>]``."""
    first = err.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    message = f"{where(loc)}: {describe(first, valid_keys)}"
    extra = hint(loc) if hint is not None else ""
    return UserError(f"{message}; {extra}" if extra else message)
