"""Building a run's parts from its configuration: device, data, episode specs, learner and objective.

Everything a user can get wrong (names, device, dataset, impossible episode specs) is checked here, before
a run writes anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fewshot_sla.augment import TrainAugment, normalize
from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.data.catalog import check_dataset_name, open_store
from fewshot_sla.data.store import IMAGENET_NORMALIZATION, DatasetStore, Normalization, Split
from fewshot_sla.engine.checkpoint import load_checkpoint
from fewshot_sla.episodes import CanonicalOrder, EpisodeBatch, EpisodeSampler, EpisodeSet, EpisodeSpec
from fewshot_sla.episodes.image_batches import ImageBatchSampler
from fewshot_sla.errors import UserError, command, setting
from fewshot_sla.io_errors import io_error
from fewshot_sla.learners.base import EPISODIC, PRETRAINING, Learner
from fewshot_sla.objectives import BASELINE, Objective
from fewshot_sla.registry import BACKBONES, DATASETS, LEARNERS, OBJECTIVES
from fewshot_sla.results import InitRecord, RunPaths, is_finished
from fewshot_sla.sla import RotatePermute, Transformation, checked_transform, resolve_transform


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when one is visible, else the CPU; asking for a missing GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"{setting('device')} {name} asks for a CUDA GPU but none is visible; use {setting('device')} "
                "cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"{setting('device')} {name}: only {torch.cuda.device_count()} GPU(s) visible; pick another index"
            )
    return device


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda (<GPU name>)`` for results files."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def derived_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one random stream of a run (model init, sampler, augmentation)."""
    words = [ord(c) for c in purpose]
    return int(np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]) >> 1


def check_names(cfg: RunConfig) -> None:
    """Every registered name in ``cfg`` exists (UserErrors list the valid names). A dataset name the registry
    lacks may be one of the user's own image datasets: ``open_dataset`` looks for its store in the data root."""
    check_dataset_name(cfg.dataset)
    LEARNERS.get(cfg.method)
    BACKBONES.get(cfg.backbone or "conv4")
    OBJECTIVES.get(cfg.objective)
    resolve_transform(cfg.transform)


def open_dataset(cfg: RunConfig, data_root: Any) -> DatasetStore:
    """The dataset's store (a missing store is a UserError naming the prepare command)."""
    return open_store(cfg.dataset, data_root)


def load_episode_file(path: str | os.PathLike[str], dataset: str, store: DatasetStore) -> EpisodeSet:
    """A fixed episode set from a file, checked to be for ``dataset`` and a split its store has."""
    episode_set = EpisodeSet.load(path)
    if episode_set.dataset != dataset:
        raise UserError(
            f"episode file {path} is for dataset '{episode_set.dataset}', not '{dataset}'; "
            f"use a set made with '{command('episodes make', dataset=dataset)} ...'"
        )
    if episode_set.split not in store.split_names:
        raise UserError(f"episode file {path} uses split '{episode_set.split}', which the {dataset} store lacks")
    return episode_set


def episode_specs(cfg: RunConfig) -> tuple[EpisodeSpec, EpisodeSpec]:
    """The (training, test) episode specs of a resolved configuration."""
    train = EpisodeSpec(cfg.train_ways or cfg.ways, cfg.train_shots or cfg.shots, cfg.train_queries or cfg.queries)
    return train, EpisodeSpec(cfg.ways, cfg.shots, cfg.queries)


def regime(cfg: RunConfig) -> str:
    """How the run's learner trains: EPISODIC, or PRETRAINING (batches of images over every training class)."""
    return str(getattr(LEARNERS.get(cfg.method), "regime", EPISODIC))


def training_sampler(cfg: RunConfig, split: Split, spec: EpisodeSpec, seed: int) -> EpisodeSampler | ImageBatchSampler:
    """The sampler of a run's training batches: N-way episodes of ``spec``, or for the pretraining regime shuffled
    images of every class (``meta_batch`` images per step)."""
    if regime(cfg) == PRETRAINING:
        return ImageBatchSampler(split, seed=seed)
    return EpisodeSampler(split, spec, seed=seed)


