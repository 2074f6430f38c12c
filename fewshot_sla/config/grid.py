"""Grid files: a YAML product of datasets x methods x backbones x variants x ways x shots x seeds -> run cells.

A grid file (see ``benchmarks/grids/``)::

    name: paper                  # optional, default the file name; names the default runs folder
    description: free text       # optional
    data_root: ../../.data       # optional, relative to this file (the global --data-root flag wins)
    datasets: [miniimagenet, cub]          # or a mapping  name: {RunConfig key: value, ...}; a dataset of your
                                           # own images must be prepared in data_root (else $FEWSHOT_SLA_DATA)
    methods:                               # each a name, or a mapping:
      - maml
      - method: protonet
        backbones: [conv4]                 # optional: else the grid's backbones, else the config's, else the recipe's
        shots: [1]                         # optional: else the grid's shots
        config: recipes/protonet.yaml   # optional recipe file (RunConfig YAML), relative to this file
        settings: {train_episodes: 600}    # optional RunConfig keys for this entry
      - method: nearest-centroid
        init_from: {method: pretrain}      # optional: start each cell from the backbone of the grid's cell that
                                           # has these axes instead of its own (the others the same); it runs after it
    backbones: [resnet12]                  # optional default backbones
    variants:                              # the {transform, objective} axis
      - {transform: none, objective: baseline}
      - {transform: rotation, objective: sla}
    ways: [5]                              # optional, default [5]
    shots: [1, 5]
    seeds: [0, 1]                          # optional, default [0]
    settings: {eval_episodes: 1000}        # optional RunConfig keys shared by every cell
    rules:                                 # optional exceptions for the cells a rule's 'when' matches
      - when: {method: metaoptnet-svm, dataset: cifarfs}      # axis: value or [values]
        config: recipes/svm-cifarfs.yaml   # replaces the entry's recipe file
        settings: {train_shots: 5}
    slurm: {timeout_min: 600}              # optional submitit parameters for --executor slurm

A cell's configuration layers, lowest first: its recipe file (the entry's ``config``, or the last matching
rule's), ``settings``, the dataset's settings, the entry's ``settings``, the matching rules' ``settings``,
then the cell's axes (dataset, method, backbone, transform, objective, ways, shots, seed), which no settings
block may set. A recipe file must be for the cell's method and backbone when it names them; its dataset,
ways, transform and objective are replaced by the cell's. A rule on ``backbone`` matches only cells whose
backbone the grid or the recipe file names, and a rule that matches no cell is an error (a likely typo).
Everything is checked before anything runs: the file's structure by pydantic models (unknown keys, types,
ranges), run settings as RunConfig values, each error one line naming the file line.

A cell's identity (the hash ending its folder name) covers its fully resolved configuration, the published
recipe included, so a changed recipe or setting never reuses the run folder of a cell it no longer describes. A cell
started from another cell (``init_from`` in its entry) has that cell's name in its identity in place of a folder
(``Cell.source``), so its name does not depend on where the runs go; the folder is filled in when its configuration
file is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fewshot_sla.config import RunConfig, check_values, identity_values, knobs, read_config_values
from fewshot_sla.config import rules as rule_matcher
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.config.rules import matches
from fewshot_sla.errors import UserError, command, setting
from fewshot_sla.registry import ALL_REGISTRIES
from fewshot_sla.validation import one_line_error
from fewshot_sla.yaml_file import read_yaml

AXES = ("dataset", "method", "backbone", "transform", "objective", "ways", "shots", "seed")
AXIS_HOME = {
    "dataset": "datasets",
    "method": "methods",
    "backbone": "backbones",
    "transform": "variants",
    "objective": "variants",
    "ways": "ways",
    "shots": "shots",
    "seed": "seeds",
}
# Settings that never change a cell's results, so not part of its identity; keys added after grids were first run
# whose unset value means what every earlier cell did, left out of the identity while unset so that adding them
# renamed (and re-ran) no existing cell. Both from each field's Knob (config/run_config.py).
HASH_FREE_KEYS = tuple(key for key, knob in knobs().items() if knob.identity == "never")
UNSET_FREE_KEYS = tuple(key for key, knob in knobs().items() if knob.identity == "when_set")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


SOURCE_CELL = "cell:"  # init_from in a cell's identity: the grid cell it starts from, by name


@dataclass(frozen=True)
class Cell:
    """One run of a grid: the values the grid sets, its resolved configuration, its folder name, and the cell whose
    backbone it starts from (``source``; its ``config.init_from`` is then ``cell:<source>``)."""

    name: str
    values: dict[str, Any]
    config: RunConfig
    source: str | None = None

    def to_yaml(self, runs_dir: Path) -> str:
        """The resolved configuration as a ``fewshot-sla run --config`` file, for the cells under ``runs_dir``."""
        if self.source is None:
            return self.config.to_yaml()
        return self.config.updated({"init_from": str(runs_dir / self.source)}, "grid").to_yaml()


@dataclass(frozen=True)
class Grid:
    """A checked grid file: its cells in expansion order plus where the data and the Slurm settings come from."""

    name: str
    path: Path
    description: str
    data_root: Path | None
    cells: list[Cell]
    slurm: dict[str, Any]


# ----- the file's structure (pydantic) -----


def _listed(value: Any) -> Any:
    """A single scalar stands for a list of one."""
    return value if isinstance(value, list) else [value]


def _no_repeats(items: list[Any]) -> list[Any]:
    for i, item in enumerate(items):
        if item in items[:i]:
            raise ValueError(f"{item!r} is listed twice; remove one")
    return items


def _whole_numbers(axis: str, values: list[int], minimum: int) -> list[int]:
    bad = [v for v in values if v < minimum]
    if bad:
        raise ValueError(f"'{axis}' entries must be integers >= {minimum}, got {bad[0]!r}")
    if not values:
        raise ValueError(f"'{axis}' must list at least one value")
    return _no_repeats(values)


def _registered(kind: str, names: list[str]) -> list[str]:
    for name in names:
        try:
            ALL_REGISTRIES[kind].get(name)
        except UserError as err:
            raise ValueError(str(err)) from None
    return names


def _user_dataset(name: str, err: ValueError, base: Path | None, data_root: str | None) -> None:
    """Accept a dataset name the registry lacks when a store of the user's own images has it in the grid's data
    root: its ``data_root`` key (relative to the grid file), else $FEWSHOT_SLA_DATA, else the default one. The
    ``--data-root`` flag of ``leaderboard run`` is not known while the file is read, so such a store must be in
    the grid's own data root; ``check_stores`` opens every store in the root the runs use before any runs."""
    from fewshot_sla.data.catalog import is_user_store
    from fewshot_sla.data.prepare import USER_NAME
    from fewshot_sla.data.root import ENV_VAR, resolve_data_root
    from fewshot_sla.data.store import store_path

    if not USER_NAME.match(name):
        raise err
    try:
        root = (base / data_root).resolve() if base is not None and data_root else resolve_data_root(None)
    except UserError:
        raise err from None
    if is_user_store(store_path(name, root)):
        return
    where = "its 'data_root'" if data_root else f"${ENV_VAR} or the default data root"
    raise ValueError(
        f"{err}; or, for your own images, prepare them into the grid's data root ({where}: {root}) with "
        f"'{command('data prepare', name, data_root=root, source='DIR', layout='imagefolder')}'"
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Entry(_Strict):
    method: str
    backbones: list[str] | None = None
    shots: list[int] | None = None
    config: str | None = None
    settings: dict[str, Any] | None = None
    init_from: dict[str, Any] | None = None  # grid axes -> values: the cell whose backbone each cell starts from

    @field_validator("init_from")
    @classmethod
    def _source_axes(cls, axes: dict[str, Any] | None) -> dict[str, Any] | None:
        if axes is None:
            return None
        unknown = sorted(set(axes) - set(AXES))
        if unknown or not axes:
            raise ValueError(
                f"init_from names the source cell by the grid axes that differ ({', '.join(AXES)}), "
                f"got {', '.join(unknown) or 'none'}"
            )
        return axes

    @field_validator("backbones", "shots", mode="before")
    @classmethod
    def _one(cls, value: Any) -> Any:
        return None if value is None else _listed(value)

    @field_validator("shots")
    @classmethod
    def _shots(cls, shots: list[int] | None) -> list[int] | None:
        return None if shots is None else _whole_numbers("shots", shots, 1)

    @field_validator("method")
    @classmethod
    def _method(cls, name: str) -> str:
        return _registered("learners", [name])[0]

    @field_validator("backbones")
    @classmethod
    def _backbones(cls, names: list[str] | None) -> list[str] | None:
        return None if names is None else _registered("backbones", _no_repeats(names))


class _Variant(_Strict):
    transform: str
    objective: str

    @field_validator("transform")
    @classmethod
    def _transform(cls, name: str) -> str:
        return _registered("transforms", [name])[0]

    @field_validator("objective")
    @classmethod
    def _objective(cls, name: str) -> str:
        return _registered("objectives", [name])[0]


class _Rule(_Strict):
    when: dict[str, list[Any]] = Field(min_length=1)
    config: str | None = None
    settings: dict[str, Any] | None = None

    @field_validator("when", mode="before")
    @classmethod
    def _lists(cls, when: Any) -> Any:
        return rule_matcher.listed(when)

    @field_validator("when")
    @classmethod
    def _axes(cls, when: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return rule_matcher.checked(when, AXES)


class _GridFile(_Strict):
    name: str | None = None
    description: str = ""
    data_root: str | None = None
    datasets: dict[str, dict[str, Any] | None] = Field(min_length=1)
    methods: list[_Entry] = Field(min_length=1)
    backbones: list[str] | None = None
    variants: list[_Variant] = Field(min_length=1)
    ways: list[int] = Field(default=[5], min_length=1)
    shots: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    settings: dict[str, Any] | None = None
    rules: list[_Rule] = Field(default_factory=list)
    slurm: dict[str, Any] | None = None

    @field_validator("datasets", mode="before")
    @classmethod
    def _dataset_list(cls, value: Any) -> Any:
        if isinstance(value, (list, str)):
            names = _no_repeats(_listed(value))
            return {name: None for name in names} if all(isinstance(n, str) for n in names) else value
        return value

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        base = (info.context or {}).get("base")
        for name in value:
            try:
                _registered("datasets", [name])
            except ValueError as err:
                _user_dataset(name, err, base, info.data.get("data_root"))
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names(cls, value: Any) -> Any:
        return [{"method": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("backbones", "ways", "shots", "seeds", mode="before")
    @classmethod
    def _scalars(cls, value: Any) -> Any:
        return None if value is None else _listed(value)

    @field_validator("backbones")
    @classmethod
    def _backbones(cls, names: list[str] | None) -> list[str] | None:
        return None if names is None else _registered("backbones", _no_repeats(names))

    @field_validator("ways", "shots", "seeds")
    @classmethod
    def _whole(cls, values: list[int], info: Any) -> list[int]:
        return _whole_numbers(info.field_name, values, {"ways": 2, "shots": 1, "seeds": 0}[info.field_name])

    @field_validator("variants")
    @classmethod
    def _distinct_variants(cls, variants: list[_Variant]) -> list[_Variant]:
        pairs = [(v.transform, v.objective) for v in variants]
        for i, pair in enumerate(pairs):
            if pair in pairs[:i]:
                raise ValueError(f"variant {pair[0]} + {pair[1]} is listed twice; remove one")
        return variants

    @field_validator("name")
    @classmethod
    def _word(cls, name: str | None) -> str | None:
        if name is not None and not _NAME.match(name):
            raise ValueError(f"'name' must be one word of letters, digits, '_', '.', '+' or '-', got {name!r}")
        return name


# ----- positions in the file, for error lines -----


class _Source:
    """The grid file's text positions, so that every error names the line it is about."""

    def __init__(self, path: Path, root: yaml.Node | None) -> None:
        self.path = path
        self.lines: dict[tuple[Any, ...], int] = {}
        if root is not None:
            self._walk(root, ())

    def _walk(self, node: yaml.Node, prefix: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    self.lines[prefix + (key.value,)] = key.start_mark.line + 1
                    self._walk(value, prefix + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                self.lines[prefix + (i,)] = value.start_mark.line + 1
                self._walk(value, prefix + (i,))

    def at(self, *path: Any) -> str:
        """``grid FILE line N`` for the deepest known prefix of ``path``."""
        key = tuple(p if isinstance(p, int) else str(p) for p in path)
        for end in range(len(key), 0, -1):
            line = self.lines.get(key[:end])
            if line is not None:
                return f"grid {self.path} line {line}"
        return f"grid {self.path}"


# ----- expansion into cells -----


@dataclass(frozen=True)
class _Recipe:
    """A recipe file's values (axis keys other than method and backbone dropped) and where it came from."""

    file: str
    values: dict[str, Any]
    method: str | None
    backbone: str | None


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file and expand it into cells; any mistake is a one-line UserError."""
    path = Path(path)
    root, data = read_yaml(path, "grid", "check the GRID path")
    src = _Source(path, root)
    if not isinstance(data, dict):
        raise UserError(
            f"grid {path} must hold a mapping with the keys datasets, methods, variants, shots (see benchmarks/grids/)"
        )
    try:
        grid = _GridFile.model_validate(data, context={"base": path.parent})
    except ValidationError as err:
        raise one_line_error(err, lambda loc: src.at(*loc), list(_GridFile.model_fields)) from None
    base = path.parent
    shared = _settings(grid.settings, src, ("settings",))
    datasets = {name: _settings(s, src, ("datasets", name)) for name, s in grid.datasets.items()}
    entries = [
        (
            e,
            _recipe(e.config, src, ("methods", i, "config"), base) if e.config else None,
            _settings(e.settings, src, ("methods", i, "settings")),
        )
        for i, e in enumerate(grid.methods)
    ]
    for i, (entry, recipe, _) in enumerate(entries):
        if recipe is not None and recipe.method not in (None, entry.method):
            raise UserError(
                f"{src.at('methods', i, 'config')}: {recipe.file} is a recipe for '{recipe.method}', "
                f"not '{entry.method}'; point 'config' at the right file"
            )
    rules = [
        (
            r,
            _recipe(r.config, src, ("rules", i, "config"), base) if r.config else None,
            _settings(r.settings, src, ("rules", i, "settings")),
        )
        for i, r in enumerate(grid.rules)
    ]
    for i, (rule, _, _) in enumerate(rules):
        if rule.config is None and rule.settings is None:
            raise UserError(f"{src.at('rules', i)}: rule {i + 1} sets nothing; give it 'config' and/or 'settings'")
    used = [False] * len(rules)
    cells: dict[str, Cell] = {}
    sources: dict[str, int] = {}  # cell name -> the index of the entry whose init_from names its source
    for (dataset, dataset_settings), (index, (entry, entry_recipe, entry_settings)) in itertools.product(
        datasets.items(), enumerate(entries)
    ):
        backbones = entry.backbones or grid.backbones or [entry_recipe.backbone if entry_recipe else None]
        for backbone, variant, n, k, seed in itertools.product(
            backbones, grid.variants, grid.ways, entry.shots or grid.shots, grid.seeds
        ):
            axes = {
                "dataset": dataset,
                "method": entry.method,
                "backbone": backbone,
                "transform": variant.transform,
                "objective": variant.objective,
                "ways": n,
                "shots": k,
                "seed": seed,
            }
            matched = [i for i, (rule, _, _) in enumerate(rules) if matches(rule.when, axes)]
            for i in matched:
                used[i] = True
            recipe = next((rules[i][1] for i in reversed(matched) if rules[i][1] is not None), entry_recipe)
            if recipe is not None:
                _check_recipe(recipe, axes, src)
            values = {**(recipe.values if recipe else {}), **shared, **dataset_settings, **entry_settings}
            for i in matched:
                values.update(rules[i][2])
            values.update(axes)
            if values["backbone"] is None:
                del values["backbone"]
            cell = _cell(values, src)
            if cell.name in cells:
                raise UserError(f"grid {path} gives the cell {cell.name} twice; remove the duplicate entry")
            cells[cell.name] = cell
            if entry.init_from is not None:
                sources[cell.name] = index
    for i, hit in enumerate(used):
        if not hit:
            raise UserError(
                f"{src.at('rules', i)}: rule {i + 1} matches no cell of the grid; "
                "fix its 'when' (values must be the grid's datasets, methods, backbones, ...)"
            )
    if sources:
        cells = _started_from_cells(cells, {name: grid.methods[i].init_from or {} for name, i in sources.items()}, src)
    root_path = (base / grid.data_root).resolve() if grid.data_root else None
    return Grid(
        grid.name or path.stem, path, grid.description.strip(), root_path, list(cells.values()), dict(grid.slurm or {})
    )


def _axes_of(config: RunConfig) -> tuple[Any, ...]:
    return tuple(getattr(config, axis) for axis in AXES)


def _started_from_cells(cells: dict[str, Cell], changes: dict[str, dict[str, Any]], src: _Source) -> dict[str, Cell]:
    """The cells with each ``init_from`` entry's cells started from their source cells: the cell with the axes the
    entry names changed (the rest its own), which must be in the grid with the same backbone, not start from the
    cell itself, directly or through others; renamed, since the source enters their identity (sources first)."""
    by_axes = {_axes_of(cell.config): name for name, cell in cells.items()}
    renamed: dict[str, Cell] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Cell:
        if name in renamed:
            return renamed[name]
        cell = cells[name]
        if name not in changes:
            renamed[name] = cell
            return cell
        axes = dict(zip(AXES, _axes_of(cell.config)))
        wanted = {**axes, **changes[name]}
        label = ", ".join(f"{axis} {wanted[axis]}" for axis in AXES)
        source = by_axes.get(tuple(wanted[axis] for axis in AXES))
        if source is None:
            raise UserError(
                f"grid {src.path}: cell {name} starts from the cell with {label}, which the grid does not have; "
                "add it to the grid or fix the entry's init_from"
            )
        if source == name or source in chain:
            raise UserError(f"grid {src.path}: cell {name} would start from itself through init_from; break the loop")
        started = resolve(source, (*chain, name))
        own, theirs = cell.config, started.config
        if (own.backbone, own.backbone_options) != (theirs.backbone, theirs.backbone_options):
            raise UserError(
                f"grid {src.path}: cell {name} starts from {started.name}, whose backbone is {theirs.backbone} "
                f"{theirs.backbone_options or ''}, not {own.backbone} {own.backbone_options or ''}; give both entries "
                "the same backbones"
            )
        config = cell.config.updated({"init_from": SOURCE_CELL + started.name}, f"grid {src.path}")
        renamed[name] = Cell(cell_name(config), cell.values, config, started.name)
        return renamed[name]

    for name in cells:
        resolve(name, ())
    return {cell.name: cell for cell in renamed.values()}


def cell_identity(config: RunConfig) -> str:
    """8 hex digits naming a resolved configuration (settings that never change results left out)."""
    return hashlib.sha256(json.dumps(identity_values(config), sort_keys=True).encode()).hexdigest()[:8]


def cell_name(config: RunConfig) -> str:
    """``<dataset>-<method>-<backbone>-<N>w<K>s-<transform>-<objective>-s<seed>-<identity>``."""
    c = config
    return (
        f"{c.dataset}-{c.method}-{c.backbone}-{c.ways}w{c.shots}s-{c.transform}-{c.objective}-s{c.seed}"
        f"-{cell_identity(c)}"
    )


def _cell(values: dict[str, Any], src: _Source) -> Cell:
    """Resolve one cell's configuration (its recipe filled in, ranges checked) and name it."""
    label = (
        f"{values['dataset']} / {values['method']} / {values.get('backbone') or 'recipe backbone'} / "
        f"{values['transform']} + {values['objective']} / {values['ways']}-way {values['shots']}-shot"
    )
    try:
        resolved = apply_recipe(RunConfig.from_mapping(values, f"grid {src.path}"))
    except UserError as err:
        # The grid set the value, not a flag: "; fix <setting>" (config_error's hint) becomes "; fix it in the grid".
        hint = re.escape(f"; fix {setting('NAME')}").replace("NAME", r"\w+")
        reason = re.sub(hint + "$", "; fix it in the grid", err.message)
        raise UserError(f"grid {src.path}, cell {label}: {reason}") from None
    return Cell(cell_name(resolved), values, resolved)


def _check_recipe(recipe: _Recipe, axes: Mapping[str, Any], src: _Source) -> None:
    """A recipe file used for a cell must be for that cell's method and backbone."""
    for key, own in (("method", recipe.method), ("backbone", recipe.backbone)):
        if own is not None and axes[key] is not None and own != axes[key]:
            raise UserError(
                f"grid {src.path}: recipe file {recipe.file} is for {key} '{own}' but is used for "
                f"{key} '{axes[key]}'; point 'config' at a recipe for that {key}"
            )


def _settings(value: dict[str, Any] | None, src: _Source, where: tuple[Any, ...]) -> dict[str, Any]:
    """A checked mapping of RunConfig keys (no grid axis among them), values converted to their types."""
    if not value:
        return {}
    for key in value:
        if key in AXES:
            raise UserError(
                f"{src.at(*where, key)}: '{key}' is a grid axis, not a setting; give it under '{AXIS_HOME[key]}'"
            )
    return {key: check_values({key: item}, src.at(*where, key))[key] for key, item in value.items()}


def _recipe(value: str, src: _Source, where: tuple[Any, ...], base: Path) -> _Recipe:
    """Read a recipe file named by a ``config`` key (relative to the grid file)."""
    file = base / value
    if not file.is_file():
        raise UserError(
            f"{src.at(*where)}: recipe file {file} does not exist; fix the 'config' path (relative to the grid file)"
        )
    values, _ = read_config_values(file)
    backbone = values.get("backbone")
    if backbone is not None:
        try:
            _registered("backbones", [backbone])
        except ValueError as err:
            raise UserError(f"{file}: {err}") from None
    kept = {k: v for k, v in values.items() if k not in AXES or k == "backbone"}
    return _Recipe(str(file), kept, values.get("method"), backbone)
