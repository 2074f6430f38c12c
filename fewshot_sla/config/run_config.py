"""The configuration of one run: a pydantic model holding every knob, read from and written to YAML.

Precedence, lowest first: the method's published recipe (``config/recipes.py`` fills every field left
``None``), then a ``--config`` YAML file, then command-line flags. The resolved configuration (no ``None``
left in recipe fields) is written to each run directory as ``config.yaml``. Types are strict (``5`` is not
``true``, ``"5"`` is not ``5``; integers are accepted where numbers are expected), unknown keys are errors,
and every mistake is one ``UserError`` line naming the file line or the flag.

One definition per field. Each ``RunConfig`` field is declared once, here, as ``name: Annotated[type, Knob(...)] =
Field(default, range)``: pydantic's ``Field`` holds what validation needs (default, range), the ``Knob`` marker
everything else: the one-line help, the ``run`` flag (or none: files and ``--set`` only) and its metavar, how an
unset default is described, and three properties:

- ``affects_results``: whether the value can change a run's numbers. ``False`` only for where and how a run
  executes or is logged: ``device``, ``eval_batch``, ``feature_cache``, ``checkpointing`` (bit-identical
  gradients and BatchNorm statistics, ``tests/unit/engine/test_scale.py``), ``log`` and ``checkpoint_every``.
  ``micro_batch`` does change results: with BatchNorm in training mode each micro-batch is normalised by its own
  statistics (``tests/unit/engine/test_scale.py``), so it stays in.
- ``identity``: whether the value enters a grid cell's identity (the hash ending its folder name,
  ``config/grid.py``): ``always`` for what affects results, ``never`` for what does not, ``when_set`` for
  fields added after grids were first run whose unset value means what every earlier cell did (``val_ways``,
  ``val_shots``), so that adding them renamed no existing cell.
- ``free_on_resume``: whether ``--resume`` may change it (``device``, ``micro_batch``, ``checkpointing``, ``log``,
  ``checkpoint_every``: what the machine a run resumes on needs, or what it logs and how often it saves).

The marker is an ``Annotated`` class rather than ``description=`` / ``json_schema_extra={...}``: a frozen dataclass
is typed and checked by mypy where it is written (a dict of extras is not), pydantic keeps it in
``FieldInfo.metadata`` without it touching validation or any JSON schema, and its properties have defaults, so a
field states only what is special about it. The lists the rest of the suite used to keep by hand are derived from
it: ``RESUME_FREE_KEYS`` (``engine/plan.py``, ``engine/train.py``), ``RESULT_NEUTRAL_KEYS`` (``leaderboard/build.py``
adds the seed and the episode file, which its rows group by otherwise), the identity of ``config/grid.py``;
``cli/run.py`` renders the flags from it and ``configuration_reference()`` the table in ``docs/configuration.md``.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from fewshot_sla.errors import UserError, setting
from fewshot_sla.validation import one_line_error
from fewshot_sla.yaml_file import key_lines, read_yaml

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
REFERENCE_FILE = "docs/configuration.md"
REGENERATE_REFERENCE = (
    "python -c 'from fewshot_sla.config import configuration_reference as r; print(r(), end=\"\")' "
    "> docs/configuration.md"
)


T = TypeVar("T")
Identity = Literal["always", "when_set", "never"]


@dataclass(frozen=True)
class Knob:
    """What a ``RunConfig`` field means beyond its type and range: its ``Annotated`` marker (see the module docstring).

    ``help`` is one line; ``{learners}``, ``{datasets}``, ... in it stand for the registered names of that kind.
    ``default`` says what an unset value means where the field's own default does not say it (``None``: "the
    recipe's" for a ``None`` default, else the default itself). ``identity`` left ``None`` follows
    ``affects_results`` (``always`` or ``never``).
    """

    help: str
    flag: str | None = None
    metavar: str | None = None
    default: str | None = None
    affects_results: bool = True
    identity: Identity | None = None
    free_on_resume: bool = False

    def __post_init__(self) -> None:
        if self.identity is None:
            object.__setattr__(self, "identity", "always" if self.affects_results else "never")

    def in_identity(self, value: Any) -> bool:
        """Whether a field holding ``value`` enters a grid cell's identity."""
        return self.identity == "always" or (self.identity == "when_set" and value is not None)


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
RECIPES = "the recipe's"
MEMORY_CHECK = "chosen by the memory check"