def pretraining_classes(cfg: RunConfig, split: Split) -> RunConfig:
    """A pretraining run's configuration with ``train_ways`` the number of training classes (every batch is labelled
    among all of them); another value given, or training shots or queries, is a UserError."""
    classes = len(split.class_names)
    for key in ("train_shots", "train_queries"):
        if getattr(cfg, key) is not None:
            raise UserError(
                f"the pretraining regime trains on batches of single images ({setting('meta_batch')} per step), "
                f"not on episodes, so {setting(key)} means nothing there; leave it unset"
            )
    if cfg.train_ways is not None and cfg.train_ways != classes:
        raise UserError(
            f"the pretraining regime classifies among all {classes} training classes of '{cfg.dataset}', but "
            f"{setting('train_ways')} is {cfg.train_ways}; leave it unset"
        )
    return cfg.updated({"train_ways": classes}, "pretraining regime")


def validation_spec(cfg: RunConfig) -> EpisodeSpec:
    """The validation episodes' spec: ``val_ways`` and ``val_shots`` (unset: the test's ways and shots), with the
    test's queries."""
    return EpisodeSpec(cfg.val_ways or cfg.ways, cfg.val_shots or cfg.shots, cfg.queries)


# The prefix of the settings of each kind of episodes' ways, shots and queries (validation queries are the test's).
_SPEC_PREFIXES = {"training": "train_", "validation": "val_"}


def check_split(split: Split, spec: EpisodeSpec, what: str) -> None:
    """A UserError when ``split`` cannot serve ``spec`` (the message says which flag to change)."""
    try:
        CanonicalOrder.of_split(split).check(spec, _SPEC_PREFIXES.get(what, ""))
    except UserError as err:
        message = err.message.replace(setting("val_queries"), setting("queries"))  # there is no val_queries
        raise UserError(f"{what} episodes: {message}") from None


@dataclass
class ImagePipeline:
    """uint8 episode images -> normalised float images at the model's size, with optional augmentation."""

    image_size: int
    store_size: int
    augment: TrainAugment | None = None
    normalization: Normalization = IMAGENET_NORMALIZATION

    def images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``[..., C, H, W]`` -> float ``[..., C, S, S]`` (augmented first when a generator is given)."""
        if self.augment is not None and generator is not None:
            images = self.augment(images, generator)
        x = normalize(images, self.normalization.mean, self.normalization.std)
        if self.image_size != self.store_size:
            lead = x.shape[:-3]
            x = F.interpolate(
                x.reshape(-1, *x.shape[-3:]),
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=self.image_size < self.store_size,
            )
            x = x.reshape(*lead, *x.shape[-3:])
        return x

    def episode(self, batch: EpisodeBatch, generator: torch.Generator | None = None) -> EpisodeBatch:
        """The batch with float images ready for the learner."""
        return dataclasses.replace(
            batch, support=self.images(batch.support, generator), query=self.images(batch.query, generator)
        )


def pipeline_for(cfg: RunConfig, store: DatasetStore) -> ImagePipeline:
    """A run's image pipeline: its image size, and the training augmentation when the run augments."""
    augment = None
    if cfg.augment:
        padding = 8 if store.image_size >= 64 else 4
        augment = TrainAugment(padding=padding, quarter_turns=bool(cfg.augment_rotations))
    elif cfg.augment_rotations:
        augment = TrainAugment.quarter_turns_only()
    return ImagePipeline(cfg.image_size or store.image_size, store.image_size, augment, store.normalization)


