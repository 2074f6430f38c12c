"""How much memory one training step will take, known before the first step (``profile_step``, ``StepProfile``).

Method: three tiny probe episodes (2-way; 1 or 2 shots; 1 or 2 queries) go through ``objective.loss`` on a copy of
the model in training mode, while a saved-tensor hook counts every tensor autograd keeps for the backward pass (each
storage once), attributed to the backbone stage that saved it. The counts are fitted linearly in the support and
query images of an episode (the backbone sees every image, and its transformed copies, once per pass) and
extrapolated to the real episodes. A step then needs

    static (parameters + gradients + optimizer state) + the meta-batch's input images
    + the largest, over the backward pass, of the tensors one micro-batch still holds there
      plus twice the largest activation being differentiated (backward's transient buffers),

walking the backward pass stage by stage (``StepProfile.estimate``; with activation checkpointing, a stage holds
the kept inputs of the earlier stages and its own recomputed tensors). The probe runs on a copy, under a forked
RNG, so the run's model, statistics and random streams are untouched. ``benchmarks/bench_scale.py`` compares the
estimate with measured peaks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fewshot_sla.backbones import checkpointing
from fewshot_sla.engine.build import ImagePipeline
from fewshot_sla.episodes import EpisodeSampler, EpisodeSpec
from fewshot_sla.episodes.image_batches import ImageBatchSampler
from fewshot_sla.learners.base import Learner
from fewshot_sla.objectives import Objective

PROBES = ((1, 1), (2, 1), (1, 2))  # (shots, queries) of the 2-way probe episodes
PROBE_WAYS = 2
IMAGE_PROBES = (1, 2, 4)  # images per probe batch of the pretraining regime (one-image episodes)


@dataclass(frozen=True)
class Probe:
    """Saved-for-backward bytes of one probe pass: outside the stages, per stage, the stages' inputs, and the
    largest single storage outside the stages and in each stage."""

    other: float
    stages: tuple[float, ...]
    inputs: tuple[float, ...]
    largest_other: float
    largest: tuple[float, ...]

    def vector(self) -> np.ndarray:
        return np.array([self.other, *self.stages, *self.inputs, self.largest_other, *self.largest], dtype=np.float64)

    @classmethod
    def from_vector(cls, v: np.ndarray, stages: int) -> Probe:
        v = np.maximum(v, 0.0)
        n = stages
        return cls(
            float(v[0]),
            tuple(v[1 : 1 + n]),
            tuple(v[1 + n : 1 + 2 * n]),
            float(v[1 + 2 * n]),
            tuple(v[2 + 2 * n : 2 + 3 * n]),
        )


@contextlib.contextmanager
def _counting(model: nn.Module, stages: list[nn.Module]) -> Iterator[Callable[[], Probe]]:
    """Count the bytes autograd saves while the block runs (each storage once, model parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}  # storage -> (bytes, stage index or -1)
    current = [-1]
    inputs = [0.0] * len(stages)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (storage.nbytes(), current[0])
        return t

    handles = []
    for index, stage in enumerate(stages):

        def enter(module: nn.Module, args: tuple[object, ...], index: int = index) -> None:
            current[0] = index
            first = args[0] if args else None
            if isinstance(first, torch.Tensor):
                inputs[index] += first.numel() * first.element_size()

        def leave(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            current[0] = -1

        handles += [stage.register_forward_pre_hook(enter), stage.register_forward_hook(leave)]

    def result() -> Probe:
        saved = [0.0] * (len(stages) + 1)  # the stages, then outside them (index -1)
        largest = [0.0] * (len(stages) + 1)
        for nbytes, stage in seen.values():
            saved[stage] += nbytes
            largest[stage] = max(largest[stage], nbytes)
        return Probe(saved[-1], tuple(saved[:-1]), tuple(inputs), largest[-1], tuple(largest[:-1]))

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class StepProfile:
    """What one training step's memory is made of, and how it grows with the micro-batch."""

    static: int  # parameters, gradients, optimizer state
    inputs: int  # the whole meta-batch's images as this process holds them (uint8 and float)
    fixed: Probe  # saved bytes per backward pass that do not grow with the episodes
    per_episode: Probe  # saved bytes per training episode
    stages: int

    def estimate(self, micro_batch: int, checkpointed: bool) -> int:
        """Peak bytes of one step with ``micro_batch`` episodes per backward pass.

        The backward pass runs through the stages from the last to the first. While stage i's gradient is
        computed, the tensors alive are those saved outside the stages, the saved tensors of stages 1..i (with
        checkpointing: the inputs of stages 1..i-1, kept, and stage i's own, recomputed), and about twice stage
        i's largest activation (its gradient and the gradient it produces); the peak is the largest of these.
        """
        p = Probe.from_vector(self.fixed.vector() + micro_batch * self.per_episode.vector(), self.stages)
        if not self.stages:
            return int(self.static + self.inputs + p.other + 2 * p.largest_other)
        peaks = []
        for i in range(self.stages):
            held = sum(p.inputs[:i]) + p.stages[i] if checkpointed else sum(p.stages[: i + 1])
            peaks.append(held + 2 * p.largest[i])
        # First, the gradient through what follows the stages (the head), every stage's tensors still held (with
        # checkpointing: the kept inputs and the last stage, which is not checkpointed).
        all_held = sum(p.inputs[:-1]) + p.stages[-1] if checkpointed else sum(p.stages)
        activations = p.other + max(max(peaks), all_held + 2 * p.largest_other)
        return int(self.static + self.inputs + activations)


def static_bytes(learner: Learner, objective: Objective, optimizer: str, momentum: float) -> int:
    """Parameters and buffers, their gradients, and the optimizer's state per parameter."""
    params = [p for m in (learner, objective) for p in m.parameters() if not isinstance(p, nn.UninitializedParameter)]
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for m in (learner, objective) for b in m.buffers())
    state = 2 * trainable if optimizer == "adam" else (trainable if momentum > 0 else 0)
    return sum(p.numel() * p.element_size() for p in params) + buffers + trainable + state


