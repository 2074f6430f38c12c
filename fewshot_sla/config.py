"""The configuration of one run: a dataclass holding every knob, read from and written to YAML.

Precedence, lowest first: the method's published recipe (``engine/recipes.py`` fills every field left
``None``), then a ``--config`` YAML file, then command-line flags. The resolved configuration (no ``None``
left in recipe fields) is written to each run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fewshot_sla.errors import UserError
from fewshot_sla.yaml_file import read_yaml

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class RunConfig:
    """Every knob of a run: what to train, on what, how, and how to evaluate it.

    Fields left ``None`` take the method's published recipe, scaled to the dataset and episode budget.
    """

    # What to train and test.
    method: str = "protonet"
    dataset: str = "synthetic"
    backbone: str | None = None
    transform: str = "rotation"
    objective: str = "sla"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    learner_options: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # resize every image to this size on the device; None keeps the store's
    # Test episodes.
    ways: int = 5
    shots: int = 1
    queries: int = 15
    eval_episodes: int = 1000
    episodes_file: str | None = None
    # Meta-training (None: the recipe's value).
    train_ways: int | None = None
    train_shots: int | None = None
    train_queries: int | None = None
    train_episodes: int | None = None
    meta_batch: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    lr_milestones: list[float] | None = None  # fractions of train_episodes where the LR changes
    lr_factors: list[float] | None = None  # LR multiplier (relative to lr) from each milestone on
    augment: bool | None = None  # random crop / flip / colour jitter on training images
    val_episodes: int = 200
    val_every: int | None = None  # training episodes between validations (and checkpoints)
    # Execution.
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    eval_batch: int = 20  # episodes per evaluation batch
    feature_cache: bool = True  # cache embeddings for EmbeddingLearners at evaluation

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every configuration key, in file order."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML/JSON ready) of every field, in file order."""
        return {name: _plain(getattr(self, name)) for name in self.field_names()}

    def to_yaml(self) -> str:
        """The configuration as YAML text, one key per line, in field order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def updated(self, values: Mapping[str, Any], source: str = "arguments") -> "RunConfig":
        """A copy with ``values`` applied (unknown keys and ill-typed values are UserErrors)."""
        current = self.to_dict()
        for key, value in values.items():
            current[key] = _check_value(key, value, source)
        return RunConfig(**current)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "configuration") -> "RunConfig":
        """A configuration from defaults plus ``values``."""
        return cls().updated(values, source)

    def validate(self) -> "RunConfig":
        """Check value ranges (names are checked against the registries when the run is built)."""
        positive = ["ways", "shots", "queries", "eval_episodes", "val_episodes", "eval_batch"]
        positive += ["train_ways", "train_shots", "train_queries", "train_episodes", "meta_batch", "val_every"]
        positive += ["image_size"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be a positive integer, got {value}; fix --{_flag(name)}")
        if self.ways < 2:
            raise UserError(f"ways must be at least 2, got {self.ways}; fix --ways")
        if self.train_ways is not None and self.train_ways < 2:
            raise UserError(f"train_ways must be at least 2, got {self.train_ways}; fix --train-ways")
        if not DEVICE_PATTERN.match(self.device):
            raise UserError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'; fix --device")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (name == "lr" and value == 0)):
                raise UserError(f"{name} must be {'positive' if name == 'lr' else 'non-negative'}, got {value}")
        milestones, factors = self.lr_milestones, self.lr_factors
        if (milestones is None) != (factors is None) or (milestones and len(milestones) != len(factors or [])):
            raise UserError("lr_milestones and lr_factors must be given together with the same length")
        if milestones:
            if any(not 0 < m < 1 for m in milestones) or sorted(milestones) != list(milestones):
                raise UserError(f"lr_milestones must be increasing fractions in (0, 1), got {milestones}")
            if any(f <= 0 for f in factors or []):
                raise UserError(f"lr_factors must be positive, got {factors}")
        return self


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config file; malformed YAML or an unknown/ill-typed key is a UserError naming the line."""
    return RunConfig.from_mapping(read_config_values(path), f"config file {path}")


def read_config_values(path: str | Path) -> dict[str, Any]:
    """The checked key: value pairs a YAML config file sets (UserErrors name the file and line)."""
    path = Path(path)
    root, data = read_yaml(path, "config file", "--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value lines, got {type(data).__name__}")
    lines = {}
    if isinstance(root, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
    valid = set(RunConfig.field_names())
    for key in data:
        if key not in valid:
            raise UserError(
                f"config file {path} line {lines.get(key, '?')}: unknown key '{key}'; "
                f"valid keys: {', '.join(RunConfig.field_names())}"
            )
    return {key: _check_value(key, value, f"config file {path} line {lines.get(key, '?')}")
            for key, value in data.items()}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_HINTS = typing.get_type_hints(RunConfig)


def _check_value(key: str, value: Any, source: str) -> Any:
    """``value`` converted to ``key``'s declared type, or a UserError saying what was expected."""
    if key not in _HINTS:
        raise UserError(f"{source}: unknown key '{key}'; valid keys: {', '.join(RunConfig.field_names())}")
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise UserError(f"{source}: '{key}' cannot be empty; give a value or remove the key")
    origin = typing.get_origin(base) or base
    ok: bool
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        value = [float(v) for v in value] if ok else value
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        value = dict(value) if ok else value
    else:  # pragma: no cover - every field type is handled above
        raise TypeError(f"unhandled config type {hint} for {key}")
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            origin, "a list of numbers" if origin is list else "a mapping of name: value"
        )
        raise UserError(f"{source}: '{key}' must be {expected}, got {value!r}")
    return value
