"""Memory preflight: how much memory one training step will take, known before the first step.

Method (``profile_step``): three tiny probe episodes (2-way; 1 or 2 shots; 1 or 2 queries) go through
``objective.loss`` on a copy of the model in training mode, while a saved-tensor hook counts every tensor
autograd keeps for the backward pass (each storage once), attributed to the backbone stage that saved it.
The counts are fitted linearly in the support and query images of an episode (the backbone sees every image,
and its transformed copies, once per pass) and extrapolated to the real episodes. A step then needs

    static (parameters + gradients + optimizer state) + the meta-batch's input images
    + the largest, over the backward pass, of the tensors one micro-batch still holds there
      plus twice the largest activation being differentiated (backward's transient buffers),

walking the backward pass stage by stage (``StepProfile.estimate``; with activation checkpointing, a stage holds
the kept inputs of the earlier stages and its own recomputed tensors). The probe runs on a copy, under a forked
RNG, so the run's model, statistics and random streams are untouched. ``benchmarks/bench_scale.py`` compares the
estimate with measured peaks.

``plan_memory`` compares the estimate with the budget (``--memory-budget``; by default 90% of the free memory
of a GPU, or on a CPU the smaller of 90% of the available RAM and a third of the machine's RAM, shared among
the processes and parallel runs on the machine) and either checks the run's own settings or picks the
micro-batch and checkpointing that fit (``--fit-memory auto``: exact options first, then per-chunk
BatchNorm statistics).
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fewshot_sla.backbones import checkpointing
from fewshot_sla.engine.build import ImagePipeline
from fewshot_sla.episodes import EpisodeSampler, EpisodeSpec
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import Learner
from fewshot_sla.objectives import Objective

FIT_MODES = ("auto", "check", "off")
GIB = 1 << 30
PROBES = ((1, 1), (2, 1), (1, 2))  # (shots, queries) of the 2-way probe episodes
PROBE_WAYS = 2
GPU_SHARE = 0.9  # of the free GPU memory
CPU_SHARE = 0.9  # of the available RAM
CPU_MACHINE_SHARE = 1 / 3  # of the machine's RAM, at most, for all the runs on it
CONCURRENT_RUNS_VAR = "FEWSHOT_SLA_CONCURRENT_RUNS"  # parallel runs sharing this machine (leaderboard --jobs)


def gib(n: float) -> str:
    """Bytes as ``12.3 GB`` (GiB, the unit memory is sold in)."""
    return f"{n / GIB:.1f} GB"


# ----- probing -----


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
    sampler: EpisodeSampler,
    pipeline: ImagePipeline,
    meta_batch: int,
    optimizer: str,
    momentum: float,
    amp: bool,
) -> StepProfile:
    """Probe the memory of one training step of ``meta_batch`` episodes of ``sampler.spec`` (see the module)."""
    spec = sampler.spec
    model, loss_of = copy.deepcopy(learner).train(), copy.deepcopy(objective).train()
    stages = checkpointing.stages_of(model.backbone)
    if stages:
        checkpointing.enable(model.backbone, False)
    device = sampler.split.images.device
    probes, sizes = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, (shots, queries) in enumerate(PROBES):
            probe_spec = EpisodeSpec(min(PROBE_WAYS, spec.ways), shots, queries)
            probe_sampler = EpisodeSampler(sampler.split, probe_spec, seed=i)
            episode = pipeline.episode(probe_sampler.sample(1))
            with _counting(model, stages) as counted, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = loss_of.loss(model, episode)
                probes.append(counted())
            del loss, episode
            sizes.append((probe_spec.ways * shots, probe_spec.ways * queries))
    # saved = fixed + support_images * a + query_images * b, fitted exactly on the three probes.
    design = np.array([[1.0, s, q] for s, q in sizes])
    coef = np.linalg.solve(design, np.stack([p.vector() for p in probes]))
    episode_rows = np.array([0.0, spec.ways * spec.shots, spec.ways * spec.queries])
    image = pipeline.image_size * pipeline.image_size * pipeline.normalization.channels
    inputs = meta_batch * spec.ways * spec.per_class * image * (1 + 4)  # uint8 gathered + float32 normalised
    return StepProfile(
        static=static_bytes(learner, objective, optimizer, momentum),
        inputs=inputs,
        fixed=Probe.from_vector(coef[0], len(stages)),
        per_episode=Probe.from_vector(episode_rows @ coef, len(stages)),
        stages=len(stages),
    )


# ----- the budget -----


def _meminfo() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def _cgroup_room() -> int | None:
    """Memory left under this process's cgroup (v2 or v1) limit, if it has one."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - int(usage))
    return None


