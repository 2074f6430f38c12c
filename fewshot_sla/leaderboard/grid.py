"""Grid files: a YAML product of datasets x methods x backbones x variants x ways x shots x seeds -> run cells.

A grid file (see ``benchmarks/grids/``)::

    name: paper                  # optional, default the file name; names the default runs folder
    description: free text       # optional
    data_root: ../../.data       # optional, relative to this file (the global --data-root flag wins)
    datasets: [miniimagenet, cub]          # or a mapping  name: {RunConfig key: value, ...}
    methods:                               # each a name, or a mapping:
      - maml
      - method: protonet
        backbones: [conv4]                 # optional: else the grid's backbones, else the config's, else the recipe's
        config: ../configs/protonet-conv4.yaml   # optional recipe file (RunConfig YAML), relative to this file
        settings: {train_episodes: 600}    # optional RunConfig keys for this entry
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
        config: ../configs/metaoptnet-svm-resnet12-cifarfs.yaml   # replaces the entry's recipe file
        settings: {train_shots: 5}
    slurm: {timeout_min: 600}              # optional submitit parameters for --executor slurm

A cell's configuration layers, lowest first: its recipe file (the entry's ``config``, or the last matching
rule's), ``settings``, the dataset's settings, the entry's ``settings``, the matching rules' ``settings``,
then the cell's axes (dataset, method, backbone, transform, objective, ways, shots, seed), which no settings
block may set. A recipe file must be for the cell's method and backbone when it names them; its dataset,
ways, transform and objective are replaced by the cell's. A rule on ``backbone`` matches only cells whose
backbone the grid or the recipe file names, and a rule that matches no cell is an error (a likely typo).
Everything is checked before anything runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from fewshot_sla.config import RunConfig, read_config_values
from fewshot_sla.errors import UserError
from fewshot_sla.yaml_file import read_yaml

AXES = ("dataset", "method", "backbone", "transform", "objective", "ways", "shots", "seed")
AXIS_HOME = {"dataset": "datasets", "method": "methods", "backbone": "backbones", "transform": "variants",
             "objective": "variants", "ways": "ways", "shots": "shots", "seed": "seeds"}
TOP_KEYS = ("name", "description", "data_root", "datasets", "methods", "backbones", "variants", "ways", "shots",
            "seeds", "settings", "rules", "slurm")
REQUIRED_KEYS = ("datasets", "methods", "variants", "shots")
ENTRY_KEYS = ("method", "backbones", "config", "settings")
RULE_KEYS = ("when", "config", "settings")
VARIANT_KEYS = ("transform", "objective")
HASH_FREE_KEYS = ("device",)  # settings that never change a cell's results, so not part of its identity
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Cell:
    """One run of a grid: the RunConfig values it sets and a deterministic folder name derived from them."""

    name: str
    values: dict[str, Any]

    def config(self) -> RunConfig:
        """The cell's run configuration (recipe fields still unset)."""
        return RunConfig.from_mapping(self.values, f"cell {self.name}")

    def to_yaml(self) -> str:
        """The values as a ``fewshot-sla run --config`` file."""
        return yaml.safe_dump(self.values, sort_keys=False, default_flow_style=False)


@dataclass(frozen=True)
class Grid:
    """A checked grid file: its cells in expansion order plus where the data and the Slurm settings come from."""

    name: str
    path: Path
    description: str
    data_root: Path | None
    cells: list[Cell]
    slurm: dict[str, Any]


@dataclass(frozen=True)
class _Recipe:
    """A recipe file's values (axis keys other than method and backbone dropped) and where it came from."""

    file: str
    values: dict[str, Any]
    method: str | None
    backbone: str | None


