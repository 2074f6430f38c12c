"""Contract checks for plug-in authors: run the suite's own registry-wide tests on a backbone, learner,
transformation or objective, in your own test suite (the pattern of scikit-learn's ``check_estimator``)::

    from fewshot_sla.testing import check_learner

    def test_my_learner_keeps_the_contract():
        check_learner("cosine-protonet")  # a registered name, or the class / factory itself

Each ``check_*`` builds small instances (tiny images and widths, on the CPU, a second or so), runs them through the
contract of ``ARCHITECTURE.md`` ("Contracts between modules") and raises ``ContractError`` (an ``AssertionError``,
so any test runner reports it as a failure) whose message names the component and the rule it breaks. Nothing here
imports a test framework; the global random state and grad mode of the caller are left as they were.

- ``check_backbone``: ``[N, C, H, W] -> [N, feature_dim(H)]`` in both modes, one image at a time equals the batch in
  evaluation mode (deterministic, no state change), gradients reach every parameter, every tensor it computes with
  is a registered parameter or buffer (so ``copy.deepcopy``, ``torch.func.functional_call`` and a learn2learn-style
  ``clone()`` see each of them: checked one by one), ``in_channels`` honoured when the factory takes it.
- ``check_learner``: logits ``[B, N*Q, ways]``, B episodes at once equal one at a time (in training mode too when
  the learner declares ``episodes_independent``), relabelling the support classes permutes the logits' columns,
  differentiable, a valid ``loss_kind``, ``head(embed(...))`` equals ``forward`` for an ``EmbeddingLearner``, and it
  trains and predicts with the ``mt`` and ``sla+sd`` objectives (N*M-way episodes, backbone features).
- ``check_transform``: ``sla.check_transform`` (copy 0 the identity, shape, dtype, determinism) on 1- and 3-channel
  probes, the copies its ``ops`` make are the rows ``__call__`` stacks, distinct, closed under composition (a group),
  and the N*M-way episode SI/AG read (joint labels ``y*M + j``).
- ``check_objective``: declares kinds that ``prediction_kinds`` knows, ``predict`` gives exactly those, each
  ``[B, N*Q, N]``, a finite differentiable loss with ``loss`` and ``acc`` metrics, for an ``EmbeddingLearner`` and
  a plain ``Learner``, and cached evaluation (``predict_copies`` on embeddings) agrees with ``predict`` on images.
- ``check_all_registered``: every check on every registered entry (built-ins and installed plug-ins).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla import sla
from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.learners.base import CROSS_ENTROPY, EPISODIC, MSE_SIGMOID, PRETRAINING, EmbeddingLearner, Learner
from fewshot_sla.objectives import CopiedEpisode, Objective
from fewshot_sla.prediction_kinds import PredictionKind, kind_table
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES, TRANSFORMS
from fewshot_sla.sla import Transformation, augment_episode, joint_labels, qualified_name, resolve_transform

__all__ = [
    "SMALL_BACKBONE_OPTIONS",
    "ContractError",
    "check_all_registered",
    "check_backbone",
    "check_learner",
    "check_objective",
    "check_transform",
]

# Small instances of the built-in backbones, so that every check runs in a fraction of a second on a CPU; any other
# backbone is built with its defaults unless the caller passes ``options``.
SMALL_BACKBONE_OPTIONS: dict[str, dict[str, Any]] = {
    "conv4": {"hidden": 4},
    "relation-conv4": {"hidden": 4},
    "resnet12": {"channels": (4, 4, 8, 8), "drop_rate": 0.1, "dropblock_ramp_steps": 1},
    # WRN-16-2: both shortcut kinds (a projection opens each group, identities follow) and dropout; the full
    # WRN-28-10 (36.5M parameters) takes 7 s here. resnet18 has no size options: its full check takes about 1 s.
    "wrn28-10": {"depth": 16, "widen": 2, "dropout": 0.1},
}
# The episodes the learner and objective checks run: B episodes, N ways, K shots, Q queries per class.
EPISODES, WAYS, SHOTS, QUERIES = 3, 3, 2, 2
# The objectives a learner is trained with: together they take every path (N*M-way and plain episodes, backbone
# features for ``mt``'s head, embeddings shared between the joint and the plain prediction).
LEARNER_OBJECTIVES = ("mt", "sla+sd")

Factory = Callable[..., Any]


class ContractError(AssertionError):
    """A component breaks its contract; the message names the component (registered name, module.qualname) and the
    rule it breaks."""


# ----------------------------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """Run a check with its own seeded global random stream (the caller's is restored) and gradients enabled."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        yield


@contextlib.contextmanager
def _step(what: str, doing: str) -> Iterator[None]:
    """An exception other than ``ContractError`` raised while ``doing`` becomes one that names ``what`` and the step."""
    try:
        yield
    except ContractError:
        raise
    except Exception as err:
        reason = " ".join(str(err).split())[:300] or "(no message)"
        raise ContractError(f"{what}: {doing} raised {type(err).__name__}: {reason}") from err


def _require(condition: object, what: str, rule: str) -> None:
    if not condition:
        raise ContractError(f"{what}: {rule}")


def _resolve(registry: Any, spec: str | Factory, kind: str) -> tuple[Factory, str]:
    """The factory behind a registered name (or the factory itself) and how messages name it."""
    if isinstance(spec, str):
        try:
            entry = registry.get(spec)
        except Exception as err:
            raise ContractError(f"{kind} '{spec}': {err}") from err
        return entry, f"{kind} '{spec}' ({qualified_name(entry)})"
    if not callable(spec):
        raise ContractError(f"{kind} {spec!r}: give a registered name or the factory (class or function) itself")
    return spec, f"{kind} {qualified_name(spec)}"


def _takes(factory: Factory, option: str) -> bool:
    """Whether ``factory`` accepts the keyword ``option`` (by name or through ``**kwargs``), as the engine decides."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return option in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-5, 1e-7) if dtype == torch.float64 else (1e-4, 1e-5)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to floating-point rounding: relative, and absolute at the scale of ``b``."""
    rtol, atol = _tolerances(b.dtype)
    scale = 1.0 + float(b.detach().abs().max()) if b.numel() else 1.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol * scale))


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{float((a.detach() - b.detach()).abs().max()):.3g}"


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, x.shape)) + "]"


