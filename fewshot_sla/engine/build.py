"""Building a run's parts from its configuration: device, data, episode specs, learner and objective.

Everything a user can get wrong (names, device, dataset, impossible episode specs) is checked here, before
a run writes anything.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.augment import TrainAugment, normalize
from fewshot_sla.config import RunConfig
from fewshot_sla.data.catalog import check_dataset_name, open_store
from fewshot_sla.data.store import IMAGENET_NORMALIZATION, DatasetStore, Normalization, Split
from fewshot_sla.episodes import CanonicalOrder, EpisodeBatch, EpisodeSet, EpisodeSpec
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import Learner
from fewshot_sla.objectives import Objective
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES
from fewshot_sla.sla import Transformation, checked_transform, resolve_transform


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when one is visible, else the CPU; asking for a missing GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asks for a CUDA GPU but none is visible; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible; pick another index")
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
            f"use a set made with 'fewshot-sla episodes make --dataset {dataset} ...'"
        )
    if episode_set.split not in store.split_names:
        raise UserError(f"episode file {path} uses split '{episode_set.split}', which the {dataset} store lacks")
    return episode_set


def episode_specs(cfg: RunConfig) -> tuple[EpisodeSpec, EpisodeSpec]:
    """The (training, test) episode specs of a resolved configuration."""
    train = EpisodeSpec(cfg.train_ways or cfg.ways, cfg.train_shots or cfg.shots, cfg.train_queries or cfg.queries)
    return train, EpisodeSpec(cfg.ways, cfg.shots, cfg.queries)


def validation_spec(cfg: RunConfig) -> EpisodeSpec:
    """The validation episodes' spec: ``val_ways`` and ``val_shots`` (unset: the test's ways and shots), with the
    test's queries."""
    return EpisodeSpec(cfg.val_ways or cfg.ways, cfg.val_shots or cfg.shots, cfg.queries)


# The flags that set each kind of episodes' ways, shots and queries (validation queries are the test's).
_SPEC_FLAGS = {"training": "--train-", "validation": "--val-"}


def check_split(split: Split, spec: EpisodeSpec, what: str) -> None:
    """A UserError when ``split`` cannot serve ``spec`` (the message says which flag to change)."""
    try:
        CanonicalOrder.of_split(split).check(spec, _SPEC_FLAGS.get(what, "--"))
    except UserError as err:
        message = str(err).replace("--val-queries", "--queries")  # there is no --val-queries
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
    augment = TrainAugment(padding=8 if store.image_size >= 64 else 4) if cfg.augment else None
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


def check_channels(cfg: RunConfig, channels: int) -> None:
    """A UserError when the data's channels do not suit the run: colour transformations (and colour jitter) of
    greyscale images, or a backbone that cannot take them."""
    transform = resolve_transform(cfg.transform)
    if transform.channels is not None and transform.channels != channels:
        raise UserError(
            f"transformation '{cfg.transform}' permutes colour channels and needs {transform.channels}-channel "
            f"images, but {cfg.dataset} has {channels}; choose a geometric one such as --transform rotation"
        )
    if channels == 3:
        return
    if cfg.augment:
        raise UserError(
            f"--augment pads crops with black and jitters colour, which suits RGB photographs, but {cfg.dataset} is "
            f"greyscale; drop --augment (or --set augment=false)"
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