class RunConfig(BaseModel):
    """Every knob of a run: what to train, on what, how, and how to evaluate it.

    Fields left ``None`` take the method's published recipe, scaled to the dataset and episode budget.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    # What to train and test.
    method: Annotated[str, Knob("learner: {learners}", "--method", "NAME")] = "protonet"
    dataset: Annotated[
        str, Knob("dataset: {datasets}; the synthetic set is generated on first use", "--dataset", "NAME")
    ] = "synthetic"
    backbone: Annotated[str | None, Knob("backbone: {backbones}", "--backbone", "NAME")] = None
    transform: Annotated[
        str, Knob("SLA transformation: {transforms}; 'none' for plain training", "--transform", "NAME")
    ] = "rotation"
    objective: Annotated[str, Knob("training objective: {objectives}", "--objective", "NAME")] = "sla"
    backbone_options: Annotated[
        dict[str, Any],
        Knob(
            "extra backbone constructor option (repeatable), VALUE in YAML syntax",
            "--backbone-option",
            "KEY=VALUE",
            default=RECIPES,
        ),
    ] = Field(default_factory=dict)
    learner_options: Annotated[
        dict[str, Any],
        Knob(
            "extra learner constructor option (repeatable), VALUE in YAML syntax",
            "--learner-option",
            "KEY=VALUE",
            default=RECIPES,
        ),
    ] = Field(default_factory=dict)
    image_size: Annotated[
        int | None, Knob("resize images to PX x PX on the device", "--image-size", "PX", default="the store's")
    ] = Field(default=None, ge=1, le=MAX_IMAGE_SIZE)
    # Test episodes.
    ways: Annotated[int, Knob("test ways", "--ways", "N")] = Field(default=5, ge=2)
    shots: Annotated[int, Knob("test shots", "--shots", "K")] = Field(default=1, ge=1)
    queries: Annotated[int, Knob("test queries per class", "--queries", "Q")] = Field(default=15, ge=1)
    eval_episodes: Annotated[int, Knob("test episodes", "--eval-episodes", "N")] = Field(
        default=1000, ge=1, le=MAX_EPISODE_SET
    )
    episodes_file: Annotated[
        str | None,
        Knob(
            "fixed test episode set (.npz from 'fewshot-sla episodes make')",
            "--episodes-file",
            "FILE",
            default="the seed-0 set of --eval-episodes episodes",
        ),
    ] = None
    # Meta-training (None: the recipe's value).
    train_ways: Annotated[int | None, Knob("training ways", "--train-ways", "N")] = Field(default=None, ge=2)
    train_shots: Annotated[int | None, Knob("training shots", "--train-shots", "K")] = _positive()
    train_queries: Annotated[int | None, Knob("training queries per class", "--train-queries", "Q")] = _positive()
    train_episodes: Annotated[int | None, Knob("training episodes", "--train-episodes", "E")] = _positive()
    # Snell et al.'s and Lee et al.'s final models train on the classes of train and val together; validation then
    # watches classes the model trains on. Unset is the train split of every earlier run (identity when set).
    train_split: Annotated[
        Literal["train", "train+val"] | None,
        Knob(
            "the classes to train on: train, or train+val (validation then watches trained classes)",
            "--train-split",
            "SPLITS",
            default="train",
            identity="when_set",
        ),
    ] = None
    meta_batch: Annotated[int | None, Knob("episodes per optimizer step", "--meta-batch", "B")] = _positive()
    optimizer: Annotated[Literal["sgd", "adam"] | None, Knob("sgd or adam", "--optimizer", "NAME")] = None
    lr: Annotated[float | None, Knob("initial learning rate", "--lr", "LR")] = _number(gt=0)
    momentum: Annotated[float | None, Knob("SGD momentum")] = _number(ge=0, le=1)
    nesterov: Annotated[bool | None, Knob("Nesterov momentum (SGD)")] = None
    weight_decay: Annotated[float | None, Knob("L2 weight decay")] = _number(ge=0)
    lr_milestones: Annotated[
        list[float] | None, Knob("fractions of lr_schedule_episodes where the learning rate changes")
    ] = None
    lr_factors: Annotated[
        list[float] | None, Knob("learning-rate multiplier (relative to lr) from each milestone on")
    ] = None
    # A recipe sets its published budget, so a shorter run follows its first part.
    lr_schedule_episodes: Annotated[
        int | None,
        Knob(
            "the episodes the milestones are fractions of",
            default="the recipe's; unset: train_episodes, the schedule compressed or stretched to the budget",
        ),
    ] = _positive()
    augment: Annotated[bool | None, Knob("random crop/flip/colour jitter of training images", "--augment")] = None
    augment_rotations: Annotated[
        bool | None,
        Knob(
            "turn each training image by its own random multiple of 90 degrees, keeping its label (Vinyals et al.'s "
            "Omniglot augmentation)",
            "--augment-rotations",
            default="off",
            identity="when_set",  # unset in every earlier run: their grid cells keep their identity
        ),
    ] = None
    # Meta-training from another run's backbone (engine/build.py ``read_init_source``), as Meta-Baseline, MetaOptNet
    # and FEAT train; unset is the seeded initialisation of every earlier run, so both enter a cell's identity when set.
    init_from: Annotated[
        str | None,
        Knob(
            "meta-train from the backbone weights of another run's checkpoint (a new run; --resume continues its own)",
            "--init-from",
            "RUN_DIR",
            default="none, the seeded initialisation",
            identity="when_set",
        ),
    ] = Field(default=None, min_length=1)
    init_checkpoint: Annotated[
        Literal["best", "last"] | None,
        Knob(
            "the checkpoint of --init-from to start from: best or last",
            "--init-checkpoint",
            "WHICH",
            default="best",
            identity="when_set",
        ),
    ] = None
    val_episodes: Annotated[int, Knob("validation episodes", "--val-episodes", "N")] = Field(
        default=200, ge=1, le=MAX_EPISODE_SET
    )
    # Validation episodes' ways and shots, e.g. 5-way validation of a 20-way run whose dataset has fewer than 20
    # validation classes; their queries are the test's.
    val_ways: Annotated[
        int | None, Knob("validation ways", "--val-ways", "N", default="the test's --ways", identity="when_set")
    ] = Field(default=None, ge=2)
    val_shots: Annotated[
        int | None, Knob("validation shots", "--val-shots", "K", default="the test's --shots", identity="when_set")
    ] = _positive()
    val_every: Annotated[
        int | None,
        Knob(
            "training episodes between validations and checkpoints",
            "--val-every",
            "E",
            default="500, at least 4 and at most 20 validations per run",
        ),
    ] = _positive()
    # A crash loses at most this much.
    checkpoint_every: Annotated[
        float,
        Knob(
            "minutes of training between checkpoints besides those of validations",
            "--checkpoint-every",
            "MINUTES",
            affects_results=False,
            free_on_resume=True,
        ),
    ] = Field(default=10.0, gt=0, allow_inf_nan=False)
    # Execution.
    seed: Annotated[int, Knob("seed of every random stream", "--seed", "S")] = Field(default=0, ge=0, lt=2**63)
    device: Annotated[
        str,
        Knob("where to run: auto, cpu, cuda or cuda:N", "--device", "DEV", affects_results=False, free_on_resume=True),
    ] = "auto"
    amp: Annotated[bool, Knob("bfloat16 mixed precision", "--amp")] = False
    eval_batch: Annotated[int, Knob("episodes per evaluation batch", "--eval-batch", "B", affects_results=False)] = (
        Field(default=20, ge=1)
    )
    feature_cache: Annotated[
        bool, Knob("cache embeddings at evaluation (embedding learners)", "--feature-cache", affects_results=False)
    ] = True
    # Scale (None: chosen by the memory preflight, engine/memory/). A micro-batch changes BatchNorm's batch
    # statistics, so it affects results; it may change on resume, where the machine may need another.
    micro_batch: Annotated[
        int | None,
        Knob(
            "episodes per backward pass in each process, gradients accumulated",
            "--micro-batch",
            "K",
            default=MEMORY_CHECK,
            free_on_resume=True,
        ),
    ] = _positive()
    checkpointing: Annotated[
        bool | None,
        Knob(
            "recompute the backbone's stage activations in backward instead of storing them",
            "--checkpointing",
            default="only when the memory check needs it",
            affects_results=False,
            free_on_resume=True,
        ),
    ] = None
    sync_batchnorm: Annotated[
        bool, Knob("BatchNorm statistics over all processes (several processes on GPUs)", "--sync-batchnorm")
    ] = False
    # Experiment logging: trackers (``LOGGERS`` names) besides metrics.jsonl, which is always on.
    log: Annotated[
        list[str],
        Knob(
            "also log to this experiment tracker: {loggers}; repeatable or comma-separated (metrics.jsonl is always "
            "written)",
            "--log",
            "NAME",
            affects_results=False,
            free_on_resume=True,
        ),
    ] = Field(default_factory=list)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{value}'")
        return value

    @field_validator("train_split")
    @classmethod
    def _train_split(cls, value: str | None) -> str | None:
        return None if value == "train" else value  # unset and "train" are one run, one grid cell

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

    def to_yaml(self, notes: Mapping[str, str] | None = None, header: str = "") -> str:
        """The configuration as YAML text, one key per line, in field order; ``notes`` (key -> text) become comments
        after their keys' values (above a value written on several lines), ``header`` a comment line on top."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if not notes and not header:
            return text
        entries: list[list[str]] = []  # the lines of each top-level key, in field order
        for line in text.splitlines(keepends=True):
            if line[:1].isspace() and entries:
                entries[-1].append(line)
            else:
                entries.append([line])
        assert len(entries) == len(type(self).model_fields), text  # every key starts a line of its own
        out = [f"# {header}\n"] if header else []
        for key, lines in zip(self.to_dict(), entries):
            note = (notes or {}).get(key)
            if note and len(lines) == 1:
                lines = [f"{lines[0][:-1]}  # {note}\n"]  # safe_dump ends every line with a newline
            elif note:
                lines = [f"# {key}: {note}\n", *lines]
            out.extend(lines)
        return "".join(out)

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