def _finite_tensor(what: str, value: object, name: str) -> torch.Tensor:
    _require(isinstance(value, torch.Tensor), what, f"{name} is a {type(value).__name__}, not a torch.Tensor")
    assert isinstance(value, torch.Tensor)
    _require(value.is_floating_point(), what, f"{name} has dtype {value.dtype}, not a floating-point dtype")
    _require(bool(torch.isfinite(value).all()), what, f"{name} holds values that are not finite")
    return value


def _missing_gradients(parameters: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, p in parameters.items() if p.requires_grad and p.grad is None]


def _infinite_gradients(parameters: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, p in parameters.items() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


# ----------------------------------------------------------------------------------------------------- backbones


def _backbone_factory(
    spec: str | Factory | nn.Module, options: Mapping[str, Any] | None
) -> tuple[Factory, dict[str, Any], str]:
    """The backbone's factory, the options to build it with (small ones for the built-ins) and its name."""
    if isinstance(spec, nn.Module):
        instance = spec
        return (lambda: copy.deepcopy(instance)), {}, f"backbone {qualified_name(type(spec))}"
    factory, what = _resolve(BACKBONES, spec, "backbone")
    default = SMALL_BACKBONE_OPTIONS.get(spec, {}) if isinstance(spec, str) else {}
    return factory, dict(default if options is None else options), what


def _build(factory: Factory, options: Mapping[str, Any], what: str) -> nn.Module:
    with _step(what, f"building it with options {dict(options)}"):
        module = factory(**options)
    _require(isinstance(module, nn.Module), what, f"gives a {qualified_name(type(module))}, not a torch.nn.Module")
    assert isinstance(module, nn.Module)
    feature_dim = getattr(module, "feature_dim", None)
    _require(callable(feature_dim), what, "has no feature_dim(image_size) -> int method (the backbone contract)")
    return module


def _feature_dim(backbone: nn.Module, image_size: int, what: str) -> int:
    with _step(what, f"feature_dim({image_size})"):
        dim = backbone.feature_dim(image_size)  # type: ignore[operator]
    _require(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1,
        what,
        f"feature_dim({image_size}) returned {dim!r}, not an int >= 1",
    )
    return int(dim)


def _forward_features(backbone: nn.Module, images: torch.Tensor, what: str, mode: str) -> torch.Tensor:
    with _step(what, f"the forward pass in {mode} mode on images {_shape(images)}"):
        out = backbone(images)
    return _finite_tensor(what, out, f"the output in {mode} mode for images {_shape(images)}")


# Entries of a module's __dict__ that nn.Module itself keeps (parameters, buffers, submodules, hooks).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _held_outside_registration(module: nn.Module) -> list[str]:
    """Attributes (of the module or any submodule) that hold a module or a parameter outside ``_modules`` /
    ``_parameters``: in a plain attribute, list, tuple, set or dict."""
    found: list[str] = []

    def visit(value: object, path: str, depth: int) -> None:
        if isinstance(value, nn.Module):
            found.append(f"{path} (a {type(value).__name__})")
        elif isinstance(value, torch.Tensor) and (isinstance(value, nn.Parameter) or value.requires_grad):
            found.append(f"{path} (a parameter {_shape(value)})")
        elif depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
            for index, item in enumerate(value):
                visit(item, f"{path}[{index}]", depth + 1)
        elif depth < 4 and isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{path}[{key!r}]", depth + 1)

    for prefix, sub in module.named_modules():
        for attribute, value in vars(sub).items():
            if attribute not in _MODULE_INTERNALS:
                visit(value, f"{type(sub).__name__}{'(' + prefix + ')' if prefix else ''}.{attribute}", 0)
    return found


def _graph_leaves(output: torch.Tensor) -> list[torch.Tensor]:
    """The tensors requiring gradients that ``output`` was computed from (the leaves of its autograd graph)."""
    leaves: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


class _Replay:
    """Runs ``module`` on images with its buffers as they were when this was made (step counters, running
    statistics) and the global random stream (dropout) at the same state each time, so that training-mode passes
    compare exactly."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved = {name: b.detach().clone() for name, b in module.named_buffers()}

    def __call__(
        self, images: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                if name in self.saved:
                    buffer.copy_(self.saved[name])
        torch.manual_seed(2)
        out: torch.Tensor = (call or self.module)(images)
        return out


def _perturbed(tensors: Mapping[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    """A perturbed copy of every floating-point tensor (same dtype and memory layout), as leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            noise = torch.empty_like(t).copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
            out[name] = (t.detach() + 0.5 * noise).requires_grad_(True)
    return out


def _rebuilt(module: nn.Module, replacement: Mapping[int, torch.Tensor]) -> nn.Module:
    """A shallow rebuild of ``module`` the way learn2learn's ``clone_module`` makes MAML's clones: a new object of the
    same class with a copy of its attributes, its registered parameters replaced (``replacement[id(parameter)]``),
    its buffers shared and its registered submodules rebuilt in turn. What the module keeps elsewhere is shared."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    parameters: dict[str, Any] = {k: None if p is None else replacement[id(p)] for k, p in module._parameters.items()}
    clone._parameters = parameters
    clone._buffers = module._buffers.copy()
    clone._modules = {k: None if m is None else _rebuilt(m, replacement) for k, m in module._modules.items()}
    return clone


_REGISTER = (
    "every layer, stage, parameter and buffer the forward pass uses must be registered (a submodule attribute, "
    "nn.ModuleList / nn.Sequential / nn.ModuleDict, nn.Parameter, register_buffer), never kept in a plain list or "
    "attribute, so that copy.deepcopy, torch.func.functional_call and learn2learn's clone() see it"
)


def check_backbone(
    backbone: str | Factory | nn.Module,
    *,
    image_size: int = 16,
    channels: int = 3,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Check a backbone against its contract; raise ``ContractError`` naming the first rule it breaks.

    ``backbone``: a registered name, a factory (class or function) called with keyword ``options``, or a module
    (deep-copied for each check). ``options``: default, small sizes for the built-ins (``SMALL_BACKBONE_OPTIONS``),
    none for others. The backbone is built with ``in_channels=channels`` when ``channels != 3`` (as runs on
    greyscale data build it), and, when its factory takes ``in_channels``, also for the other channel count.

    Checks, on float32 images ``[4, channels, image_size, image_size]``: an ``nn.Module`` with ``feature_dim``; output
    ``[N, feature_dim(size)]``, finite, at ``image_size`` and ``2 * image_size``, in training and evaluation mode;
    evaluation mode deterministic, without state changes, each image's features independent of the batch; in
    training mode a gradient reaches every parameter; no module or parameter held outside registration; every
    tensor requiring gradients the output depends on is a registered parameter; ``torch.func.functional_call`` runs
    (and differentiates) the parameters and buffers it is given; a deep copy runs its own weights and leaves the
    original alone; a learn2learn-style clone computes through its new (non-leaf) parameters.
    """
    factory, options, what = _backbone_factory(backbone, options)
    with _isolated():
        build_options = dict(options)
        instance = isinstance(backbone, nn.Module)  # built as it is: the caller made it for ``channels``
        if channels != 3 and not instance:
            _require(
                "in_channels" in build_options or _takes(factory, "in_channels"),
                what,
                f"has no in_channels option, so runs on {channels}-channel data cannot build it; add one",
            )
            build_options.setdefault("in_channels", channels)

        def make() -> nn.Module:
            torch.manual_seed(0)
            return _build(factory, build_options, what).train()

        _check_backbone_shapes_and_modes(make(), what, image_size, channels)
        _check_backbone_gradients(make(), what, image_size, channels)
        _check_backbone_interop(make, what, image_size, channels)
        if "in_channels" not in options and not instance and _takes(factory, "in_channels"):
            other = 1 if channels == 3 else 3
            torch.manual_seed(0)
            built = _build(factory, {**options, "in_channels": other}, what)
            images = torch.randn(2, other, image_size, image_size)
            with _step(what, f"built with in_channels={other} (honour the in_channels option), the forward pass"):
                out = built.eval()(images)
            _require(
                isinstance(out, torch.Tensor) and tuple(out.shape) == (2, _feature_dim(built, image_size, what)),
                what,
                f"built with in_channels={other} it does not map {other}-channel images {_shape(images)} to "
                f"[2, feature_dim({image_size})]: honour the in_channels option",
            )


def _check_backbone_shapes_and_modes(backbone: nn.Module, what: str, image_size: int, channels: int) -> None:
    held = _held_outside_registration(backbone)
    _require(not held, what, f"holds {', '.join(held)} outside its registered submodules and parameters: {_REGISTER}")
    for size in (image_size, 2 * image_size):
        images = torch.randn(4, channels, size, size)
        dim = _feature_dim(backbone, size, what)
        for mode in ("train", "eval"):
            backbone.train(mode == "train")
            with torch.no_grad():
                out = _forward_features(backbone, images, what, mode)
            _require(
                tuple(out.shape) == (4, dim),
                what,
                f"maps images {_shape(images)} to {_shape(out)} in {mode} mode, not [4, feature_dim({size})] = "
                f"[4, {dim}]",
            )
    backbone.eval()
    images = torch.randn(4, channels, image_size, image_size)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        first = _forward_features(backbone, images, what, "eval")
        second = _forward_features(backbone, images, what, "eval")
        one_at_a_time = torch.cat([_forward_features(backbone, images[i : i + 1], what, "eval") for i in range(4)])
    _require(torch.equal(first, second), what, "gives different features for the same images in evaluation mode")
    after = backbone.state_dict()
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    _require(not changed, what, f"changes its state in evaluation mode ({', '.join(changed)})")
    _require(
        _close(one_at_a_time, first),
        what,
        f"in evaluation mode an image's features depend on the other images of the batch (one image at a time "
        f"differs from the batch by up to {_max_difference(one_at_a_time, first)}): evaluation embeds images in "
        "batches of any size and caches the embeddings",
    )


def _check_backbone_gradients(backbone: nn.Module, what: str, image_size: int, channels: int) -> None:
    images = torch.randn(4, channels, image_size, image_size)
    out = _forward_features(backbone, images, what, "train")
    registered = {id(p) for p in backbone.parameters()}
    strangers = [t for t in _graph_leaves(out) if id(t) not in registered]
    _require(
        not strangers,
        what,
        f"computes with {len(strangers)} tensor(s) requiring gradients that are not its registered parameters "
        f"({', '.join(_shape(t) for t in strangers[:5])}): {_REGISTER}",
    )
    with _step(what, "backward from its features in training mode"):
        out.square().mean().backward()
    named = dict(backbone.named_parameters())
    _require(named, what, "has no parameters to learn")
    missing = _missing_gradients(named)
    _require(not missing, what, f"no gradient reaches {missing} in training mode: every parameter must be used")
    infinite = _infinite_gradients(named)
    _require(not infinite, what, f"gets gradients that are not finite for {infinite}")


def _check_backbone_interop(make: Callable[[], nn.Module], what: str, image_size: int, channels: int) -> None:
    images = torch.randn(4, channels, image_size, image_size, generator=torch.Generator().manual_seed(1))

    # torch.func.functional_call runs, and differentiates, the parameters it is given.
    backbone = make()
    replay = _Replay(backbone)
    original = replay(images).detach()
    params = _perturbed(dict(backbone.named_parameters()))
    with _step(what, "torch.func.functional_call with perturbed parameters"):
        out = replay(images, lambda x: torch.func.functional_call(backbone, params, (x,)))
    _require(
        not torch.allclose(out, original),
        what,
        f"torch.func.functional_call ignored the parameters it was given: {_REGISTER}",
    )
    grads = torch.autograd.grad(out.square().sum(), list(params.values()), allow_unused=True)
    unreached = [n for n, g in zip(params, grads) if g is None or not bool(g.abs().sum() > 0)]
    _require(not unreached, what, f"under torch.func.functional_call no gradient reaches {unreached}: {_REGISTER}")
    _require(
        all(p.grad is None for p in backbone.parameters()),
        what,
        f"under torch.func.functional_call gradients reach its own parameters, not the given ones: {_REGISTER}",
    )
    _require(
        torch.equal(replay(images), original),
        what,
        "torch.func.functional_call changed what the module itself computes afterwards",
    )
    buffers = _perturbed(dict(backbone.named_buffers()))
    if buffers:
        backbone.eval()
        with torch.no_grad():
            before = backbone(images)
            with _step(what, "torch.func.functional_call with perturbed buffers"):
                given = torch.func.functional_call(backbone, buffers, (images,))
            _require(
                not torch.allclose(given, before),
                what,
                f"torch.func.functional_call ignored the buffers it was given in evaluation mode: {_REGISTER}",
            )
            _require(torch.equal(backbone(images), before), what, "functional_call with buffers changed the module")

    # A deep copy runs its own weights, in both modes, and leaves the original alone.
    backbone = make()
    for mode in ("train", "eval"):
        backbone.train(mode == "train")
        replay = _Replay(backbone)
        original = replay(images).detach()
        with _step(what, "copy.deepcopy"):
            duplicate = copy.deepcopy(backbone)
        replay_duplicate = _Replay(duplicate)
        _require(
            torch.equal(replay_duplicate(images), original), what, f"a deep copy computes otherwise in {mode} mode"
        )
        with torch.no_grad():
            for tensor in duplicate.parameters():
                if tensor.is_floating_point():
                    tensor.mul_(1.5).add_(0.25)
        _require(
            not torch.allclose(replay_duplicate(images), original),
            what,
            f"a deep copy does not run its own weights in {mode} mode: {_REGISTER}",
        )
        _require(
            torch.equal(replay(images), original),
            what,
            f"changing a deep copy's weights changed the original's output in {mode} mode: {_REGISTER}",
        )

    # A learn2learn-style clone (MAML's clone()) computes through its new, non-leaf parameters.
    backbone = make()
    replay = _Replay(backbone)
    original = replay(images).detach()
    named = dict(backbone.named_parameters())
    deltas = _perturbed({n: torch.zeros_like(p) for n, p in named.items()})
    updated = {n: named[n] + deltas[n] for n in named}  # as after a MAML step: parameter + update
    clone = _rebuilt(backbone, {id(named[n]): updated[n] for n in named})
    with _step(what, "a learn2learn-style clone (registered parameters replaced)"):
        out = replay(images, clone)
    _require(
        not torch.allclose(out, original),
        what,
        f"a learn2learn-style clone ran the original's parameters, not its own: {_REGISTER}",
    )
    grads = torch.autograd.grad(out.square().sum(), list(deltas.values()), allow_unused=True)
    unreached = [n for n, g in zip(deltas, grads) if g is None or not bool(g.abs().sum() > 0)]
    _require(not unreached, what, f"a learn2learn-style clone's output does not depend on its {unreached}: {_REGISTER}")
    out = out.detach()
    expected = replay(images, lambda x: torch.func.functional_call(backbone, updated, (x,)))
    _require(
        _close(out, expected),
        what,
        f"a learn2learn-style clone computes otherwise than functional_call with the same parameters: {_REGISTER}",
    )
    _require(torch.equal(replay(images), original), what, "running a clone changed the original")


# ------------------------------------------------------------------------------------------------------ episodes


def _episodes(
    dtype: torch.dtype,
    image_size: int,
    channels: int = 3,
    b: int = EPISODES,
    ways: int = WAYS,
    shots: int = SHOTS,
    queries: int = QUERIES,
) -> EpisodeBatch:
    """B float episodes whose classes are noisy copies of per-class random images, the support classes in a
    different order in every episode (as SLA's joint labels are), query rows label-major."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(b, ways, channels, image_size, image_size, generator=g, dtype=dtype)
    support_labels = torch.stack([torch.randperm(ways, generator=g) for _ in range(b)]).repeat_interleave(shots, 1)
    query_labels = torch.arange(ways).repeat_interleave(queries).expand(b, -1).clone()

    def draw(labels: torch.Tensor) -> torch.Tensor:
        picked = torch.stack([means[e, labels[e]] for e in range(b)])
        return picked + 0.5 * torch.randn(picked.shape, generator=g, dtype=dtype)

    rows = torch.arange(b * ways * (shots + queries)).reshape(b, -1)
    split = ways * shots
    return EpisodeBatch(
        draw(support_labels), support_labels, draw(query_labels), query_labels, ways, rows[:, :split], rows[:, split:]
    )


def _task_loss(loss_kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the objectives train a learner's logits with (``Learner.loss_kind``)."""
    if loss_kind == MSE_SIGMOID:
        return F.mse_loss(torch.sigmoid(logits), F.one_hot(labels, logits.shape[-1]).to(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# ------------------------------------------------------------------------------------------------------ learners


def check_learner(
    learner: str | Factory,
    *,
    backbone: str | Factory | nn.Module = "conv4",
    backbone_options: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    image_size: int = 16,
    dtype: torch.dtype = torch.float64,
    objectives: Sequence[str] = LEARNER_OBJECTIVES,
) -> None:
    """Check a learner against its contract; raise ``ContractError`` naming the first rule it breaks.

    ``learner``: a registered name, or a factory (class or function) called as ``factory(backbone=..., **options)``
    like ``LEARNERS.create``. ``backbone``: a registered name (small sizes for the built-ins), a factory or a
    module; ``dtype``: float64 by default, so that equalities hold to rounding.

    Checks, on 3 episodes of 3 ways, 2 shots and 2 queries of ``image_size`` RGB images (support classes in a
    different order in every episode): a ``Learner`` with a valid ``loss_kind`` (``cross_entropy`` or
    ``mse_sigmoid``), boolean scale attributes, JSON ``settings()``, float ``pop_diagnostics()``; logits
    ``[B, N*Q, ways]``, finite, inputs left unchanged; in evaluation mode the batch equals one episode at a time,
    relabelling the support classes permutes the logits' columns (unless the learner declares
    ``label_equivariant = False``), and an ``EmbeddingLearner``'s ``head(embed(support), ..., embed(query))`` equals
    its forward; in training mode the declared loss is finite and a finite gradient reaches every parameter, and,
    when the learner declares ``episodes_independent``, the batch equals one episode at a time there too (when its
    training passes are deterministic); it trains and predicts with ``objectives`` (rotations, N*M-way episodes).
    """
    factory, what = _resolve(LEARNERS, learner, "learner")
    backbone_factory, backbone_build, backbone_what = _backbone_factory(backbone, backbone_options)
    learner_options = dict(options or {})

    def make(objective: str | None = None) -> Learner:
        """The learner; a pretraining one with the classifiers ``objective`` trains (None: the plain WAYS-way)."""
        torch.manual_seed(0)
        body = _build(backbone_factory, backbone_build, backbone_what)
        with _step(what, f"building it as factory(backbone=<{backbone_what}>, **{learner_options})"):
            built = factory(backbone=body, **learner_options)
        _require(
            isinstance(built, Learner),
            what,
            f"gives a {qualified_name(type(built))}, not a fewshot_sla.learners.base.Learner: subclass Learner "
            "(or EmbeddingLearner, whose logits depend on the images through per-image embeddings only)",
        )
        assert isinstance(built, Learner)
        _require(
            built.regime in (EPISODIC, PRETRAINING),
            what,
            f"declares regime {built.regime!r}; choose {EPISODIC!r} or {PRETRAINING!r}",
        )
        if built.regime == PRETRAINING:  # the engine gives it a classifier per width its objective trains
            _require(
                isinstance(built, EmbeddingLearner) and callable(getattr(built, "add_classifier", None)),
                what,
                "declares the pretraining regime but is not an EmbeddingLearner with add_classifier(features, classes)",
            )
            features = _feature_dim(built.backbone, image_size, backbone_what)
            widths: tuple[int, ...] = (WAYS,)
            if objective is not None:
                widths = OBJECTIVES.create(objective, transform="rotation", feature_dim=features).training_ways(WAYS)
            add_classifier = cast(Callable[[int, int], None], built.add_classifier)
            for classes in widths:
                with _step(what, f"add_classifier({features}, {classes})"):
                    add_classifier(features, classes)
        return built.to(dtype)

    with _isolated():
        episode = _episodes(dtype, image_size)
        model = make()
        _check_learner_attributes(model, what)
        _check_learner_eval(model.eval(), what, episode)
        _check_learner_training(make().train(), what, episode)
        if model.episodes_independent:
            _check_learner_independent_in_training(make().train(), what, episode)
        feature_dim = _feature_dim(make().backbone, image_size, backbone_what)
        for name in objectives:
            _check_learner_with_objective(make(name), what, name, feature_dim, episode, dtype)


def _check_learner_attributes(learner: Learner, what: str) -> None:
    _require(
        learner.loss_kind in (CROSS_ENTROPY, MSE_SIGMOID),
        what,
        f"declares loss_kind {learner.loss_kind!r}; choose {CROSS_ENTROPY!r} (softmax cross-entropy of the logits) "
        f"or {MSE_SIGMOID!r} (mean squared error of sigmoid(logits) against one-hot targets)",
    )
    for flag in ("episodes_independent", "supports_checkpointing"):
        _require(isinstance(getattr(learner, flag), bool), what, f"{flag} is {getattr(learner, flag)!r}, not a bool")
    micro = learner.preferred_micro_batch
    _require(
        micro is None or (isinstance(micro, int) and micro >= 1),
        what,
        f"preferred_micro_batch is {micro!r}, not None or an int >= 1",
    )
    with _step(what, "settings()"):
        settings = learner.settings()
    _require(isinstance(settings, dict), what, f"settings() gives a {type(settings).__name__}, not a dict")
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ContractError(f"{what}: settings() is not JSON (results.json records it): {err}") from err
    with _step(what, "pop_diagnostics()"):
        diagnostics = learner.pop_diagnostics()
    _require(
        isinstance(diagnostics, dict)
        and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in diagnostics.items()),
        what,
        f"pop_diagnostics() gives {diagnostics!r}, not a dict of str -> float",
    )


def _logits(
    learner: Learner, what: str, episode: EpisodeBatch, rows: slice | None = None, **changes: Any
) -> torch.Tensor:
    """The learner's logits on ``episode`` (episodes ``rows``; ``changes`` replace fields), shape-checked."""
    support, labels, query = episode.support, episode.support_labels, episode.query
    if rows is not None:
        support, labels, query = support[rows], labels[rows], query[rows]
    labels = changes.get("support_labels", labels)
    mode = "training" if learner.training else "evaluation"
    inputs = [t.clone() for t in (support, labels, query)]
    with _step(what, f"the forward pass in {mode} mode"):
        logits = learner(support, labels, query, episode.ways)
    for name, before, after in zip(("support", "support_labels", "query"), inputs, (support, labels, query)):
        _require(torch.equal(before, after), what, f"changes its {name} input in place")
    expected = (support.shape[0], query.shape[1], episode.ways)
    out = _finite_tensor(what, logits, f"the logits in {mode} mode")
    _require(
        tuple(out.shape) == expected,
        what,
        f"gives logits {_shape(out)} in {mode} mode for {expected[0]} episode(s) of {episode.ways} ways and "
        f"{expected[1]} queries, not [B, N*Q, ways] = {list(expected)}",
    )
    return out


def _check_learner_eval(learner: Learner, what: str, episode: EpisodeBatch) -> None:
    b = episode.support.shape[0]
    with torch.no_grad():
        batched = _logits(learner, what, episode)
        single = [_logits(learner, what, episode, slice(e, e + 1)) for e in range(b)]
    for e in range(b):
        _require(
            _close(single[e], batched[e : e + 1]),
            what,
            f"in evaluation mode episode {e}'s logits change when it is run with the other episodes of the batch "
            f"(by up to {_max_difference(single[e], batched[e : e + 1])}): an episode's logits must depend on that "
            "episode alone (evaluation splits its episodes into batches and over processes)",
        )
    if learner.label_equivariant:
        g = torch.Generator().manual_seed(1)
        perms = []
        for _ in range(b):
            perm = torch.randperm(episode.ways, generator=g)
            perms.append(perm if not torch.equal(perm, torch.arange(episode.ways)) else perm.roll(1))
        permutation = torch.stack(perms)  # class c is called permutation[e, c] in episode e
        relabelled = permutation.gather(1, episode.support_labels)
        with torch.no_grad():
            moved = _logits(learner, what, episode, support_labels=relabelled)
        back = moved.gather(2, permutation.unsqueeze(1).expand(-1, moved.shape[1], -1))
        _require(
            _close(back, batched),
            what,
            f"relabelling the support classes does not permute the logits' columns (off by up to "
            f"{_max_difference(back, batched)}): the logit of class c must follow c's support images, whatever its "
            "label (declare label_equivariant = False on a learner that ties labels to parameters by design)",
        )
    if isinstance(learner, EmbeddingLearner):
        with torch.no_grad(), _step(what, "embed(support) and embed(query) in evaluation mode"):
            support_features = learner.embed(episode.support)
            query_features = learner.embed(episode.query)
        for name, features, images in (
            ("support", support_features, episode.support),
            ("query", query_features, episode.query),
        ):
            _finite_tensor(what, features, f"embed({name})")
            _require(
                features.dim() == 3 and features.shape[:2] == images.shape[:2],
                what,
                f"embed({name}) gives {_shape(features)} for images {_shape(images)}, not [B, R, D]",
            )
        with torch.no_grad(), _step(what, "head(embed(support), labels, embed(query), ways)"):
            from_head = learner.head(support_features, episode.support_labels, query_features, episode.ways)
        _require(
            isinstance(from_head, torch.Tensor) and _close(from_head, batched),
            what,
            "head(embed(support), labels, embed(query), ways) differs from the forward pass in evaluation mode: "
            "cached evaluation calls head on stored embeddings, so forward must be head(embed(...)) exactly",
        )


def _check_learner_training(learner: Learner, what: str, episode: EpisodeBatch) -> None:
    logits = _logits(learner, what, episode)
    _require(
        logits.requires_grad,
        what,
        "gives logits that carry no gradient in training mode: they must be differentiable in the parameters",
    )
    loss = _task_loss(learner.loss_kind, logits, episode.query_labels)
    _require(bool(torch.isfinite(loss)), what, f"gives a {learner.loss_kind} loss that is not finite")
    with _step(what, f"backward from its {learner.loss_kind} loss"):
        loss.backward()
    named = dict(learner.named_parameters())
    _require(named, what, "has no parameters to learn")
    missing = _missing_gradients(named)
    _require(not missing, what, f"in training mode no gradient of the loss reaches {missing}")
    infinite = _infinite_gradients(named)
    _require(not infinite, what, f"gets gradients that are not finite for {infinite}")
    _require(
        any(bool(p.grad.abs().sum() > 0) for p in named.values() if p.grad is not None),
        what,
        "every gradient of the loss is zero: the logits must be differentiable in the parameters",
    )


def _check_learner_independent_in_training(learner: Learner, what: str, episode: EpisodeBatch) -> None:
    """``episodes_independent``: training-mode logits of the batch equal one episode at a time (same weights and
    state for every pass), when the training passes are deterministic at all."""
    with torch.no_grad():
        _logits(learner.eval(), what, episode)  # materialises lazy parameters; evaluation changes no state
    learner.train()
    state = copy.deepcopy(learner.state_dict())

    def run(seed: int, rows: slice | None = None) -> torch.Tensor:
        learner.load_state_dict(state)
        torch.manual_seed(seed)
        with torch.no_grad():
            return _logits(learner, what, episode, rows)

    batched = run(0)
    if not torch.equal(batched, run(1)):
        return  # random training passes (dropout): one episode at a time cannot be compared
    for e in range(episode.support.shape[0]):
        single = run(0, slice(e, e + 1))
        _require(
            _close(single, batched[e : e + 1]),
            what,
            f"declares episodes_independent, but in training mode episode {e}'s logits change when it is run with "
            f"the other episodes of the batch (by up to {_max_difference(single, batched[e : e + 1])}); declare "
            "episodes_independent = False when episodes share statistics (e.g. BatchNorm over the batch)",
        )


def _check_learner_with_objective(
    learner: Learner, what: str, name: str, feature_dim: int, episode: EpisodeBatch, dtype: torch.dtype
) -> None:
    with _step(what, f"building objective '{name}' with transform 'rotation'"):
        objective = OBJECTIVES.create(name, transform="rotation", feature_dim=feature_dim).to(dtype)
    learner.train()
    with _step(what, f"objective '{name}' loss (training)"):
        loss, _ = objective.loss(learner, episode)
    _require(
        isinstance(loss, torch.Tensor) and bool(torch.isfinite(loss)), what, f"objective '{name}' gives a bad loss"
    )
    with _step(what, f"backward from objective '{name}' loss"):
        loss.backward()
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    _require(grads, what, f"with objective '{name}' no gradient reaches the learner")
    _require(all(bool(torch.isfinite(g).all()) for g in grads), what, f"with objective '{name}' gradients not finite")
    _require(any(bool(g.abs().sum() > 0) for g in grads), what, f"with objective '{name}' every gradient is zero")
    learner.eval()
    with torch.no_grad(), _step(what, f"objective '{name}' predict (evaluation)"):
        predictions = objective.predict(learner, episode)
    declared = {kind.name for kind in objective.kinds}
    _require(set(predictions) == declared, what, f"objective '{name}' predicts {sorted(predictions)}")
    b, q = episode.query.shape[:2]
    for kind, logits in predictions.items():
        _finite_tensor(what, logits, f"objective '{name}' prediction '{kind}'")
        _require(
            tuple(logits.shape) == (b, q, episode.ways),
            what,
            f"objective '{name}' prediction '{kind}' is {_shape(logits)}, not {[b, q, episode.ways]}",
        )


# ------------------------------------------------------------------------------------------------ transformations


def check_transform(
    transform: str | Transformation, *, image_size: int = 8, group: bool = True, channels: Sequence[int] = (1, 3)
) -> None:
    """Check a transformation against its contract; raise ``ContractError`` naming the first rule it breaks.

    ``transform``: a registered name (its entry a ``Transformation`` or a factory) or a ``Transformation``.
    Checks: ``fewshot_sla.sla.check_transform`` on normalised probes of each of ``channels`` the transformation
    takes (``Transformation.channels``), square, and also non-square unless it declares ``square=True`` (the
    output's type, shape, dtype and device, copy 0 the identity, determinism, inputs untouched); row ``r*M + j``
    of ``__call__`` is ``ops[j](x_r)`` (cached evaluation applies the ops one by one); the M copies are distinct
    (class y's copy j gets its own joint label ``y*M + j``); with ``group`` (the paper's transformations, every
    built-in), transforming the copies again gives the same M copies (closed under composition); and
    ``augment_episode`` turns an N-way episode into the N*M-way one SI/AG read.
    """
    from fewshot_sla.errors import UserError

    if isinstance(transform, Transformation):
        what, entry = f"transform '{transform.name}' ({qualified_name(type(transform))})", None
        resolved = transform
    else:
        _, what = _resolve(TRANSFORMS, transform, "transform")
        entry = TRANSFORMS.get(transform)
        try:
            resolved = resolve_transform(transform)
        except UserError as err:
            raise ContractError(str(err)) from err
    with _isolated():
        takes = [c for c in channels if resolved.channels in (None, c)]
        _require(takes, what, f"takes none of {list(channels)} channels (it declares channels={resolved.channels})")
        for c in takes:
            try:
                sla.check_transform(resolved, channels=c, image_size=image_size, entry=entry)
            except UserError as err:
                raise ContractError(str(err)) from err
        m, c = resolved.m, takes[-1]
        images = torch.randn(2, 3, c, image_size, image_size, generator=torch.Generator().manual_seed(2))
        if not resolved.square:
            wide = torch.randn(2, 2, c, image_size, image_size + 2)
            doing = (
                f"the transformation of non-square images {_shape(wide)} (declare square=True when the ops need H == W)"
            )
            with _step(what, doing):
                out = resolved(wide)
            _require(
                isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 2 * m, c, image_size, image_size + 2),
                what,
                f"does not keep the shape of non-square images {_shape(wide)}; declare square=True when the ops need "
                "H == W (quarter turns)",
            )
        with torch.no_grad():
            copies = resolved(images)
            by_op = torch.stack([op(images) for op in resolved.ops], dim=2).flatten(1, 2)
        _require(
            copies.shape == by_op.shape and _close(copies, by_op),
            what,
            "stacks rows other than ops[j](x_r) at row r*M + j: cached evaluation applies ops[j] image by image, "
            "training calls the transformation",
        )
        flat = copies[0, :m].flatten(1)  # the M copies of one image
        for j in range(m):
            for k in range(j):
                _require(
                    not _close(flat[j], flat[k]),
                    what,
                    f"copies {k} and {j} are the same images: each copy j is its own class (joint label y*M + j), so "
                    "the M copies must differ",
                )
        if group:
            with torch.no_grad():
                twice = resolved(copies[0, :m].unsqueeze(0))[0].flatten(1)  # t_k(t_j(x)) at row j*M + k
            for j in range(m):
                for k in range(m):
                    image = twice[j * m + k]
                    _require(
                        any(_close(image, flat[i]) for i in range(m)),
                        what,
                        f"is not closed under composition: copy {k} of copy {j} is none of the M copies (the SLA "
                        "paper's transformations, and every built-in, form a group; pass group=False to "
                        "check_transform for a transformation that is not one by design)",
                    )
        _check_augmented_episode(resolved, what, c, image_size)


def _check_augmented_episode(transform: Transformation, what: str, channels: int, image_size: int) -> None:
    episode = _episodes(torch.float32, image_size, channels=channels, b=2)
    m, n = transform.m, episode.ways
    with _step(what, "augment_episode (the N*M-way episode of SLA)"):
        augmented = augment_episode(episode, transform)
    s = episode.support.shape[1]
    _require(
        augmented.ways == n * m and augmented.support.shape[1] == s * m,
        what,
        f"gives an augmented episode of {augmented.ways} ways and {augmented.support.shape[1]} support rows, not "
        f"N*M = {n * m} ways and {s * m} rows",
    )
    labels = augmented.support_labels
    _require(torch.equal(labels, joint_labels(episode.support_labels, m)), what, "gives wrong joint labels")
    _require(
        sorted(labels[0].unique().tolist()) == list(range(n * m)),
        what,
        "does not give every joint label y*M + j once per class and copy",
    )
    for j, op in enumerate(transform.ops):
        _require(
            _close(augmented.support[:, j::m], op(episode.support)),
            what,
            f"the augmented episode's rows with joint labels y*M + {j} are not ops[{j}] of class y's images",
        )


# ------------------------------------------------------------------------------------------------------ objectives


class _PlainProtoNet(Learner):
    """A prototype learner written as a plain ``Learner`` (not an ``EmbeddingLearner``), so that objectives take
    their generic path."""

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
    ) -> torch.Tensor:
        b = support.shape[0]
        support_features = self.backbone(support.flatten(0, 1)).reshape(b, support.shape[1], -1)
        query_features = self.backbone(query.flatten(0, 1)).reshape(b, query.shape[1], -1)
        onehot = F.one_hot(support_labels, ways).to(support_features.dtype)
        prototypes = onehot.transpose(1, 2) @ support_features / onehot.sum(1).clamp(min=1).unsqueeze(-1)
        return -(query_features.unsqueeze(2) - prototypes.unsqueeze(1)).square().sum(-1)


