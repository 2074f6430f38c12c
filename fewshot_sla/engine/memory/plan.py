"""The memory plan (``plan_memory``): the step's estimate against the budget, either checking the run's own
micro-batch and checkpointing or picking those that fit (``--fit-memory auto``: exact options first, then per-chunk
BatchNorm statistics)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.nn.modules.batchnorm import _BatchNorm

from fewshot_sla.engine.memory.budget import Budget, gib
from fewshot_sla.engine.memory.estimate import StepProfile
from fewshot_sla.errors import UserError, setting
from fewshot_sla.learners.base import Learner

FIT_MODES = ("auto", "check", "off")


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
        flags = f"{setting('micro_batch')} {options.micro_batch}" + (
            f" {setting('checkpointing')}" if options.checkpointing else ""
        )
        raise UserError(
            f"{need}; {flags} would need about {gib(options.estimate or 0)} (pass them, or "
            f"{setting('fit_memory')} auto to choose), or raise {setting('memory_budget')}"
        )
    smallest = profile.estimate(1, can_checkpoint)
    spread = "spread the episodes over more processes (torchrun), " if share > 1 else ""
    raise UserError(
        f"{need}; even one episode per backward pass{' with checkpointing' if can_checkpoint else ''} "
        f"needs about {gib(smallest)}: lower {setting('train_ways')}, {setting('train_queries')} or "
        f"{setting('image_size')}, use {setting('amp')}, "
        f"{spread}or raise {setting('memory_budget')}"
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
