"""Name -> object registries for datasets, backbones, learners, transformations, objectives and run loggers.

Built-in entries register themselves with a decorator when their module is imported. Third-party
packages add entries through the entry-point group ``fewshot_sla.plugins``: each entry point names a
module (importing it registers its entries) or a callable (called once with no arguments).
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from fewshot_sla.errors import UserError

PLUGIN_GROUP = "fewshot_sla.plugins"

T = TypeVar("T")

# Modules whose import registers the built-in entries of each kind.
_BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "dataset": ("fewshot_sla.data.datasets",),
    "backbone": ("fewshot_sla.backbones",),
    "learner": ("fewshot_sla.learners",),
    "transform": ("fewshot_sla.sla",),
    "objective": ("fewshot_sla.objectives",),
    "logger": ("fewshot_sla.engine.loggers",),
}

_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import every installed plug-in once; return the entry-point names loaded."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except UserError as err:
            raise UserError(f"plug-in '{ep.name}' ({ep.value}): {err}") from err
        except Exception as err:
            reason = " ".join(str(err).split())
            raise UserError(
                f"plug-in '{ep.name}' ({ep.value}) failed to load: {type(err).__name__}: {reason}; "
                "fix or uninstall the package that provides it"
            ) from err
        loaded.append(ep.name)
    return loaded


def _origin(obj: object) -> str:
    """Where an entry comes from (module.qualname of a class or function), to name both sides of a clash."""
    qualname = getattr(obj, "__qualname__", None)
    if qualname is None:
        return f"a {type(obj).__name__} object"
    return f"{getattr(obj, '__module__', '?')}.{qualname}"


class Registry(Generic[T]):
    """A named collection of one kind of component (e.g. learners)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._families: dict[str, Callable[[str], T]] = {}
        self._made: dict[str, T] = {}  # family entries made so far (not listed by ``names``)
        self._builtins_loaded = False

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (default: its ``__name__``)."""

        def decorate(obj: T) -> T:
            key = name if name is not None else getattr(obj, "__name__", None)
            if not isinstance(key, str):
                raise TypeError(f"cannot register {obj!r} without a name; pass one: register('my-name')")
            old = self._entries.get(key)
            if old is not None and not override and old is not obj:
                raise UserError(
                    f"{self.kind} '{key}' is registered twice (by {_origin(old)} and {_origin(obj)}); "
                    "rename one of them, or register with override=True to replace it"
                )
            self._entries[key] = obj
            return obj

        return decorate

    def add(self, name: str, obj: T, *, override: bool = False) -> T:
        """Register ``obj`` under ``name`` without a decorator."""
        return self.register(name, override=override)(obj)

    def add_family(self, prefix: str, make: Callable[[str], T]) -> None:
        """Entries named ``prefix:NAME`` for any NAME, each made on first use by ``make(NAME)`` (which raises a
        UserError for a NAME it cannot make), e.g. ``timm:resnet18``."""
        self._families[prefix] = make

    def _family_entry(self, name: str) -> T | None:
        prefix, sep, rest = name.partition(":")
        if not sep or prefix not in self._families:
            return None
        if not rest:
            raise UserError(f"{self.kind} '{name}' names no model; write {prefix}:NAME")
        if name not in self._made:
            self._made[name] = self._families[prefix](rest)
        return self._made[name]

    def _ensure_loaded(self) -> None:
        if not self._builtins_loaded:
            for module in _BUILTIN_MODULES.get(self.kind, ()):
                importlib.import_module(module)
            self._builtins_loaded = True
        load_plugins()

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard."""
        self._ensure_loaded()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries or (isinstance(name, str) and name.partition(":")[0] in self._families)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is a UserError listing the valid ones."""
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            entry = self._family_entry(name)
            if entry is not None:
                return entry
            valid = ", ".join(self.names()) + "".join(f", {prefix}:NAME" for prefix in sorted(self._families))
            raise UserError(
                f"unknown {self.kind} '{name}'; choose one of: {valid.strip(', ') or '(none registered)'}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> Any:
        """Call the entry called ``name`` (a class or factory) with ``kwargs``."""
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def items(self) -> Iterable[tuple[str, T]]:
        """All (name, entry) pairs, sorted by name."""
        self._ensure_loaded()
        return sorted(self._entries.items())


DATASETS: Registry[Any] = Registry("dataset")
BACKBONES: Registry[Any] = Registry("backbone")
LEARNERS: Registry[Any] = Registry("learner")
# SLA transformations: a ``sla.Transformation``, or a factory called with no arguments that returns one. Their
# contract (normalised float images [B, R, C, H, W] -> sample-major [B, R*M, C, H, W], copy 0 the identity, shape,
# dtype and device kept, deterministic) is in ``sla.Transformation``'s docstring and docs/guide/plugins.md ("Plug-in
# transformations"); ``sla.checked_transform`` checks it on a probe batch when a run builds its model.
TRANSFORMS: Registry[Any] = Registry("transform")
OBJECTIVES: Registry[Any] = Registry("objective")
# Experiment trackers besides metrics.jsonl (``fewshot-sla run --log NAME``; see ``engine/loggers.py``).
LOGGERS: Registry[Any] = Registry("logger")

ALL_REGISTRIES: dict[str, Registry[Any]] = {
    "datasets": DATASETS,
    "backbones": BACKBONES,
    "learners": LEARNERS,
    "transforms": TRANSFORMS,
    "objectives": OBJECTIVES,
    "loggers": LOGGERS,
}
