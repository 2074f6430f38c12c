"""A finished run as a few-shot classifier: ``load_run(run_dir)``, then ``TrainedRun.predict`` on raw images.

``predict`` builds one episode from a labelled support set and a query set and returns the N-way probabilities
of one prediction kind (the run's headline kind, SLA+AG where the objective offers it, by default). Images take
the run's evaluation path: each one is brought to the dataset store's size as ``fewshot-sla data prepare`` does
(Lanczos, aspect ratio not kept; float images in [0, 1] are first rounded to uint8, as the store holds uint8), then
normalised and resized to the run's image size on the device (``engine.build.ImagePipeline``). Both sizes come
from results.json; for runs made before it recorded them, from the run's dataset store, so ``load_run`` then needs
the data root holding it (the store must be the one the run was trained on). The model runs in eval mode under
``torch.no_grad`` (and the run's autocast).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewshot_sla.config import RunConfig
from fewshot_sla.data.importers.common import resize_image
from fewshot_sla.data.store import DatasetStore
from fewshot_sla.engine.build import (
    ImagePipeline,
    build_model,
    check_names,
    open_dataset,
    pipeline_for,
    resolve_device,
)
from fewshot_sla.engine.checkpoint import load_checkpoint
from fewshot_sla.engine.run_evaluation import autocast_for
from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.errors import UserError, setting
from fewshot_sla.finished_run import FinishedRun
from fewshot_sla.learners.base import Learner
from fewshot_sla.objectives import Objective
from fewshot_sla.prediction_kinds import headline_kind

CHECKPOINTS = ("best", "last")
# One image: [H, W, 3] or [3, H, W] (uint8, or float in [0, 1]), or a PIL image.
OneImage = torch.Tensor | np.ndarray | Image.Image
# Images: a batch [N, H, W, 3] or [N, 3, H, W], one image, or a sequence of images of any sizes.
Images = torch.Tensor | np.ndarray | Image.Image | Sequence[OneImage]
Labels = torch.Tensor | np.ndarray | Sequence[int]
IMAGE_SHAPES = "give [N, H, W, 3] or [N, 3, H, W] arrays, or a list of [H, W, 3] / [3, H, W] images"


@dataclass
class TrainedRun:
    """A finished run's trained learner and objective with the run's configuration and image pipeline.

    ``predict`` classifies query images given labelled support images; ``kinds`` are the prediction kinds the
    objective offers and ``headline`` the one ``predict`` uses by default.
    """

    path: Path
    config: RunConfig
    learner: Learner
    objective: Objective
    pipeline: ImagePipeline
    device: torch.device
    checkpoint: str
    step: int

    @property
    def kinds(self) -> list[str]:
        """The prediction kinds of the run's objective (e.g. ``si``, ``ag``)."""
        return [kind.name for kind in self.objective.kinds]

    @property
    def headline(self) -> str:
        """The default prediction kind: the most preferred one the objective offers (SLA+AG where it can)."""
        return headline_kind(self.kinds)

    def predict(
        self, support_images: Images, support_labels: Labels, query_images: Images, kind: str | None = None
    ) -> torch.Tensor:
        """N-way probabilities ``[Q, N]`` (float32, on the CPU, rows summing to 1) of each query image.

        ``support_labels`` are integers 0..N-1, one per support image, every class present at least once (map
        class names to 0..N-1 yourself, e.g. in sorted order); column n of the result is class n. Images: see
        ``Images`` (uint8 0..255, or float in [0, 1]; any size). Transductive learners (MAML, whose BatchNorm uses
        the query batch's statistics) classify the query images jointly, as in evaluation.
        """
        kind = self._kind(kind)
        size = self.pipeline.store_size
        channels = self.pipeline.normalization.channels
        support = store_images(support_images, size, "support_images", channels).to(self.device)
        query = store_images(query_images, size, "query_images", channels).to(self.device)
        labels, ways = episode_labels(support_labels, support.shape[0])
        episode = EpisodeBatch(
            support=support[None],
            support_labels=labels[None].to(self.device),
            query=query[None],
            query_labels=torch.zeros(1, query.shape[0], dtype=torch.int64, device=self.device),  # unused
            ways=ways,
            support_index=torch.arange(support.shape[0])[None],
            query_index=torch.arange(query.shape[0])[None],
        )
        self.learner.eval()
        self.objective.eval()
        with torch.no_grad(), autocast_for(self.device, self.config.amp)():
            logits = self.objective.predict(self.learner, self.pipeline.episode(episode))[kind]
        return torch.softmax(logits[0].float(), dim=-1).cpu()

    def _kind(self, kind: str | None) -> str:
        """``kind``, or the headline kind for None; one the objective does not offer is a UserError."""
        if kind is None:
            return self.headline
        if kind not in self.kinds:
            raise UserError(
                f"prediction kind '{kind}' is not offered by this run's objective '{self.config.objective}'; "
                f"choose one of: {', '.join(self.kinds)}"
            )
        return kind


