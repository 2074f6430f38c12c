"""Episodic evaluation on a fixed episode set: per-episode accuracy of every prediction the objective offers.

``EmbeddingLearner``s are evaluated on cached embeddings (see ``feature_cache.py``); every other learner
(e.g. MAML, which adapts per episode) runs episode batches through ``objective.predict`` directly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import ImagePipeline
from fewshot_sla.engine.distributed import SINGLE, Processes
from fewshot_sla.engine.feature_cache import FeatureCache, ImagesOf
from fewshot_sla.engine.memory import CreatedBytes
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec, episode_batches
from fewshot_sla.learners.base import UNCONVERGED, EmbeddingLearner, Learner
from fewshot_sla.objectives import Objective
from fewshot_sla.package_data import find_episode_set

TEST_SET_SEED = 0
VAL_SET_SEED = 0
CACHED_BATCH = 200  # at most this many episodes per head call on cached features
CACHED_ELEMENTS = 1 << 28  # and at most about this many gathered feature values (1 GiB of float32) per call
# and at most about this many bytes created by the head call (measured on the first episode: CreatedBytes); a
# pairwise head (Relation Networks: a map per query and class) needs far more than its episode's features
HEAD_BYTES = 1 << 30


@dataclass
class Evaluation:
    """Per-episode accuracies (fractions, one float64 array per prediction kind) and how they were obtained."""

    accuracies: dict[str, np.ndarray]
    cached: bool
    time_s: float
    diagnostics: dict[str, float] = field(default_factory=dict)  # the learner's, over the episodes (see base)

    @property
    def episodes(self) -> int:
        """Number of episodes evaluated."""
        return len(next(iter(self.accuracies.values())))


def unconverged_message(fractions: dict[str, float]) -> str:
    """``'svm' stopped short of its tolerance on 12.5% of the episodes`` for diagnostics ending in UNCONVERGED."""
    parts = [
        f"'{k.removesuffix(UNCONVERGED)}' stopped short of its tolerance on {100 * v:.1f}% of the episodes"
        for k, v in fractions.items()
    ]
    return "; ".join(parts) + " (the learner's solver; see its iteration options)"


def episode_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, Q, N]`` and labels ``[B, Q]`` -> the accuracy of each episode ``[B]``."""
    return (logits.argmax(dim=-1) == labels).double().mean(dim=1)


def fixed_test_set(
    dataset: str, split: Split, spec: EpisodeSpec, count: int, run_dir: Path, data_root: Path | None, write: bool = True
) -> tuple[EpisodeSet, Path, str]:
    """The fixed test episode set matching (dataset, test, spec, count), its path and source: the user's file in
    ``data_root/episodes/`` (``"user"``), else the shipped one (``"shipped"``), else one generated with seed 0 and
    written into ``run_dir`` or reused from there (``"run"``; ``write=False``: kept in memory only, as the
    processes other than the writing one do)."""
    name = EpisodeSet.default_name(dataset, split.name, spec, count, TEST_SET_SEED)
    found = find_episode_set(name, data_root)
    if found is not None:
        return EpisodeSet.load(found.path), found.path, found.source
    local = run_dir / f"test-episodes-{name}"
    if local.is_file():
        return EpisodeSet.load(local), local, "run"
    episode_set = EpisodeSet.make(
        CanonicalOrder.of_split(split), dataset=dataset, split=split.name, spec=spec, count=count, seed=TEST_SET_SEED
    )
    if write:
        episode_set.save(local)
    return episode_set, local, "run"


def validation_episode_set(dataset: str, split: Split, spec: EpisodeSpec, count: int) -> EpisodeSet:
    """The fixed validation episodes (seed 0, held in memory)."""
    return EpisodeSet.make(
        CanonicalOrder.of_split(split), dataset=dataset, split=split.name, spec=spec, count=count, seed=VAL_SET_SEED
    )


def evaluate(
    learner: Learner,
    objective: Objective,
    episode_set: EpisodeSet,
    split: Split,
    dataset: str,
    pipeline: ImagePipeline,
    *,
    batch_size: int = 20,
    use_cache: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    progress: bool = False,
    desc: str = "test",
    processes: Processes = SINGLE,
) -> Evaluation:
    """Evaluate ``learner`` (eval mode) on every episode of ``episode_set`` drawn from ``split``.

    ``use_cache`` embeds each image (and copy) once when the learner is an ``EmbeddingLearner``, whose head then
    takes as many episodes per call as keep the gathered features within ``CACHED_ELEMENTS`` and what the head
    creates (measured on one episode) within ``HEAD_BYTES``; other learners (MAML adapts per episode) always run on
    images, ``batch_size`` episodes at a time. With several ``processes`` each evaluates its contiguous
    share of the episodes and every process gets all per-episode results, in episode order.
    """
    was_training = learner.training, objective.training
    learner.eval()
    objective.eval()
    start = time.perf_counter()
    rows = episode_set.rows_in(split, dataset)[processes.share(episode_set.count)]
    count = rows.shape[0]
    cached = use_cache and isinstance(learner, EmbeddingLearner)
    results: dict[str, list[torch.Tensor]] = {kind.name: [] for kind in objective.kinds}

    def record(predictions: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        for kind, logits in predictions.items():
            results.setdefault(kind, []).append(episode_accuracy(logits.float(), labels).cpu())

    try:
        with torch.no_grad(), autocast():
            bar = tqdm(total=count, desc=desc, unit="ep", disable=None if progress else True, leave=False)
            if cached and count:
                assert isinstance(learner, EmbeddingLearner)
                cache = FeatureCache(learner, objective, ImagesOf(split.images, pipeline.images), rows)
                per_episode = rows.shape[1] * rows.shape[2] * cache.copies * cache.feature_dim
                with CreatedBytes() as created:  # what the head creates for one episode, its result not kept
                    objective.predict_copies(learner.head, cache.episode(rows[:1], episode_set.spec))
                learner.pop_diagnostics()  # nor its solver statistics
                head_bytes = max(1, created.bytes)
                step = max(1, min(CACHED_BATCH, CACHED_ELEMENTS // per_episode, HEAD_BYTES // head_bytes))
                for first in range(0, count, step):
                    episodes = cache.episode(rows[first : first + step], episode_set.spec)
                    record(objective.predict_copies(learner.head, episodes), episodes.query_labels)
                    bar.update(episodes.support.shape[0])
            else:
                for gathered in episode_batches(split.images, rows, episode_set.spec, batch_size):
                    batch = pipeline.episode(gathered)
                    record(objective.predict(learner, batch), batch.query_labels)
                    bar.update(batch.support.shape[0])
            bar.close()
    finally:
        learner.train(was_training[0])
        objective.train(was_training[1])
    accuracies = {
        kind: torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float64) for kind, parts in results.items()
    }
    share = count / max(1, episode_set.count)  # fractions over this process's episodes, weighted to the whole set
    mine = {key: np.array([share * value]) for key, value in learner.pop_diagnostics().items()}
    diagnostics = {key: float(values.sum()) for key, values in processes.gather(mine).items()}
    return Evaluation(processes.gather(accuracies), cached, time.perf_counter() - start, diagnostics)