def check_objective(
    objective: str | Factory,
    *,
    transform: str | Transformation = "rotation",
    image_size: int = 16,
    dtype: torch.dtype = torch.float64,
) -> None:
    """Check a training objective against its contract; raise ``ContractError`` naming the first rule it breaks.

    ``objective``: a registered name, or a factory called as ``factory(transform=..., feature_dim=...)`` like
    ``OBJECTIVES.create``. Checks: an ``Objective`` whose ``kinds`` are ``PredictionKind``s with distinct names,
    each the one ``prediction_kinds.kind_table()`` holds under its name (a registered objective adds its own kinds;
    a name clash with another kind is refused); with a ProtoNet over a small Conv-4, as an ``EmbeddingLearner`` and as
    a plain ``Learner``, on 3 episodes of 3 ways: ``loss`` is a finite scalar with float metrics ``loss`` (its
    value) and ``acc`` (in 0..1), a finite gradient reaches the learner and every parameter of the objective, and in
    evaluation mode ``predict`` gives exactly the declared kinds, each ``[B, N*Q, N]`` and finite; and cached
    evaluation (``predict_copies`` with the head, on each copy's stored embeddings) equals ``predict`` on images.
    """
    factory, what = _resolve(OBJECTIVES, objective, "objective")
    from fewshot_sla.backbones.conv4 import Conv4
    from fewshot_sla.learners.protonet import ProtoNet

    with _isolated():
        probe_backbone = Conv4(hidden=4)
        feature_dim = probe_backbone.feature_dim(image_size)

        def make() -> Objective:
            torch.manual_seed(0)
            with _step(what, f"building it with transform={transform!r}, feature_dim={feature_dim}"):
                built = factory(transform=transform, feature_dim=feature_dim)
            _require(
                isinstance(built, Objective),
                what,
                f"gives a {qualified_name(type(built))}, not a fewshot_sla.objectives.Objective: subclass it (cached "
                "evaluation calls its predict_copies)",
            )
            assert isinstance(built, Objective)
            return built.to(dtype)

        kinds = _check_declared_kinds(make(), what)
        episode = _episodes(dtype, image_size)
        learners: list[tuple[str, Callable[[], Learner]]] = [
            ("an EmbeddingLearner (protonet)", lambda: ProtoNet(Conv4(hidden=4)).to(dtype)),
            ("a plain Learner", lambda: _PlainProtoNet(Conv4(hidden=4)).to(dtype)),
        ]
        for described, build_learner in learners:
            torch.manual_seed(0)
            _check_objective_with(make(), build_learner(), f"{what} with {described}", kinds, episode)
        torch.manual_seed(0)
        _check_cached_prediction(make(), ProtoNet(Conv4(hidden=4)).to(dtype).eval(), what, episode)


