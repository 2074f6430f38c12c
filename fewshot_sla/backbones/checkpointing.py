"""Activation checkpointing of a backbone's stages (``torch.utils.checkpoint``, non-reentrant).

A checkpointed stage keeps only its input for backward and recomputes its activations when the gradient reaches
it, so a training step holds the stage inputs plus one stage's activations instead of every activation. The last
stage is not checkpointed: backward would recompute it at once, for no saving. The recomputation repeats the stage
exactly (dropout masks included: the RNG state is replayed), and BatchNorm layers use the batch statistics without
updating their running statistics a second time, so gradients and running statistics equal those of an unchecked
pass.

A backbone supports checkpointing by holding a ``checkpointing`` attribute (False by default) and listing the
modules its forward runs one after another in ``checkpoint_stages()``; built-in: ``conv4`` (its four blocks),
``relation-conv4`` (its four blocks), ``resnet12`` (its four residual stages), ``wrn28-10`` (its twelve wide
blocks) and ``resnet18`` (its stem and four layers). The engine switches it on with
``enable(backbone)``. Stages are registered submodules of the backbone (never a plain list beside them: tools
that rebuild a module from its registered submodules, such as learn2learn's ``clone()``, would leave such a list
running the original layers). A stage may also receive the modules it runs as arguments (conv4's blocks are
given the backbone's ``features``); their BatchNorm layers are treated as the stage's own."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


@runtime_checkable
class Checkpointable(Protocol):
    """A backbone whose stages can be checkpointed."""

    checkpointing: bool

    def checkpoint_stages(self) -> Sequence[nn.Module]:
        """The modules forward runs one after another (each is checkpointed as a whole)."""
        ...


def supports(backbone: nn.Module) -> bool:
    """Whether ``backbone`` can take activation checkpointing."""
    return isinstance(backbone, Checkpointable)


def stages_of(backbone: nn.Module) -> list[nn.Module]:
    """The checkpointable stages of ``backbone`` (none when it does not support checkpointing)."""
    return list(backbone.checkpoint_stages()) if isinstance(backbone, Checkpointable) else []


def enable(backbone: nn.Module, on: bool = True) -> None:
    """Switch checkpointing of ``backbone``'s stages on (or off); a backbone without it is a TypeError."""
    if not isinstance(backbone, Checkpointable):
        raise TypeError(f"{type(backbone).__name__} does not support activation checkpointing")
    backbone.checkpointing = on


class _RunningStatsFrozen:
    """While entered, BatchNorm layers in training mode normalise with batch statistics but leave their running
    statistics (and batch counter) as they are: the recomputation of a checkpointed stage must not count the
    batch twice. A momentum of 0 keeps ``running * 1 + batch * 0 = running`` exactly while the layer saves the
    same tensors for backward as in the first pass (which the checkpoint checks). Re-enterable: a stage under
    second-order MAML is recomputed once per backward pass through it."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.saved: list[list[tuple[_BatchNorm, float | None, torch.Tensor | None]]] = []

    def __enter__(self) -> None:
        layers = list(
            {
                id(m): m
                for module in self.modules
                for m in module.modules()
                if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
            }.values()
        )
        self.saved.append(
            [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
        )
        for layer in layers:
            layer.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for layer, momentum, count in self.saved.pop():
            layer.momentum = momentum
            if count is not None and layer.num_batches_tracked is not None:
                layer.num_batches_tracked.copy_(count)


def run_stage(stage: nn.Module, *inputs: Any, checkpointed: bool) -> torch.Tensor:
    """``stage(*inputs)``, checkpointed when asked and a gradient is being recorded. Modules among ``inputs``
    (the layers a stage is given to run) have their BatchNorm statistics frozen in the recomputation as well."""
    if not (checkpointed and torch.is_grad_enabled()):
        out: torch.Tensor = stage(*inputs)
        return out
    given = [item for item in inputs if isinstance(item, nn.Module)]

    def contexts() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        return contextlib.nullcontext(), _RunningStatsFrozen(stage, *given)

    result: torch.Tensor = checkpoint(stage, *inputs, use_reentrant=False, context_fn=contexts)
    return result