@cache
def knobs() -> dict[str, Knob]:
    """Every field's ``Knob``, in file order."""
    found = {}
    for name, info in RunConfig.model_fields.items():
        marks = [m for m in info.metadata if isinstance(m, Knob)]
        if len(marks) != 1:
            raise TypeError(f"RunConfig.{name} needs exactly one Knob in its Annotated metadata")
        found[name] = marks[0]
    return found


# Fields --resume may change; fields that never change a run's numbers.
RESUME_FREE_KEYS = tuple(name for name, knob in knobs().items() if knob.free_on_resume)
RESULT_NEUTRAL_KEYS = tuple(name for name, knob in knobs().items() if not knob.affects_results)


def identity_values(config: RunConfig) -> dict[str, Any]:
    """The fields of ``config`` that make a grid cell's identity (``Knob.identity``), in file order."""
    every = knobs()
    return {key: value for key, value in config.to_dict().items() if every[key].in_identity(value)}


def field_default(name: str) -> Any:
    """The default value of field ``name`` (a fresh one for list and dict fields)."""
    return RunConfig.model_fields[name].get_default(call_default_factory=True)


def default_text(name: str) -> tuple[str, bool]:
    """How help describes field ``name``'s default, and whether that is a description (``the recipe's``) rather
    than the value itself."""
    knob, value = knobs()[name], field_default(name)
    if knob.default is not None or value is None:
        return knob.default or RECIPES, True
    if isinstance(value, bool):
        return ("on" if value else "off"), False
    if isinstance(value, float):
        return f"{value:g}", False
    if isinstance(value, (list, dict)) and not value:
        return "none", True
    return str(value), False