def build_model(cfg: RunConfig, image_size: int, device: torch.device, channels: int = 3) -> tuple[Learner, Objective]:
    """The learner (with its backbone) and the objective, on ``device``, initialised from the run's seed.

    The backbone takes ``channels`` input channels (1 for greyscale datasets) unless its options say otherwise.

    Initialisation draws from torch's global generator, forked and seeded for the build: the caller's global
    random state is the same afterwards, and the same seed gives the same initial model.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derived_seed(cfg.seed, "model"))
        # the plug-in contract checked on a probe batch (for training, eval and predict alike)
        transform: Transformation = checked_transform(
            cfg.transform, channels=channels, image_size=image_size, device=device
        )
        backbone = _create("backbone", BACKBONES, cfg.backbone or "conv4", _with_channels(cfg, channels))
        feature_dim = backbone.feature_dim(image_size)
        learner = _create("learner", LEARNERS, cfg.method, cfg.learner_options, backbone=backbone)
        objective = OBJECTIVES.create(cfg.objective, transform=transform, feature_dim=feature_dim)
        if learner.regime == PRETRAINING:  # one classifier per width the objective trains (C, C*M)
            if cfg.train_ways is None:
                raise UserError(f"a pretraining run needs {setting('train_ways')}, its number of training classes")
            for classes in objective.training_ways(cfg.train_ways):
                learner.add_classifier(feature_dim, classes)
        learner.to(device)
        objective.to(device)
        _materialize(learner, objective, cfg, image_size, channels, device)
    return learner, objective


def _with_channels(cfg: RunConfig, channels: int) -> dict[str, Any]:
    """The backbone options, with ``in_channels`` set to the data's channels when the backbone takes it and the
    run leaves it unset (a plug-in backbone without the option gets RGB data only: ``check_channels``)."""
    options = dict(cfg.backbone_options)
    factory = BACKBONES.get(cfg.backbone or "conv4")
    if channels != 3 and "in_channels" not in options and _takes(factory, "in_channels"):
        options["in_channels"] = channels
    return options


def _takes(factory: Any, option: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except ValueError:
        return False
    return option in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def check_augmentation(cfg: RunConfig) -> None:
    """A UserError for random quarter turns under an objective that learns which rotation each copy holds."""
    if not cfg.augment_rotations or cfg.objective in (BASELINE, "da"):
        return
    ops = resolve_transform(cfg.transform).ops
    if any(isinstance(op, RotatePermute) and op.k % 4 for op in ops):
        raise UserError(
            f"{setting('augment_rotations')} turns training images at random, which scrambles the rotations that "
            f"objective '{cfg.objective}' learns to tell apart in transformation '{cfg.transform}'; drop "
            f"{setting('augment_rotations')}, or train with {setting('objective')} baseline or da"
        )


def check_channels(cfg: RunConfig, channels: int) -> None:
    """A UserError when the data's channels do not suit the run: colour transformations (and colour jitter) of
    greyscale images, or a backbone that cannot take them."""
    transform = resolve_transform(cfg.transform)
    if transform.channels is not None and transform.channels != channels:
        raise UserError(
            f"transformation '{cfg.transform}' permutes colour channels and needs {transform.channels}-channel "
            f"images, but {cfg.dataset} has {channels}; choose a geometric one such as {setting('transform')} rotation"
        )
    if channels == 3:
        return
    if cfg.augment:
        raise UserError(
            f"{setting('augment')} pads crops with black and jitters colour, which suits RGB photographs, but "
            f"{cfg.dataset} is "
            f"greyscale; drop {setting('augment')} (or {setting('set')} augment=false)"
        )
    factory = BACKBONES.get(cfg.backbone or "conv4")
    in_channels = cfg.backbone_options.get("in_channels")
    if in_channels is None and not _takes(factory, "in_channels"):
        raise UserError(
            f"backbone '{cfg.backbone}' has no in_channels option, so it cannot read the {channels}-channel images "
            f"of {cfg.dataset}; add one to the backbone"
        )
    if in_channels is not None and in_channels != channels:
        raise UserError(
            f"backbone_options in_channels={in_channels}, but {cfg.dataset} has {channels} channel(s); drop it"
        )


def _create(kind: str, registry: Any, name: str, options: dict[str, Any], **parts: Any) -> Any:
    """``registry.create(name, **parts, **options)``; option names the constructor does not take, and errors it
    raises about its options' values, are UserErrors naming the config key to fix."""
    factory = registry.get(name)
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{kind} option {key} must be a finite number, got {value}; fix {kind}_options")
    try:
        inspect.signature(factory).bind(**parts, **options)
    except TypeError as err:
        accepted = [p for p in inspect.signature(factory).parameters if p not in parts and p != "self"]
        raise UserError(
            f"{kind} '{name}' does not take the options {options} ({err}); it takes "
            f"{', '.join(accepted) or 'no options'}; fix {kind}_options"
        ) from None
    except ValueError:  # no signature to check (a builtin); let the call say what is wrong
        pass
    try:
        return factory(**parts, **options)
    except (TypeError, ValueError) as err:
        if not options:
            raise
        raise UserError(f"{kind} '{name}' rejected its options {options}: {err}; fix {kind}_options") from None