@dataclass(frozen=True)
class _Entry:
    method: str
    backbones: list[str] | None
    recipe: _Recipe | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class _Rule:
    index: int
    when: dict[str, list[Any]]
    recipe: _Recipe | None
    settings: dict[str, Any]

    def matches(self, axes: Mapping[str, Any]) -> bool:
        return all(axes[key] in values for key, values in self.when.items())


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


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file and expand it into cells; any mistake is a one-line UserError."""
    path = Path(path)
    root, data = read_yaml(path, "grid", "GRID")
    src = _Source(path, root)
    if not isinstance(data, dict):
        raise UserError(f"grid {path} must hold a mapping with the keys {', '.join(REQUIRED_KEYS)} "
                        "(see benchmarks/grids/)")
    _check_keys(data, TOP_KEYS, src, ())
    for key in REQUIRED_KEYS:
        if data.get(key) in (None, [], {}):
            raise UserError(f"grid {path} has no '{key}'; add '{key}:' with at least one entry")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{src.at('name')}: 'name' must be one word of letters, digits, '_', '.', '+' or '-', "
                        f"got {name!r}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{src.at('description')}: 'description' must be text")
    data_root = data.get("data_root")
    if data_root is not None and not isinstance(data_root, str):
        raise UserError(f"{src.at('data_root')}: 'data_root' must be a folder path")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict) or not all(isinstance(k, str) for k in slurm):
        raise UserError(f"{src.at('slurm')}: 'slurm' must be a mapping of submitit parameters, "
                        "e.g. {timeout_min: 600, slurm_partition: gpu}")
    base = path.parent
    shared = _settings(data.get("settings"), src, ("settings",))
    datasets = _datasets(data["datasets"], src)
    entries = _entries(data["methods"], src, base)
    default_backbones = _names(data["backbones"], src, ("backbones",), "backbone") if "backbones" in data else None
    variants = _variants(data["variants"], src)
    ways = _ints(data.get("ways", [5]), src, ("ways",), minimum=2)
    shots = _ints(data["shots"], src, ("shots",), minimum=1)
    seeds = _ints(data.get("seeds", [0]), src, ("seeds",), minimum=0)
    rules = _rules(data.get("rules"), src, base)
    used = [False] * len(rules)
    cells: dict[str, Cell] = {}
    for (dataset, dataset_settings), entry in itertools.product(datasets.items(), entries):
        backbones = entry.backbones or default_backbones or [entry.recipe.backbone if entry.recipe else None]
        for backbone, (transform, objective), n, k, seed in itertools.product(backbones, variants, ways, shots,
                                                                            seeds):
            axes = {"dataset": dataset, "method": entry.method, "backbone": backbone, "transform": transform,
                    "objective": objective, "ways": n, "shots": k, "seed": seed}
            matched = [rule for rule in rules if rule.matches(axes)]
            for rule in matched:
                used[rule.index] = True
            recipe = next((r.recipe for r in reversed(matched) if r.recipe is not None), entry.recipe)
            if recipe is not None:
                _check_recipe(recipe, axes, src)
            values = {**(recipe.values if recipe else {}), **shared, **dataset_settings, **entry.settings}
            for rule in matched:
                values.update(rule.settings)
            values.update(axes)
            if values["backbone"] is None:
                del values["backbone"]
            cell = _cell(values, src)
            if cell.name in cells:
                raise UserError(f"grid {path} gives the cell {cell.name} twice; remove the duplicate entry")
            cells[cell.name] = cell
    for rule, hit in zip(rules, used):
        if not hit:
            raise UserError(f"{src.at('rules', rule.index)}: rule {rule.index + 1} matches no cell of the grid; "
                            "fix its 'when' (values must be the grid's datasets, methods, backbones, ...)")
    root_path = (base / data_root).resolve() if data_root else None
    return Grid(name, path, description.strip(), root_path, list(cells.values()), dict(slurm))


def cell_name(values: Mapping[str, Any], backbone: str) -> str:
    """``<dataset>-<method>-<backbone>-<N>w<K>s-<transform>-<objective>-s<seed>-<hash>``; the 8 hex digits
    cover every value of the cell, so that a changed setting never reuses an old run folder."""
    identity = {k: v for k, v in values.items() if k not in HASH_FREE_KEYS}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    v = values
    return (f"{v['dataset']}-{v['method']}-{backbone}-{v['ways']}w{v['shots']}s-{v['transform']}-{v['objective']}"
            f"-s{v['seed']}-{digest}")


def _cell(values: dict[str, Any], src: _Source) -> Cell:
    """Check one cell's full configuration (ranges, and the recipe it resolves to) and name it."""
    from fewshot_sla.engine.recipes import apply_recipe

    label = (f"{values['dataset']} / {values['method']} / {values.get('backbone') or 'recipe backbone'} / "
             f"{values['transform']} + {values['objective']} / {values['ways']}-way {values['shots']}-shot")
    try:
        resolved = apply_recipe(RunConfig.from_mapping(values, f"grid {src.path}").validate())
    except UserError as err:
        reason = re.sub(r"; fix --[\w-]+$", "; fix it in the grid", str(err))  # the grid, not a flag, set it
        raise UserError(f"grid {src.path}, cell {label}: {reason}") from None
    return Cell(cell_name(values, str(resolved.backbone)), values)


