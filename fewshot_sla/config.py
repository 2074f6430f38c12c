"""The configuration of one run: a pydantic model holding every knob, read from and written to YAML.

Precedence, lowest first: the method's published recipe (``engine/recipes.py`` fills every field left
``None``), then a ``--config`` YAML file, then command-line flags. The resolved configuration (no ``None``
left in recipe fields) is written to each run directory as ``config.yaml``. Types are strict (``5`` is not
``true``, ``"5"`` is not ``5``; integers are accepted where numbers are expected), unknown keys are errors,
and every mistake is one ``UserError`` line naming the file line or the flag.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fewshot_sla.errors import UserError
from fewshot_sla.validation import one_line_error
from fewshot_sla.yaml_file import key_lines, read_yaml

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


T = TypeVar("T")
# Fields that may change when a run is resumed (where and how it executes or is logged, not what it computes).
RESUME_FREE_KEYS = ("device", "micro_batch", "checkpointing", "log", "checkpoint_every")


def required(value: T | None, name: str) -> T:
    """A field that the recipe resolves (``apply_recipe``), read from a resolved configuration."""
    if value is None:
        raise ValueError(f"{name} is unset: resolve the configuration with engine.recipes.apply_recipe first")
    return value


def _positive() -> Any:
    """An optional whole number >= 1 (None: the recipe's value)."""
    return Field(default=None, ge=1)


def _number(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    """An optional finite number above ``gt`` or from ``ge`` on, up to ``le`` (None: the recipe's value)."""
    return Field(default=None, allow_inf_nan=False, gt=gt, ge=ge, le=le)


MAX_EPISODE_SET = 1_000_000  # test or validation episodes of one set (a set of 10^6 5-way episodes is ~1 GB)
MAX_IMAGE_SIZE = 1024  # pixels a side of the images a run resizes to (a store's own limit is in data/prepare.py)


class RunConfig(BaseModel):
    """Every knob of a run: what to train, on what, how, and how to evaluate it.

    Fields left ``None`` take the method's published recipe, scaled to the dataset and episode budget.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    # What to train and test.
    method: str = "protonet"
    dataset: str = "synthetic"
    backbone: str | None = None
    transform: str = "rotation"
    objective: str = "sla"
    backbone_options: dict[str, Any] = Field(default_factory=dict)
    learner_options: dict[str, Any] = Field(default_factory=dict)
    # Resize every image to this size on the device (None keeps the store's).
    image_size: int | None = Field(default=None, ge=1, le=MAX_IMAGE_SIZE)
    # Test episodes.
    ways: int = Field(default=5, ge=2)
    shots: int = Field(default=1, ge=1)
    queries: int = Field(default=15, ge=1)
    eval_episodes: int = Field(default=1000, ge=1, le=MAX_EPISODE_SET)
    episodes_file: str | None = None
    # Meta-training (None: the recipe's value).
    train_ways: int | None = Field(default=None, ge=2)
    train_shots: int | None = _positive()
    train_queries: int | None = _positive()
    train_episodes: int | None = _positive()
    meta_batch: int | None = _positive()
    optimizer: Literal["sgd", "adam"] | None = None
    lr: float | None = _number(gt=0)
    momentum: float | None = _number(ge=0, le=1)
    nesterov: bool | None = None
    weight_decay: float | None = _number(ge=0)
    lr_milestones: list[float] | None = None  # fractions of lr_schedule_episodes where the LR changes
    lr_factors: list[float] | None = None  # LR multiplier (relative to lr) from each milestone on
    # The episodes the milestones are fractions of (None: the run's train_episodes, the schedule compressed or
    # stretched to the budget; a recipe sets its published budget, so a shorter run follows its first part).
    lr_schedule_episodes: int | None = _positive()
    augment: bool | None = None  # random crop / flip / colour jitter on training images
    val_episodes: int = Field(default=200, ge=1, le=MAX_EPISODE_SET)
    # Validation episodes' ways and shots (None: the test's ways and shots), e.g. 5-way validation of a 20-way run
    # whose dataset has fewer than 20 validation classes; their queries are the test's.
    val_ways: int | None = Field(default=None, ge=2)
    val_shots: int | None = _positive()
    val_every: int | None = _positive()  # training episodes between validations (and checkpoints)
    # Minutes of training between checkpoints besides those of validations (a crash loses at most this much).
    checkpoint_every: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    # Execution.
    seed: int = Field(default=0, ge=0, lt=2**63)
    device: str = "auto"
    amp: bool = False
    eval_batch: int = Field(default=20, ge=1)  # episodes per evaluation batch
    feature_cache: bool = True  # cache embeddings for EmbeddingLearners at evaluation
    # Scale (None: chosen by the memory preflight, engine/memory.py).
    micro_batch: int | None = _positive()  # episodes per backward pass in each process (gradients accumulate)
    checkpointing: bool | None = None  # recompute the backbone's stage activations in backward instead of storing
    sync_batchnorm: bool = False  # with several processes on GPUs: BatchNorm statistics over all processes
    # Experiment logging: trackers (``LOGGERS`` names, e.g. tensorboard) besides metrics.jsonl, which is always on.
    log: list[str] = Field(default_factory=list)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{value}'")
        return value

    @field_validator("log")
    @classmethod
    def _log(cls, names: list[str]) -> list[str]:
        for i, name in enumerate(names):
            if not name.strip() or name in names[:i]:
                raise ValueError(f"log must list distinct logger names, got {names}")
        return names

    @field_validator("lr_milestones", "lr_factors")
    @classmethod
    def _finite(cls, values: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if values is not None and not all(math.isfinite(v) for v in values):
            raise ValueError(f"{info.field_name} must hold finite numbers, got {values}")
        return values

    @model_validator(mode="after")
    def _schedule(self) -> RunConfig:
        milestones, factors = self.lr_milestones, self.lr_factors
        if (milestones is None) != (factors is None) or (milestones and len(milestones) != len(factors or [])):
            raise ValueError("lr_milestones and lr_factors must be given together with the same length")
        if milestones:
            if any(not 0 < m < 1 for m in milestones) or sorted(milestones) != list(milestones):
                raise ValueError(f"lr_milestones must be increasing fractions in (0, 1), got {milestones}")
            if any(f <= 0 for f in factors or []):
                raise ValueError(f"lr_factors must be positive, got {factors}")
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every configuration key, in file order."""
        return list(cls.model_fields)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML/JSON ready) of every field, in file order."""
        return self.model_dump()

    def to_yaml(self) -> str:
        """The configuration as YAML text, one key per line, in field order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def updated(self, values: Mapping[str, Any], source: str = "arguments") -> RunConfig:
        """A copy with ``values`` applied (unknown keys, ill-typed or out-of-range values are UserErrors)."""
        return RunConfig.from_mapping({**self.to_dict(), **values}, source)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], source: str = "configuration", lines: Mapping[str, int] | None = None
    ) -> RunConfig:
        """A configuration from defaults plus ``values``; ``lines`` (key -> line) locate errors in a file."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            raise config_error(err, source, lines) from None


def config_error(err: ValidationError, source: str, lines: Mapping[str, int] | None = None) -> UserError:
    """A pydantic error on a run configuration as one line; flags are named when the source is the CLI."""

    def where(loc: tuple[Any, ...]) -> str:
        key = str(loc[0]) if loc else ""
        return f"{source} line {lines[key]}" if lines and key in lines else source

    def hint(loc: tuple[Any, ...]) -> str:
        return f"fix --{str(loc[0]).replace('_', '-')}" if source == "command line" and loc else ""

    return one_line_error(err, where, RunConfig.field_names(), hint)


def load_config(path: str | Path, fix: str = "check the --config path") -> RunConfig:
    """Read a YAML config file; malformed YAML or an unknown/ill-typed key is a UserError naming the line.
    ``fix`` is the advice when it cannot be read."""
    values, lines = read_config_values(path, fix)
    return RunConfig.from_mapping(values, f"config file {path}", lines)


def read_config_values(path: str | Path, fix: str = "check the --config path") -> tuple[dict[str, Any], dict[str, int]]:
    """The key: value pairs a YAML config file sets, checked against the RunConfig fields, with their lines."""
    path = Path(path)
    root, data = read_yaml(path, "config file", fix)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value lines, got {type(data).__name__}")
    lines = key_lines(root)
    check_values(data, f"config file {path}", lines)
    return data, lines


def check_values(values: Mapping[str, Any], source: str, lines: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Check ``values`` as a partial RunConfig (keys, types, ranges of the fields given); the checked values."""
    try:
        partial = RunConfig.model_validate({**RunConfig().to_dict(), **values})
    except ValidationError as err:
        raise config_error(err, source, lines) from None
    return {key: getattr(partial, key) for key in values}