def profile_step(
    learner: Learner,
    objective: Objective,
    sampler: EpisodeSampler | ImageBatchSampler,
    pipeline: ImagePipeline,
    meta_batch: int,
    optimizer: str,
    momentum: float,
    amp: bool,
) -> StepProfile:
    """Probe the memory of one training step of ``meta_batch`` episodes of ``sampler.spec``, or of ``meta_batch``
    single images for the pretraining regime's ``ImageBatchSampler`` (see the module)."""
    model, loss_of = copy.deepcopy(learner).train(), copy.deepcopy(objective).train()
    stages = checkpointing.stages_of(model.backbone)
    if stages:
        checkpointing.enable(model.backbone, False)
    device = sampler.split.images.device
    probes, sizes = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, (shots, queries) in enumerate(PROBES):
            if isinstance(sampler, ImageBatchSampler):  # B one-image episodes: B query images, no support
                images = IMAGE_PROBES[i]
                episode = pipeline.episode(ImageBatchSampler(sampler.split, seed=i).sample(images))
                sizes.append((0, images))
            else:
                probe_spec = EpisodeSpec(min(PROBE_WAYS, sampler.spec.ways), shots, queries)
                episode = pipeline.episode(EpisodeSampler(sampler.split, probe_spec, seed=i).sample(1))
                sizes.append((probe_spec.ways * shots, probe_spec.ways * queries))
            with _counting(model, stages) as counted, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = loss_of.loss(model, episode)
                probes.append(counted())
            del loss, episode
    # saved = fixed + support_images * a + query_images * b, fitted on the three probes (exactly, for episodes).
    design = np.array([[1.0, s, q] for s, q in sizes])
    coef = np.linalg.lstsq(design, np.stack([p.vector() for p in probes]), rcond=None)[0]
    if isinstance(sampler, ImageBatchSampler):
        support, query = 0, 1
    else:
        support, query = sampler.spec.ways * sampler.spec.shots, sampler.spec.ways * sampler.spec.queries
    image = pipeline.image_size * pipeline.image_size * pipeline.normalization.channels
    inputs = meta_batch * (support + query) * image * (1 + 4)  # uint8 gathered + float32 normalised
    return StepProfile(
        static=static_bytes(learner, objective, optimizer, momentum),
        inputs=inputs,
        fixed=Probe.from_vector(coef[0], len(stages)),
        per_episode=Probe.from_vector(np.array([0.0, support, query]) @ coef, len(stages)),
        stages=len(stages),
    )
