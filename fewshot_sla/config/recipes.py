"""Published training recipes, kept as data in ``recipes.yaml`` (package data): which recipe each learner
trains with, and what each recipe sets (optimizer, LR schedule, training ways/shots/queries, meta-batch, budget).

``apply_recipe`` fills every field a configuration leaves ``None``; the file's header explains the rules. A
plug-in package adds a recipe for its learner with ``add_recipe("my-learner", {"source": ..., "values": {...}})``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fewshot_sla.config import RunConfig, check_values, rules
from fewshot_sla.errors import UserError
from fewshot_sla.validation import one_line_error

RECIPE_FILE = "recipes.yaml"
MATCH_KEYS = ("dataset", "backbone", "method", "ways", "shots")
OPTION_FIELDS = ("backbone_options", "learner_options")


def _is_reference(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"same_as"}


def _check_run_values(values: dict[str, Any]) -> dict[str, Any]:
    """Recipe values must be RunConfig fields of the right types; ``{same_as: FIELD}`` must name a field."""
    for key, value in values.items():
        if _is_reference(value) and value["same_as"] not in RunConfig.model_fields:
            raise ValueError(f"'{key}': same_as names no configuration field: {value['same_as']!r}")
    try:
        check_values({k: v for k, v in values.items() if not _is_reference(v)}, "recipe")
    except UserError as err:
        raise ValueError(str(err).removeprefix("recipe: ")) from None
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Rule(_Strict):
    """Values that apply to the runs ``when`` matches."""

    when: dict[str, list[Any]] = Field(default_factory=dict)
    values: dict[str, Any] = Field(default_factory=dict)

    @field_validator("when", mode="before")
    @classmethod
    def _listed(cls, when: Any) -> Any:
        return rules.listed(when)

    @field_validator("when")
    @classmethod
    def _keys(cls, when: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return rules.checked(when, MATCH_KEYS)

    _values = field_validator("values")(_check_run_values)

    def matches(self, run: Mapping[str, Any]) -> bool:
        return rules.matches(self.when, run)


class _Choice(_Rule):
    """One entry of a learner's recipe list: the recipe to use for the runs ``when`` matches."""

    recipe: str


class _Recipe(_Strict):
    source: str
    values: dict[str, Any]
    rules: list[_Rule] = Field(default_factory=list)

    _values = field_validator("values")(_check_run_values)


class RecipeBook(_Strict):
    """The whole recipe file, checked: every learner's recipe list and every recipe."""

    methods: dict[str, list[_Choice]]
    default: str
    shared: dict[str, Any] = Field(default_factory=dict)  # blocks the file reuses through YAML anchors
    recipes: dict[str, _Recipe]

    @model_validator(mode="after")
    def _known_recipes(self) -> RecipeBook:
        named = [self.default] + [c.recipe for choices in self.methods.values() for c in choices]
        missing = sorted(set(named) - set(self.recipes))
        if missing:
            raise ValueError(f"no recipe called {', '.join(missing)}")
        return self

    def choose(self, cfg: RunConfig) -> tuple[str, dict[str, Any]]:
        """The recipe ``cfg``'s method trains with, and the resolved values it sets for ``cfg``."""
        explicit = cfg.to_dict()
        choices = self.methods.get(cfg.method) or [_Choice(recipe=self.default)]
        choice = next((c for c in choices if c.matches(explicit)), _Choice(recipe=self.default))
        recipe = self.recipes[choice.recipe]
        values = dict(recipe.values)
        for rule in recipe.rules:
            if rule.matches({**explicit, "backbone": cfg.backbone or values.get("backbone")}):
                values.update(rule.values)
        values.update(choice.values)
        resolved = {k: explicit[v["same_as"]] if _is_reference(v) else v for k, v in values.items()}
        return choice.recipe, resolved


def _parse(text: str, where: str) -> RecipeBook:
    try:
        return RecipeBook.model_validate(yaml.safe_load(text))
    except ValidationError as err:
        raise one_line_error(err, lambda loc: f"{where} at {'.'.join(map(str, loc))}") from None


@lru_cache(maxsize=1)
def recipe_book() -> RecipeBook:
    """The packaged recipe file, read and checked once."""
    text = resources.files("fewshot_sla.config").joinpath(RECIPE_FILE).read_text()
    return _parse(text, f"fewshot_sla/config/{RECIPE_FILE}")


def add_recipe(method: str, recipe: Mapping[str, Any]) -> None:
    """Register a recipe for a (plug-in) learner: ``{"source": ..., "values": {...}, "rules": [...]}``.

    Call it when the plug-in's module is imported (docs/guide/plugins.md: "A recipe for a plug-in learner"). The
    recipe has the form of ``recipes.yaml``'s: ``source`` (recorded in results.json), ``values`` (run-configuration
    fields, checked; ``{"same_as": FIELD}`` takes the run's own value of FIELD) and ``rules`` (``when`` a run
    matches, their values on top, in order). Like every recipe it fills only the fields a run leaves unset, and it
    replaces the ``generic`` recipe as a whole for ``method``: set every field ``generic`` sets (an omitted one stays
    unset). A bad recipe is a one-line UserError naming the field.
    """
    try:
        checked = _Recipe.model_validate(dict(recipe))
    except ValidationError as err:
        raise one_line_error(err, lambda loc: f"recipe for '{method}' at {'.'.join(map(str, loc))}") from None
    book = recipe_book()
    book.recipes[method] = checked
    book.methods[method] = [_Choice(recipe=method)]


def recipe_record(cfg: RunConfig) -> dict[str, str]:
    """The recipe ``cfg`` trains with and where its values come from (its ``source``: the papers and code it follows
    and the choices made where they are ambiguous), for results.json."""
    book = recipe_book()
    name, _ = book.choose(cfg)
    return {"name": name, "source": book.recipes[name].source}


def default_val_every(train_episodes: int) -> int:
    """Validate every 500 episodes, or 20 times per run on long budgets (over 10,000 episodes), and at least 4
    times per run on short ones (under 2,000 episodes; every episode under 8)."""
    return min(max(500, train_episodes // 20), max(1, train_episodes // 4))


def apply_recipe(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every ``None`` field (and empty backbone/learner options where the recipe sets some) filled."""
    _, recipe = recipe_book().choose(cfg)
    values: dict[str, Any] = {}
    for name, value in recipe.items():
        current = getattr(cfg, name)
        if name in OPTION_FIELDS:
            if not current and value:
                values[name] = value
        elif current is None:
            values[name] = value
    out = cfg.updated(values, "recipe")
    if out.val_every is None:
        out = out.updated({"val_every": default_val_every(out.train_episodes or 1)}, "recipe")
    return out