def _check_declared_kinds(objective: Objective, what: str) -> list[str]:
    kinds = objective.kinds
    _require(
        isinstance(kinds, tuple) and kinds and all(isinstance(k, PredictionKind) for k in kinds),
        what,
        f"declares kinds {kinds!r}, not a non-empty tuple of fewshot_sla.prediction_kinds.PredictionKind",
    )
    names = [k.name for k in kinds]
    _require(len(set(names)) == len(names), what, f"declares a kind twice: {names}")
    table = kind_table()
    for kind in kinds:
        known = table.get(kind.name)
        _require(
            known is not None,
            what,
            f"declares kind '{kind.name}' that prediction_kinds.kind_table() does not know: register the objective "
            "(OBJECTIVES), whose kinds the table reads",
        )
        _require(
            known == kind,
            what,
            f"declares kind {kind} but the table holds {known} under the name '{kind.name}': choose another name",
        )
    return names


def _check_objective_with(
    objective: Objective, learner: Learner, what: str, kinds: list[str], episode: EpisodeBatch
) -> None:
    learner.train()
    objective.train()
    with _step(what, "loss(learner, episode) in training mode"):
        result = objective.loss(learner, episode)
    _require(
        isinstance(result, tuple) and len(result) == 2,
        what,
        "loss(learner, episode) must return (loss, metrics)",
    )
    loss, metrics = result
    _require(
        isinstance(loss, torch.Tensor) and loss.dim() == 0 and bool(torch.isfinite(loss)),
        what,
        f"gives loss {loss!r}, not a finite scalar tensor",
    )
    _require(
        isinstance(metrics, dict) and all(isinstance(v, float) for v in metrics.values()),
        what,
        f"gives metrics {metrics!r}, not a dict of floats",
    )
    _require(
        "loss" in metrics and "acc" in metrics,
        what,
        f"gives metrics {sorted(metrics)} without 'loss' and 'acc' (every objective logs both)",
    )
    _require(
        math.isclose(metrics["loss"], float(loss.detach()), rel_tol=1e-5, abs_tol=1e-6),
        what,
        f"logs loss {metrics['loss']} but returns {float(loss.detach())}",
    )
    _require(0.0 <= metrics["acc"] <= 1.0, what, f"logs acc {metrics['acc']}, not in 0..1")
    with _step(what, "backward from the loss"):
        loss.backward()
    learner_parameters = dict(learner.named_parameters())
    _require(
        any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in learner_parameters.values()),
        what,
        "no gradient of the loss reaches the learner",
    )
    own = dict(objective.named_parameters())
    missing = _missing_gradients(own)
    _require(not missing, what, f"no gradient of the loss reaches the objective's own parameters {missing}")
    infinite = _infinite_gradients({**learner_parameters, **own})
    _require(not infinite, what, f"gives gradients that are not finite for {infinite}")
    learner.eval()
    objective.eval()
    with torch.no_grad(), _step(what, "predict(learner, episode) in evaluation mode"):
        predictions = objective.predict(learner, episode)
    _require(isinstance(predictions, dict), what, f"predict gives a {type(predictions).__name__}, not a dict")
    missing_kinds = [k for k in kinds if k not in predictions]
    _require(
        not missing_kinds,
        what,
        f"declares kind(s) {missing_kinds} that predict does not give (it gives {sorted(predictions)})",
    )
    extra = [k for k in predictions if k not in kinds]
    _require(not extra, what, f"predicts kind(s) {extra} it does not declare in kinds ({kinds})")
    b, q = episode.query.shape[:2]
    for kind in kinds:
        logits = _finite_tensor(what, predictions[kind], f"prediction '{kind}'")
        _require(
            tuple(logits.shape) == (b, q, episode.ways),
            what,
            f"gives prediction '{kind}' {_shape(logits)}, not N-way logits [B, N*Q, N] = {[b, q, episode.ways]}",
        )