def _check_recipe(recipe: _Recipe, axes: Mapping[str, Any], src: _Source) -> None:
    """A recipe file used for a cell must be for that cell's method and backbone."""
    for key, own in (("method", recipe.method), ("backbone", recipe.backbone)):
        if own is not None and axes[key] is not None and own != axes[key]:
            raise UserError(f"grid {src.path}: recipe file {recipe.file} is for {key} '{own}' but is used for "
                            f"{key} '{axes[key]}'; point 'config' at a recipe for that {key}")


def _check_keys(mapping: Mapping[str, Any], valid: tuple[str, ...], src: _Source, where: tuple[Any, ...]) -> None:
    for key in mapping:
        if key not in valid:
            raise UserError(f"{src.at(*where, key)}: unknown key '{key}'; valid keys here: {', '.join(valid)}")


def _settings(value: Any, src: _Source, where: tuple[Any, ...]) -> dict[str, Any]:
    """A checked mapping of RunConfig keys (no grid axis among them), values converted to their types."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{src.at(*where)}: '{where[-1]}' must be a mapping of run settings (RunConfig keys)")
    for key in value:
        if key in AXES:
            raise UserError(f"{src.at(*where, key)}: '{key}' is a grid axis, not a setting; "
                            f"give it under '{AXIS_HOME[key]}'")
    return {key: getattr(RunConfig.from_mapping({key: item}, src.at(*where, key)), key) for key, item in value.items()}


def _known(kind: str, name: Any, where: str) -> str:
    """``name`` when it is registered as a ``kind`` (dataset, learner, ...), else a UserError at ``where``."""
    from fewshot_sla.registry import ALL_REGISTRIES

    if not isinstance(name, str):
        raise UserError(f"{where}: {kind} names must be text, got {name!r}")
    try:
        ALL_REGISTRIES[kind + "s"].get(name)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return name


def _list(value: Any, src: _Source, where: tuple[Any, ...], what: str) -> list[Any]:
    """A non-empty list (a single scalar is a list of one) without repeated items."""
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(item, (dict, list)) or item is None for item in items):
        raise UserError(f"{src.at(*where)}: '{where[-1]}' must be {what} or a non-empty list of them")
    for i, item in enumerate(items):
        if item in items[:i]:
            raise UserError(f"{src.at(*where, i)}: {item!r} is listed twice in '{where[-1]}'; remove one")
    return items


def _names(value: Any, src: _Source, where: tuple[Any, ...], kind: str) -> list[str]:
    """A non-empty list of registered ``kind`` names."""
    items = _list(value, src, where, f"a {kind} name")
    return [_known(kind, item, src.at(*where, i)) for i, item in enumerate(items)]


def _ints(value: Any, src: _Source, where: tuple[Any, ...], minimum: int) -> list[int]:
    """A non-empty list of integers >= ``minimum``."""
    items = _list(value, src, where, "an integer")
    for i, item in enumerate(items):
        if not isinstance(item, int) or isinstance(item, bool) or item < minimum:
            raise UserError(f"{src.at(*where, i)}: '{where[-1]}' entries must be integers >= {minimum}, got {item!r}")
    return items


def _datasets(value: Any, src: _Source) -> dict[str, dict[str, Any]]:
    """Dataset name -> its settings, from a list of names or a mapping name: settings."""
    if isinstance(value, dict):
        return {_known("dataset", name, src.at("datasets", name)): _settings(s, src, ("datasets", name))
                for name, s in value.items()}
    return {name: {} for name in _names(value, src, ("datasets",), "dataset")}


def _recipe(value: Any, src: _Source, where: tuple[Any, ...], base: Path) -> _Recipe:
    """Read a recipe file named by a ``config`` key (relative to the grid file)."""
    if not isinstance(value, str):
        raise UserError(f"{src.at(*where)}: 'config' must be a file path")
    file = base / value
    if not file.is_file():
        raise UserError(f"{src.at(*where)}: recipe file {file} does not exist; fix the 'config' path "
                        "(relative to the grid file)")
    values = read_config_values(file)
    backbone = values.get("backbone")
    if backbone is not None:
        _known("backbone", backbone, str(file))
    kept = {k: v for k, v in values.items() if k not in AXES or k == "backbone"}
    return _Recipe(str(file), kept, values.get("method"), backbone)


def _entries(value: Any, src: _Source, base: Path) -> list[_Entry]:
    """The method entries: a name, or {method, backbones, config, settings}."""
    if not isinstance(value, list):
        raise UserError(f"{src.at('methods')}: 'methods' must be a list of method names or "
                        "{method: NAME, backbones: [...], config: FILE, settings: {...}} entries")
    out = []
    for i, item in enumerate(value):
        where = ("methods", i)
        if isinstance(item, str):
            out.append(_Entry(_known("learner", item, src.at(*where)), None, None, {}))
            continue
        if not isinstance(item, dict) or "method" not in item:
            raise UserError(f"{src.at(*where)}: each method entry is a name or a mapping with a 'method' key")
        _check_keys(item, ENTRY_KEYS, src, where)
        method = _known("learner", item["method"], src.at(*where, "method"))
        recipe = _recipe(item["config"], src, (*where, "config"), base) if "config" in item else None
        if recipe is not None and recipe.method not in (None, method):
            raise UserError(f"{src.at(*where, 'config')}: {recipe.file} is a recipe for '{recipe.method}', "
                            f"not '{method}'; point 'config' at the right file")
        backbones = _names(item["backbones"], src, (*where, "backbones"), "backbone") if "backbones" in item else None
        out.append(_Entry(method, backbones, recipe, _settings(item.get("settings"), src, (*where, "settings"))))
    return out


def _variants(value: Any, src: _Source) -> list[tuple[str, str]]:
    """The (transform, objective) pairs, each a registered name."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{src.at('variants')}: 'variants' must be a list like "
                        "[{transform: none, objective: baseline}, {transform: rotation, objective: sla}]")
    out: list[tuple[str, str]] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise UserError(f"{src.at('variants', i)}: each variant is a mapping with the keys transform, objective")
        _check_keys(entry, VARIANT_KEYS, src, ("variants", i))
        for key in VARIANT_KEYS:
            if key not in entry:
                raise UserError(f"{src.at('variants', i)}: variant {i + 1} needs '{key}: <name>'")
        pair = (_known("transform", entry["transform"], src.at("variants", i, "transform")),
                _known("objective", entry["objective"], src.at("variants", i, "objective")))
        if pair in out:
            raise UserError(f"{src.at('variants', i)}: variant {pair[0]} + {pair[1]} is listed twice; remove one")
        out.append(pair)
    return out


def _rules(value: Any, src: _Source, base: Path) -> list[_Rule]:
    """The rules: which cells (``when``) get another recipe file and/or extra settings."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{src.at('rules')}: 'rules' must be a list of {{when: {{...}}, config: FILE, "
                        "settings: {...}} entries")
    out = []
    for i, item in enumerate(value):
        where = ("rules", i)
        if not isinstance(item, dict) or not isinstance(item.get("when"), dict) or not item["when"]:
            raise UserError(f"{src.at(*where)}: each rule needs 'when: {{axis: value, ...}}' "
                            f"(axes: {', '.join(AXES)})")
        _check_keys(item, RULE_KEYS, src, where)
        _check_keys(item["when"], AXES, src, (*where, "when"))
        if "config" not in item and "settings" not in item:
            raise UserError(f"{src.at(*where)}: rule {i + 1} sets nothing; give it 'config' and/or 'settings'")
        when = {key: _list(v, src, (*where, "when", key), "a value") for key, v in item["when"].items()}
        recipe = _recipe(item["config"], src, (*where, "config"), base) if "config" in item else None
        out.append(_Rule(i, when, recipe, _settings(item.get("settings"), src, (*where, "settings"))))
    return out