@dataclass(frozen=True)
class Budget:
    """How much one process may use for a training step, what is available, and where the figure comes from."""

    bytes: int | None
    available: int | None
    source: str


def host_memory() -> tuple[int | None, int | None]:
    """The RAM this process can still take (the smaller of MemAvailable and its cgroup's room), and the
    machine's total; None where the system does not tell."""
    info = _meminfo()
    room = [v for v in (info.get("MemAvailable"), _cgroup_room()) if v is not None]
    return (min(room) if room else None), info.get("MemTotal")


def processes_on_machine(local_processes: int) -> int:
    """The processes sharing this machine's RAM: this run's local ones times the parallel runs
    (``FEWSHOT_SLA_CONCURRENT_RUNS``)."""
    return max(1, int(os.environ.get(CONCURRENT_RUNS_VAR, "1") or 1)) * local_processes


def memory_budget(device: torch.device, local_processes: int, budget_gb: float | None = None) -> Budget:
    """The memory budget of one process (see the module docstring for the defaults)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available = int(free)
        default, source = int(GPU_SHARE * free), f"90% of the GPU's free {gib(free)}"
    else:
        room, total = host_memory()
        if room is None:
            return Budget(None if budget_gb is None else int(budget_gb * GIB), None, "unknown on this system")
        available = room
        runs = processes_on_machine(local_processes)
        share = min(CPU_SHARE * available, CPU_MACHINE_SHARE * (total or available))
        default = int(share / runs)
        source = (
            f"the smaller of 90% of the available {gib(available)} and a third of the machine's "
            f"{gib(total or available)} RAM" + (f", split among {runs} processes" if runs > 1 else "")
        )
    if budget_gb is not None:
        return Budget(int(budget_gb * GIB), available, "--memory-budget")
    return Budget(default, available, source)


# ----- the plan -----


@dataclass(frozen=True)
class MemoryPlan:
    """The memory options a run trains with and what was estimated for them."""

    micro_batch: int
    checkpointing: bool
    estimate: int | None
    budget: int | None
    available: int | None
    source: str
    note: str = ""

    def summary(self) -> str:
        """One line for the run's header."""
        if self.estimate is None:
            return f"memory: not estimated; micro-batch {self.micro_batch}, checkpointing {_onoff(self.checkpointing)}"
        budget = f" of a {gib(self.budget)} budget ({self.source})" if self.budget is not None else ""
        return (
            f"memory: one training step needs about {gib(self.estimate)} per process{budget}; micro-batch "
            f"{self.micro_batch}, checkpointing {_onoff(self.checkpointing)}{self.note}"
        )


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def batch_statistics(learner: Learner) -> bool:
    """Whether a forward pass's output depends on the other episodes it shares a micro-batch with
    (BatchNorm with batch statistics over every image of the pass), unless the learner handles episodes
    one by one."""
    if learner.episodes_independent:
        return False
    return any(isinstance(m, _BatchNorm) for m in learner.modules())