def _check_cached_prediction(objective: Objective, learner: EmbeddingLearner, what: str, episode: EpisodeBatch) -> None:
    """``predict_copies(head, CopiedEpisode of each copy's embeddings)``, as cached evaluation computes it (the
    embedding of ``ops[j](x)`` per image and copy, sample-major), equals ``predict`` on the images."""
    objective.eval()
    m = objective.prediction_copies
    ops = objective.transform.ops[:m]
    _require(1 <= m <= objective.transform.m, what, f"prediction_copies is {m}, not in 1..M")

    def copies(images: torch.Tensor) -> torch.Tensor:
        per_copy = torch.stack([learner.embed(op(images)) for op in ops], dim=2)  # [B, R, m, D]
        return per_copy.flatten(1, 2)

    with torch.no_grad(), _step(what, "predict_copies(learner.head, embeddings) (cached evaluation)"):
        expected = objective.predict(learner, episode)
        cached = objective.predict_copies(
            learner.head,
            CopiedEpisode(
                copies(episode.support),
                episode.support_labels,
                copies(episode.query),
                episode.query_labels,
                episode.ways,
                m,
            ),
        )
    _require(
        set(cached) == set(expected),
        what,
        f"cached evaluation (predict_copies) gives kinds {sorted(cached)}, predict {sorted(expected)}",
    )
    for kind, logits in expected.items():
        _require(
            _close(cached[kind], logits),
            what,
            f"cached evaluation (predict_copies on each copy's embeddings) gives another prediction '{kind}' than "
            f"predict on images (off by up to {_max_difference(cached[kind], logits)}): write the prediction once, "
            "in predict_copies",
        )