def help_text(name: str) -> str:
    """Field ``name``'s one-line help with its default, e.g. ``test ways (default 5)``; registry placeholders
    (``{learners}``, ...) left for the caller to fill."""
    text, described = default_text(name)
    return f"{knobs()[name].help} (default{':' if described else ''} {text})"


def base_type(name: str) -> Any:
    """Field ``name``'s type without ``None`` (``int | None`` -> ``int``)."""
    annotation = RunConfig.model_fields[name].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


_TYPE_WORDS = {str: "string", int: "integer", float: "number", bool: "boolean"}


# A range bound in words: (pydantic's metadata class, its attribute, the sign).
_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _number_text(value: Any) -> str:
    """``1000``, ``0``, ``1e+06``; a large power of two as ``2^63``."""
    if isinstance(value, int) and value > 2**32 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    return str(value) if isinstance(value, int) else f"{value:g}"


def type_text(name: str) -> str:
    """Field ``name``'s type and range in words, e.g. ``integer >= 2, or null``."""
    info: FieldInfo = RunConfig.model_fields[name]
    kind = base_type(name)
    origin = get_origin(kind)
    if origin is Literal:
        text = " or ".join(str(arg) for arg in get_args(kind))
    elif origin is list:
        text = f"list of {_TYPE_WORDS[get_args(kind)[0]]}s"
    elif origin is dict:
        text = "mapping"
    else:
        text = _TYPE_WORDS[kind]
    bounds = [
        f"{sign} {_number_text(getattr(mark, attribute))}"
        for mark in info.metadata
        for bound, attribute, sign in _BOUNDS
        if isinstance(mark, bound)
    ]
    text += f" {' and '.join(bounds)}" if bounds else ""
    return text + (", or null" if kind is not info.annotation else "")