def load_run(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    *,
    device: str = "cpu",
    data_root: str | os.PathLike[str] | None = None,
) -> TrainedRun:
    """The finished run in ``run_dir`` with the weights of its ``best`` (best validation) or ``last`` checkpoint,
    on ``device`` (``cpu``, ``cuda[:N]`` or ``auto``), in eval mode.

    ``data_root``: where the run's dataset store lives (default: $FEWSHOT_SLA_DATA, else ~/.cache/fewshot-sla),
    read for its image size only, and only for runs whose results.json predates ``image_size`` and
    ``store_image_size`` (the synthetic store is generated when missing). A folder that is not a finished run, or
    (for such an older run) a missing store or a store other than the run's, is a UserError.
    """
    if checkpoint not in CHECKPOINTS:
        raise UserError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got '{checkpoint}'")
    finished = FinishedRun.open(run_dir)
    cfg = finished.config
    check_names(cfg)
    dev = resolve_device(device)
    pipeline = training_pipeline(cfg, finished, data_root)
    learner, objective = build_model(cfg, pipeline.image_size, dev, pipeline.normalization.channels)
    file = finished.checkpoint("best" if checkpoint == "best" else "last")
    state = load_checkpoint(file, f"train the run again with {setting('overwrite')}")
    try:
        learner.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
    except (KeyError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:160]
        raise UserError(
            f"checkpoint {file} does not fit the run's {finished.paths.config} ({reason}); train the run again with "
            f"{setting('overwrite')}"
        ) from None
    learner.eval()
    objective.eval()
    return TrainedRun(finished.path, cfg, learner, objective, pipeline, dev, checkpoint, int(state["step"]))


def training_pipeline(cfg: RunConfig, finished: FinishedRun, data_root: Any) -> ImagePipeline:
    """The run's evaluation image pipeline (no augmentation): from the sizes results.json records, else (runs from
    before they were recorded) from the run's dataset store."""
    image_size, store_size = finished.results.image_size, finished.results.store_image_size
    if image_size and store_size:
        return ImagePipeline(image_size, store_size, None, finished.normalization)
    return dataclasses.replace(pipeline_for(cfg, _training_store(cfg, data_root, finished)), augment=None)


def _training_store(cfg: RunConfig, data_root: Any, finished: FinishedRun) -> DatasetStore:
    """The dataset store the run was trained on (its fingerprint checked), for its image size."""
    try:
        store = open_dataset(cfg, data_root)
    except UserError as err:
        raise UserError(f"predicting with {finished.path} needs its store for the image size: {err}") from None
    trained_on = finished.results.dataset_fingerprint
    if store.fingerprint != trained_on:
        raise UserError(
            f"the {cfg.dataset} store {store.path} is not the one {finished.path} was trained on (fingerprint "
            f"{store.fingerprint[:12]} vs {trained_on[:12]}); give the data root of the "
            f"original store (data_root= / {setting('data_root')})"
        )
    return store


def store_images(images: Images, size: int, what: str, channels: int = 3) -> torch.Tensor:
    """uint8 ``[R, channels, size, size]``: each image as the store holds it (float rounded to uint8, made
    greyscale (ITU-R 601 luma, as PIL converts) for a 1-channel run, then resized with Lanczos as ``data prepare``
    does; an image already at ``size`` is kept as it is)."""
    items = _image_list(images, what)
    if not items:
        raise UserError(f"{what} holds no images; {IMAGE_SHAPES}")
    rgb = [_rgb_uint8(image, f"{what}[{i}]") for i, image in enumerate(items)]
    if channels == 1:
        rgb = [np.asarray(Image.fromarray(image).convert("L"))[:, :, None] for image in rgb]
    rows = [resize_image(image, size) for image in rgb]
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)


def _image_list(images: Images, what: str) -> list[OneImage]:
    """The single images of ``images`` (a 4-D batch, one 3-D image or PIL image, or a sequence of images)."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim == 4:
            return list(images)
        if images.ndim == 3:
            return [images]
        raise UserError(f"{what} has shape {list(images.shape)}; {IMAGE_SHAPES}")
    if isinstance(images, Sequence) and not isinstance(images, str):
        return list(images)
    raise UserError(f"{what} is a {type(images).__name__}; {IMAGE_SHAPES}")


def _rgb_uint8(image: Any, what: str) -> np.ndarray:
    """One image as RGB uint8 ``[H, W, 3]`` (channels last when the last axis has 3 entries, else first)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise UserError(f"{what} is a {type(image).__name__}, not an image array; {IMAGE_SHAPES}")
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
    if array.ndim == 3 and array.shape[-1] != 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        raise UserError(f"{what} has shape {list(array.shape)}; {IMAGE_SHAPES} (RGB: convert other images to RGB)")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{what} has dtype {array.dtype}; give uint8 images (0..255) or float images in [0, 1]")
    if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise UserError(f"{what} has float values outside [0, 1]; divide 0..255 images by 255")
    return np.round(array.astype(np.float64) * 255).astype(np.uint8)


def episode_labels(labels: Labels, count: int) -> tuple[torch.Tensor, int]:
    """Support labels as int64 ``[count]`` in 0..N-1 with every class present, and N (at least 2)."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != count:
        raise UserError(
            f"support_labels has shape {list(array.shape)} but there are {count} support images; give one label "
            "per support image"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise UserError(
            f"support_labels must be integers 0..N-1, got dtype {array.dtype}; map class names to 0..N-1 "
            "(e.g. in sorted order)"
        )
    present = sorted({int(v) for v in array})
    if present != list(range(len(present))):
        raise UserError(f"support_labels must use every class 0..N-1 with no gaps, got the labels {present}")
    if len(present) < 2:
        raise UserError("the support set has one class; give examples of at least two classes")
    return torch.from_numpy(array.astype(np.int64)), len(present)