# ------------------------------------------------------------------------------------------ every registered entry


def check_all_registered(kinds: Sequence[str] = ("backbones", "learners", "transforms", "objectives")) -> list[str]:
    """Run every check on every registered entry of ``kinds`` (built-ins and installed plug-ins); return what was
    checked (``"learner 'protonet'"``, ...) or raise one ``ContractError`` listing every failure."""
    checks: dict[str, tuple[Any, Callable[[str], None]]] = {
        "backbones": (BACKBONES, lambda name: check_backbone(name)),
        "learners": (LEARNERS, lambda name: check_learner(name)),
        "transforms": (TRANSFORMS, lambda name: check_transform(name)),
        "objectives": (OBJECTIVES, lambda name: check_objective(name)),
    }
    unknown = [k for k in kinds if k not in checks]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; choose from {sorted(checks)}")
    checked, failures = [], []
    for kind in kinds:
        registry, check = checks[kind]
        for name in registry.names():
            checked.append(f"{registry.kind} '{name}'")
            try:
                check(name)
            except ContractError as err:
                failures.append(str(err))
            except Exception as err:
                reason = " ".join(str(err).split())[:300]
                failures.append(f"{registry.kind} '{name}': the check raised {type(err).__name__}: {reason}")
    if failures:
        raise ContractError(
            f"{len(failures)} of {len(checked)} registered entries break their contract:\n- " + "\n- ".join(failures)
        )
    return checked