class _ListedNames(dict[str, str]):
    """``{learners}``, ``{datasets}``, ... in a help text, for the reference: the command that lists them (plug-ins
    add names, so the file names none)."""

    def __missing__(self, kind: str) -> str:
        return f"one of `fewshot-sla list {kind}`"


def configuration_reference() -> str:
    """``docs/configuration.md``: every field with its flag, type, default, help and the three properties."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [
        "# Run configuration",
        "",
        "Generated from the field definitions in `fewshot_sla/config/run_config.py` (`configuration_reference()`); "
        "do not edit.",
        f"Regenerate with `{REGENERATE_REFERENCE}`.",
        "",
        "Every key of a `config.yaml` / `--config` file, settable as `--set KEY=VALUE` and, where it has one, with its",
        "`fewshot-sla run` flag. Precedence, lowest first: the field's default (an unset field takes the method's",
        "published recipe, `fewshot_sla/config/recipes.yaml`), a `--config` file, the flags, `--set`. Columns:",
        "",
        "- **results**: whether the value can change a run's numbers (no: where and how the run executes or logs);",
        "- **identity**: whether it enters a grid cell's identity, the hash ending the cell's folder name (*when set*:",
        "  only when it is not `null`, so that cells from before the field existed keep their names);",
        "- **resume**: whether `--resume` may change it.",
        "",
        "| field | flag | type | default | description | results | identity | resume |",
        "|---|---|---|---|---|---|---|---|",
    ]
    yes_no = {True: "yes", False: "no"}
    identities = {"always": "yes", "never": "no", "when_set": "when set"}
    for name, knob in knobs().items():
        value = field_default(name)
        if knob.default is not None or value is None:
            default = cell(default_text(name)[0])
        else:  # as YAML writes it: true, 10.0, []
            default = f"`{yaml.safe_dump([value], default_flow_style=True).strip()[1:-1]}`"
        flag = ""
        if knob.flag:
            switch = base_type(name) is bool
            flag = f"`{knob.flag}`, `--no-{knob.flag[2:]}`" if switch else f"`{knob.flag} {knob.metavar}`"
        description = cell(knob.help.format_map(_ListedNames()))
        rows.append(
            f"| `{name}` | {flag} | {cell(type_text(name))} | {default} | {description} | "
            f"{yes_no[knob.affects_results]} | {identities[str(knob.identity)]} | {yes_no[knob.free_on_resume]} |"
        )
    return "\n".join(rows) + "\n"


def config_error(err: ValidationError, source: str, lines: Mapping[str, int] | None = None) -> UserError:
    """A pydantic error on a run configuration as one line; flags are named when the source is the CLI."""

    def where(loc: tuple[Any, ...]) -> str:
        key = str(loc[0]) if loc else ""
        return f"{source} line {lines[key]}" if lines and key in lines else source

    def hint(loc: tuple[Any, ...]) -> str:
        return f"fix {setting(str(loc[0]))}" if source == "command line" and loc else ""

    return one_line_error(err, where, RunConfig.field_names(), hint)


def load_config(path: str | Path, fix: str = f"check the {setting('config')} path") -> RunConfig:
    """Read a YAML config file; malformed YAML or an unknown/ill-typed key is a UserError naming the line.
    ``fix`` is the advice when it cannot be read."""
    values, lines = read_config_values(path, fix)
    return RunConfig.from_mapping(values, f"config file {path}", lines)


def read_config_values(
    path: str | Path, fix: str = f"check the {setting('config')} path"
) -> tuple[dict[str, Any], dict[str, int]]:
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
