"""The one rule matcher of recipes (``config/recipes.yaml``) and grids (``config/grid.py``): a rule's ``when``
maps keys (a recipe's run settings, a grid's axes) to a value or a list of values, and a run matches it when each of
its values for those keys is among the listed ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def listed(when: Any) -> Any:
    """``when`` with every single value made a list of one (anything but a mapping is left for validation)."""
    return (
        {key: value if isinstance(value, list) else [value] for key, value in when.items()}
        if isinstance(when, dict)
        else when
    )


def checked(when: dict[str, list[Any]], keys: Sequence[str]) -> dict[str, list[Any]]:
    """``when`` if it names only ``keys``; else a ValueError naming the first other key and the ones allowed."""
    unknown = [key for key in when if key not in keys]
    if unknown:
        raise ValueError(f"cannot match on '{unknown[0]}'; rules match on: {', '.join(keys)}")
    return when


def matches(when: Mapping[str, Sequence[Any]], values: Mapping[str, Any]) -> bool:
    """Whether ``values`` matches every key of ``when``."""
    return all(values.get(key) in allowed for key, allowed in when.items())