def plan_memory(
    profile: StepProfile | None,
    share: int,
    mode: str,
    budget: Budget,
    learner: Learner,
    micro_batch: int | None,
    checkpointed: bool | None,
    can_checkpoint: bool,
) -> MemoryPlan:
    """Choose (``auto``) or check (``check``) the micro-batch and checkpointing of a process's ``share``
    episodes per step against ``budget``; ``off``: the run's settings as they are."""
    default_batch = learner.preferred_micro_batch or share
    chosen = MemoryPlan(
        min(micro_batch or default_batch, share),
        bool(checkpointed),
        None,
        budget.bytes,
        budget.available,
        budget.source,
    )
    if mode == "off" or profile is None or budget.bytes is None:
        note = "" if mode == "off" else f" (budget {budget.source})"
        return replace(chosen, note=note)
    estimate = replace(chosen, estimate=profile.estimate(chosen.micro_batch, chosen.checkpointing))
    if estimate.estimate is not None and estimate.estimate <= budget.bytes:
        return estimate
    options = _fitting(profile, share, budget.bytes, learner, micro_batch, checkpointed, can_checkpoint)
    if mode == "auto" and options is not None:
        return replace(options, available=budget.available, source=budget.source)
    assert estimate.estimate is not None
    need = (
        f"one training step needs about {gib(estimate.estimate)} per process (micro-batch {chosen.micro_batch}, "
        f"checkpointing {_onoff(chosen.checkpointing)}) but the memory budget is {gib(budget.bytes)} "
        f"({budget.source})"
    )
    if options is not None:
        flags = f"--micro-batch {options.micro_batch}" + (" --checkpointing" if options.checkpointing else "")
        raise UserError(
            f"{need}; {flags} would need about {gib(options.estimate or 0)} (pass them, or "
            "--fit-memory auto to choose), or raise --memory-budget"
        )
    smallest = profile.estimate(1, can_checkpoint)
    spread = "spread the episodes over more processes (torchrun), " if share > 1 else ""
    raise UserError(
        f"{need}; even one episode per backward pass{' with checkpointing' if can_checkpoint else ''} "
        f"needs about {gib(smallest)}: lower --train-ways, --train-queries or --image-size, use --amp, "
        f"{spread}or raise --memory-budget"
    )


def _fitting(
    profile: StepProfile,
    share: int,
    budget: int,
    learner: Learner,
    micro_batch: int | None,
    checkpointed: bool | None,
    can_checkpoint: bool,
) -> MemoryPlan | None:
    """The first memory options that fit, exact ones first: the largest micro-batch without per-chunk
    BatchNorm statistics, then checkpointing (exact), then smaller micro-batches with per-chunk statistics."""
    exact_chunks = not batch_statistics(learner)
    batches = [min(micro_batch, share)] if micro_batch is not None else list(range(share, 0, -1))
    flags = [checkpointed] if checkpointed is not None else ([False, True] if can_checkpoint else [False])
    exact = [(k, c) for c in flags for k in batches if k == share or exact_chunks]
    inexact = [(k, c) for k in batches for c in flags if not (k == share or exact_chunks)]
    for k, c in exact + inexact:
        estimate = profile.estimate(k, c)
        if estimate <= budget:
            note = (
                f"; BatchNorm sees batch statistics per micro-batch of {k} episode(s), as under DistributedDataParallel"
                if k < share and not exact_chunks
                else ""
            )
            return MemoryPlan(k, c, estimate, budget, None, "", note)
    return None


# ----- measuring -----


class PeakMeter:
    """The peak memory of a stretch of training: the device's peak allocation on a GPU; on a CPU the process's
    peak resident memory (Linux's VmHWM, reset at the start), with the resident memory at the start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = int(torch.cuda.memory_allocated(self.device))
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        self.baseline = _status_bytes("VmRSS") or 0

    def peak(self) -> int | None:
        """Peak bytes since ``start`` (None where it cannot be read)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _status_bytes("VmHWM")
        if peak is None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(rss) * 1024 if rss else None
        return peak


def _status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None