def _materialize(
    learner: Learner, objective: Objective, cfg: RunConfig, image_size: int, channels: int, device: torch.device
) -> None:
    """Run one dummy episode through a learner with lazy parameters so that they get their shapes: with the ways
    the objective will hand it in training (N*M under SLA)."""
    if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in learner.parameters()):
        return
    ways = objective.learner_ways(cfg.train_ways or cfg.ways)
    images = torch.zeros(1, ways, channels, image_size, image_size, device=device)
    labels = torch.arange(ways, device=device).unsqueeze(0)
    was_training = learner.training
    learner.eval()
    with torch.no_grad():
        learner(images, labels, images, ways)
    learner.train(was_training)


# ----- --init-from: another run's backbone weights -----

BACKBONE_PREFIX = "backbone."  # the backbone's keys in a learner's state dict
_ANOTHER_RUN = f"give the folder of a run made by '{command('run')}' to {setting('init_from')}"


@dataclass(frozen=True)
class InitSource:
    """Another run's backbone weights (``init_from``), read and checked against the configuration that loads them:
    the backbone's state-dict entries without their ``backbone.`` prefix, and where they came from."""

    given: str  # the folder as the configuration gives it, for messages
    config: RunConfig  # the source run's
    channels: int | None  # the channels of the images it trained on, where known without its store
    backbone: dict[str, torch.Tensor]
    record: InitRecord


def read_init_source(cfg: RunConfig, run_dir: Path) -> InitSource:
    """The backbone of ``cfg.init_from``'s ``init_checkpoint`` (default ``best``), read with ``load_checkpoint``. A
    folder that is not a run, a missing or damaged checkpoint, or a backbone other than ``cfg``'s (name or options)
    is a one-line UserError; the channels and tensor shapes are checked by ``init_backbone``."""
    given, which = str(cfg.init_from), cfg.init_checkpoint or "best"
    folder = Path(given).expanduser()
    if not folder.is_dir():
        what = "a file, not a run folder" if folder.exists() else "missing"
        raise UserError(f"{setting('init_from')} {given} is {what}; {_ANOTHER_RUN}")
    if folder.resolve() == Path(run_dir).resolve():
        raise UserError(f"{setting('init_from')} {given} is this run's own folder; {_ANOTHER_RUN}")
    paths = RunPaths(folder)
    if not paths.config.is_file():
        raise UserError(f"{setting('init_from')} {given} is not a run folder (no {paths.config.name}); {_ANOTHER_RUN}")
    source_cfg = load_config(paths.config, f"the run folder is incomplete; {_ANOTHER_RUN}")
    ours, theirs = _backbone_text(cfg), _backbone_text(source_cfg)
    if ours != theirs:
        raise UserError(
            f"{given} was trained with backbone {theirs}, this run builds {ours}; give this run the same "
            f"{setting('backbone')} "
            f"and {setting('backbone_options')} values, or {setting('init_from')} a run with this backbone"
        )
    file = paths.best_checkpoint if which == "best" else paths.last_checkpoint
    if not file.is_file():
        other = "last" if which == "best" else "best"
        has_other = (paths.last_checkpoint if which == "best" else paths.best_checkpoint).is_file()
        fix = f"use {setting('init_checkpoint')} {other}" if has_other else "train it until its first validation"
        raise UserError(
            f"{setting('init_from')} {given} has no {which} checkpoint ({file} is missing); {fix}, or {_ANOTHER_RUN}"
        )
    other = "last" if which == "best" else "best"
    fix = f"give another run to {setting('init_from')} (or {setting('init_checkpoint')} {other})"
    digest = _sha256(file, fix)
    state = load_checkpoint(file, fix)
    model = state.get("model")
    backbone = (
        {k.removeprefix(BACKBONE_PREFIX): v for k, v in model.items() if k.startswith(BACKBONE_PREFIX)}
        if isinstance(model, dict)
        else {}
    )
    if not backbone or not all(isinstance(v, torch.Tensor) for v in backbone.values()):
        raise UserError(f"checkpoint {file} holds no backbone weights; {fix}")
    step = state.get("step")
    record = InitRecord(
        run_dir=str(folder.resolve()), checkpoint=which, sha256=digest, step=step if isinstance(step, int) else 0
    )
    return InitSource(given, source_cfg, _source_channels(folder, source_cfg), backbone, record)


def init_backbone(learner: Learner, source: InitSource, cfg: RunConfig, channels: int) -> InitRecord:
    """Copy ``source``'s backbone parameters and buffers into ``learner.backbone`` (nothing else of the learner);
    images of other channels than the source's, or a state dict of other keys or shapes, is a one-line UserError
    before anything is copied. The record of where they came from, for ``results.json``."""
    given = source.given
    if source.channels is not None and source.channels != channels:
        raise UserError(
            f"{given} was trained on {source.channels}-channel images ({source.config.dataset}), but this run's "
            f"{cfg.dataset} has {channels}; {setting('init_from')} a run trained on {channels}-channel images"
        )
    target = learner.backbone.state_dict()
    lacking = [k for k in target if k not in source.backbone]
    extra = [k for k in source.backbone if k not in target]
    if lacking or extra:
        parts = ([f"lacks {_some(lacking)}"] if lacking else []) + ([f"has {_some(extra)}"] if extra else [])
        raise UserError(
            f"the backbone of {given} differs from this run's: it {' and '.join(parts)}; "
            f"{setting('init_from')} a run with "
            "this backbone"
        )
    for key, value in target.items():
        theirs = source.backbone[key]
        if theirs.shape != value.shape:
            raise UserError(
                f"the backbone of {given} differs from this run's: {key} is {list(theirs.shape)} there, "
                f"{list(value.shape)} here; {setting('init_from')} a run with this backbone"
            )
    with torch.no_grad():
        learner.backbone.load_state_dict(source.backbone, strict=True)
    return source.record


def _backbone_text(cfg: RunConfig) -> str:
    """``conv4 {hidden: 32}``: a configuration's backbone and its options (``in_channels`` aside: the channels are
    compared on their own)."""
    options = {k: v for k, v in cfg.backbone_options.items() if k != "in_channels"}
    shown = yaml.safe_dump(options, default_flow_style=True, sort_keys=True, width=10**6).strip() if options else ""
    return f"{cfg.backbone or 'conv4'} {shown or '(default options)'}"


def _source_channels(folder: Path, cfg: RunConfig) -> int | None:
    """The channels of the images a run trained on, where they are known without its store: its backbone's
    ``in_channels``, else its recorded normalisation (a finished run), else its registered dataset's."""
    explicit = cfg.backbone_options.get("in_channels")
    if isinstance(explicit, int):
        return explicit
    if is_finished(folder):
        from fewshot_sla.finished_run import FinishedRun

        try:
            return FinishedRun.open(folder).normalization.channels
        except UserError:  # a damaged results file: the weights may still be fine
            pass
    if cfg.dataset in DATASETS:
        channels = getattr(DATASETS.get(cfg.dataset), "channels", None)
        return channels if isinstance(channels, int) else None
    return None


def _some(keys: list[str]) -> str:
    """``a.weight`` or ``a.weight (and 3 more)``."""
    return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _sha256(path: Path, fix: str) -> str:
    """The sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise io_error(err, path, "read the checkpoint", fix) from None
    return digest.hexdigest()
