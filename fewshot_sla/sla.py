"""Self-supervised label augmentation (SLA): transformations, label augmentation of an episode,
aggregation of joint logits into N-way predictions, and the self-distillation loss.

Layout (see DESIGN.md): a transformation with M copies maps images ``[..., R, C, H, W]`` to
``[..., R*M, C, H, W]`` sample-major (row ``r*M + j`` is ``t_j(x_r)``); the joint label of class ``y``
under ``t_j`` is ``y*M + j`` (class-major), so an N-way episode becomes an N*M-way one.

Plug-in transformations (``TRANSFORMS``; "Plug-in transformations" in docs/guide/plugins.md) follow the contract of
``Transformation``; ``checked_transform`` resolves a run's transformation and checks that contract on a probe batch
(``check_transform``), the one place training, evaluation and prediction get it from (``engine/build.build_model``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F

from fewshot_sla.errors import UserError, setting
from fewshot_sla.registry import TRANSFORMS

# Channel orders of RGB images: all six in lexicographic order (identity first), and the cyclic three.
ALL_CHANNEL_ORDERS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(3)))
CYCLIC_CHANNEL_ORDERS: tuple[tuple[int, ...], ...] = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


@dataclass(frozen=True)
class RotatePermute:
    """One built-in transformation: rotate by ``k`` quarter turns, then reorder the colour channels.

    ``channels[c]`` is the input channel that becomes output channel ``c``; ``None`` keeps the order.
    Works on any batch shape ``[..., C, H, W]`` in one call on the batch's device.
    """

    k: int = 0
    channels: tuple[int, ...] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.k % 4:
            images = torch.rot90(images, self.k, dims=(-2, -1))
        if self.channels is not None and self.channels != tuple(range(len(self.channels))):
            images = images[..., list(self.channels), :, :]
        return images


@dataclass(frozen=True)
class Transformation:
    """The M input transformations t_1..t_M of SLA (t_1 must be the identity), applied to whole batches.

    ``ops[j]`` maps ``[..., C, H, W]`` to the same shape. ``square`` says the ops need H == W (quarter
    turns); ``channels`` is the channel count the ops need (3 for colour permutations), or None.

    The contract of every transformation, built-in or plug-in (``check_transform`` checks it on a probe batch when
    a run builds its model, for training, evaluation and prediction alike):

    - **Input**: float images normalised with the store's mean and std (about zero mean, unit variance per
      channel, not 0..1 or 0..255), as a batch ``[B, R, C, H, W]`` (any leading shape ``[..., C, H, W]``); C is 3,
      or 1 on greyscale stores; H == W at the model's image size.
    - **Output**: ``[B, R*M, C, H, W]`` sample-major, row ``r*M + j`` is ``t_j(x_r)`` (``__call__`` stacks the ops
      so; each op maps ``[..., C, H, W]`` to the same shape, dtype and device, no resizing or cropping).
    - **Copy 0 is the identity**: ``ops[0](x)`` equals ``x``. SLA+SI reads copy 0 as the plain image, and
      ``mt``, ``sla+sd`` and the plain predictions take the plain images (or embeddings) from the copy-0 rows.
    - **Groups**: the M copies are the classes of the self-supervised task: class ``y`` under ``t_j`` gets the
      joint label ``y*M + j``, an N-way episode becomes N*M-way, and SI/AG read copy j's own N columns. Copies
      should therefore be distinct (and, as the built-ins, closed under composition: a group).
    - **Deterministic**: the same input gives the same output (random augmentation is ``--augment``'s job), and
      the ops never change their input in place.
    """

    name: str
    ops: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    square: bool = False
    channels: int | None = None

    def __post_init__(self) -> None:
        if not self.ops:
            raise ValueError(f"transformation '{self.name}' needs at least one op (the identity)")

    @property
    def m(self) -> int:
        """The number of transformed copies M (including the identity)."""
        return len(self.ops)

    def check(self, images: torch.Tensor) -> None:
        """Raise a UserError when the image batch ``[..., R, C, H, W]`` cannot take this transformation."""
        if images.dim() < 4:
            raise ValueError(f"transformation '{self.name}' needs a batch [..., R, C, H, W], got {list(images.shape)}")
        c, h, w = images.shape[-3:]
        if self.square and h != w:
            raise UserError(
                f"transformation '{self.name}' rotates by 90 degrees and needs square images, got {h}x{w}; "
                "resize or crop the images to a square size, or use 'rotation2' or a colour permutation"
            )
        if self.channels is not None and c != self.channels:
            raise UserError(
                f"transformation '{self.name}' permutes colour channels and needs {self.channels}-channel "
                f"images, got {c}; convert the images to RGB or use 'rotation'"
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[..., R, C, H, W]`` -> ``[..., R*M, C, H, W]``, sample-major (row r*M + j is t_j(x_r))."""
        self.check(images)
        return torch.stack([op(images) for op in self.ops], dim=-4).flatten(-5, -4)


def joint_labels(labels: torch.Tensor, m: int) -> torch.Tensor:
    """Labels ``[..., R]`` -> joint labels ``[..., R*M]``: row r*M + j gets ``labels[r]*M + j``."""
    offsets = torch.arange(m, device=labels.device, dtype=labels.dtype)
    return (labels.unsqueeze(-1) * m + offsets).flatten(-2)


def transformation_labels(rows: int, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The transformation index j of each of ``rows*M`` sample-major rows: ``0..M-1`` repeated."""
    return torch.arange(m, device=device).repeat(rows)


class Episode(Protocol):
    """What objectives and SLA read of a batch of episodes (``episodes.EpisodeBatch`` is one): float images
    ``[B, R, C, H, W]``, labels ``[B, R]`` in ``0..ways-1``."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    ways: int


EpisodeT = TypeVar("EpisodeT", bound=Episode)


def augment_episode(episode: EpisodeT, transform: Transformation) -> EpisodeT:
    """An N-way K-shot float episode -> the N*M-way K-shot episode of (class, transformation) pairs.

    Support and query images are transformed sample-major, labels become joint labels ``y*M + j``, and
    ``ways`` becomes N*M. ``episode`` is a dataclass with the EpisodeBatch fields; per-row
    ``support_index``/``query_index``, when present, are repeated so each copy names its source image.
    """
    m = transform.m
    changes: dict[str, Any] = {
        "support": transform(episode.support),
        "support_labels": joint_labels(episode.support_labels, m),
        "query": transform(episode.query),
        "query_labels": joint_labels(episode.query_labels, m),
        "ways": episode.ways * m,
    }
    for name in ("support_index", "query_index"):
        if hasattr(episode, name):
            changes[name] = getattr(episode, name).repeat_interleave(m, dim=-1)
    return dataclasses.replace(episode, **changes)  # type: ignore[type-var]  # a dataclass, as documented


def _joint_view(joint_logits: torch.Tensor, m: int) -> torch.Tensor:
    """``[B, Q*M, N*M]`` -> ``[B, Q, M, N, M]`` indexed (episode, query, copy j, class i, column's j')."""
    if joint_logits.dim() != 3 or joint_logits.shape[1] % m or joint_logits.shape[2] % m:
        raise ValueError(f"joint logits must be [B, Q*M, N*M] with M={m}, got {list(joint_logits.shape)}")
    b, qm, nm = joint_logits.shape
    return joint_logits.reshape(b, qm // m, m, nm // m, m)


def aggregate_si(joint_logits: torch.Tensor, m: int) -> torch.Tensor:
    """SLA+SI: joint logits ``[B, Q*M, N*M]`` -> ``[B, Q, N]``, the identity copy's own N columns (i, 1)."""
    return _joint_view(joint_logits, m)[:, :, 0, :, 0]


def aggregate_ag(joint_logits: torch.Tensor, m: int) -> torch.Tensor:
    """SLA+AG: joint logits ``[B, Q*M, N*M]`` -> ``[B, Q, N]``, s_i = mean over j of z_{i,j}(t_j(x)).

    Each copy j keeps only the N columns of its own transformation; the logits (not probabilities) are
    averaged over the M copies.
    """
    return torch.diagonal(_joint_view(joint_logits, m), dim1=2, dim2=4).mean(dim=-1)


def self_distillation_loss(
    single: torch.Tensor, aggregated: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """SLA+SD: CE(single, y) + T^2 * KL(softmax(agg/T) || softmax(single/T)), averaged over queries.

    ``single`` and ``aggregated`` are N-way logits ``[..., N]``, ``labels`` ``[...]``. The aggregated
    prediction is a fixed target: no gradient flows into it.
    """
    single = single.reshape(-1, single.shape[-1])
    target = aggregated.detach().reshape(-1, aggregated.shape[-1])
    ce = F.cross_entropy(single, labels.reshape(-1))
    kl = F.kl_div(
        F.log_softmax(single / temperature, dim=-1),
        F.log_softmax(target / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return ce + temperature**2 * kl


def resolve_transform(spec: str | Transformation) -> Transformation:
    """A Transformation from a registered name (entry: a Transformation or a factory) or an instance; an entry
    that does not give one is a UserError naming the plug-in (module.qualname)."""
    if isinstance(spec, Transformation):
        return spec
    entry = TRANSFORMS.get(spec)
    if isinstance(entry, Transformation):
        return entry
    try:
        transform = entry()
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"transform '{spec}' ({qualified_name(entry)}) failed when called with no arguments: "
            f"{type(err).__name__}: {_one_line(err)}; fix the plug-in: register a Transformation, or a factory "
            f"that returns one{CONTRACT}"
        ) from None
    if not isinstance(transform, Transformation):
        raise UserError(
            f"transform '{spec}' is registered as {qualified_name(entry)}, which gives a "
            f"{qualified_name(type(transform))}, not a {qualified_name(Transformation)}; fix the plug-in: return "
            f"Transformation(name, ops) (or an instance of a subclass){CONTRACT}"
        )
    return transform


# ----- the contract of a transformation, checked on a probe batch -----

CONTRACT = " (docs/guide/plugins.md: 'Plug-in transformations')"
# How far copy 0 may be from its input, and two calls on the same input from each other (float32 rounding only).
IDENTITY_TOLERANCE = 1e-6


def qualified_name(obj: object) -> str:
    """``module.qualname`` of a function or class, or of the class of any other object."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(obj).__name__)}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or "(no message)"


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, x.shape)) + "]"


def checked_transform(
    spec: str | Transformation, *, channels: int, image_size: int, device: torch.device | str = "cpu"
) -> Transformation:
    """The run's transformation (``resolve_transform``), its contract checked on a probe batch of ``channels`` x
    ``image_size`` x ``image_size`` normalised images on ``device`` (``check_transform``). Training, evaluation and
    prediction get their transformation here (``engine/build.build_model``)."""
    transform = resolve_transform(spec)
    entry = TRANSFORMS.get(spec) if isinstance(spec, str) else None
    check_transform(transform, channels=channels, image_size=image_size, device=device, entry=entry)
    return transform


def check_transform(
    transform: Transformation,
    *,
    channels: int,
    image_size: int,
    device: torch.device | str = "cpu",
    entry: object = None,
) -> None:
    """A one-line UserError naming the plug-in (module.qualname: a Transformation subclass, else the registered
    factory ``entry``, and the op) and the rule when ``transform`` breaks its contract (see ``Transformation``) on a
    probe batch ``[2, 2, channels, image_size, image_size]`` of normalised float32 images on ``device``: the output
    type, shape, dtype and device, copy 0 the identity (to ``IDENTITY_TOLERANCE``), determinism, finite values.

    Images the transformation cannot take (``Transformation.check``: non-square, wrong channels) are the data's
    UserError, raised as it is. The probe draws from its own generator and the global random state is restored.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 2, channels, image_size, image_size, generator=generator).to(device)
    name = f"transform '{transform.name}'{_plugin(transform, entry)}"
    transform.check(probe)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if type(transform).__call__ is Transformation.__call__:
            for j, op in enumerate(transform.ops):
                _check_output(f"{name}: copy {j} ({qualified_name(op)})", op, probe, probe, j == 0)
        else:
            m = transform.m
            expected = probe.unsqueeze(2).expand(-1, -1, m, -1, -1, -1).flatten(1, 2)
            _check_output(f"{name}: the output", transform, probe, expected, identity_rows=m)


def _plugin(transform: Transformation, entry: object) -> str:
    """`` (module.qualname)`` of the code to fix: a Transformation subclass, else the registered factory; nothing for
    a plain Transformation registered as it is (the message names its op)."""
    if type(transform) is not Transformation:
        return f" ({qualified_name(type(transform))})"
    if entry is None or isinstance(entry, Transformation):
        return ""
    return f" ({qualified_name(entry)})"


def _check_output(
    what: str,
    call: Callable[[torch.Tensor], Any],
    probe: torch.Tensor,
    like: torch.Tensor,
    identity: bool = False,
    identity_rows: int = 0,
) -> None:
    """Check ``call(probe)`` against the contract: a tensor shaped, typed and placed as ``like``, finite, the same
    on a second call, and equal to ``probe`` (``identity``), or its rows ``::identity_rows`` equal to ``probe``'s."""

    def broken(rule: str, fix: str) -> UserError:
        return UserError(f"{what} {rule}; {fix}{CONTRACT}")

    outputs = []
    for _ in range(2):
        original = probe.clone()
        try:
            out = call(probe)
        except UserError:
            raise
        except Exception as err:
            raise broken(
                f"raised {type(err).__name__}: {_one_line(err)} on normalised float32 images {_shape(probe)}",
                "a transformation takes float images normalised with the store's mean and std, [B, R, C, H, W]",
            ) from None
        if not torch.equal(probe, original):
            raise broken("changes its input in place", "return new tensors and leave the input unchanged")
        outputs.append(out)
    out = outputs[0]
    if not isinstance(out, torch.Tensor):
        raise broken(f"gives a {qualified_name(type(out))}, not a torch.Tensor", "return a tensor")
    if out.shape != like.shape:
        raise broken(
            f"has shape {_shape(out)} for images {_shape(probe)}, not {_shape(like)}",
            "each copy keeps the shape [..., C, H, W] of its input, and the M copies are stacked sample-major "
            "into [B, R*M, C, H, W]",
        )
    if out.dtype != like.dtype or out.device != like.device:
        raise broken(
            f"turns {like.dtype} images on {like.device} into {out.dtype} on {out.device}",
            "keep the input's dtype and device",
        )
    if not torch.isfinite(out).all():
        raise broken("gives values that are not finite from finite images", "keep every value finite")
    again = outputs[1]
    if not isinstance(again, torch.Tensor) or again.shape != out.shape or not _close(again, out):
        raise broken(
            "gives different images for the same input on a second call",
            f"make the transformation deterministic (random augmentation is {setting('augment')}'s job)",
        )
    if identity or identity_rows:
        got = out[:, ::identity_rows] if identity_rows else out
        if not _close(got, probe):
            rule = (
                "is not the identity" if identity else f"has a copy 0 (rows r*{identity_rows}) that is not the identity"
            )
            difference = (got - probe).abs().max().item()
            raise broken(
                f"{rule} (it changes the images by up to {difference:.3g})",
                "copy 0 must return its input unchanged: SLA+SI and SLA+AG read it as the plain image",
            )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=IDENTITY_TOLERANCE, atol=IDENTITY_TOLERANCE))


def _product(ks: tuple[int, ...], orders: tuple[tuple[int, ...], ...] | None, name: str) -> Transformation:
    """Rotations x colour orders, rotation-major: copy j = rotation index * len(orders) + order index."""
    ops = tuple(RotatePermute(k, order) for k in ks for order in (orders or (None,)))
    return Transformation(name, ops, square=any(k % 2 for k in ks), channels=3 if orders else None)


@TRANSFORMS.register("none")
def none() -> Transformation:
    """No transformation (M = 1): every objective reduces to the plain episode."""
    return _product((0,), None, "none")


@TRANSFORMS.register("rotation")
def rotation() -> Transformation:
    """Rotations by 0, 90, 180, 270 degrees (M = 4); needs square images."""
    return _product((0, 1, 2, 3), None, "rotation")


@TRANSFORMS.register("rotation2")
def rotation2() -> Transformation:
    """Rotations by 0 and 180 degrees (M = 2); works on non-square images."""
    return _product((0, 2), None, "rotation2")


@TRANSFORMS.register("color_perm")
def color_perm() -> Transformation:
    """All six orders of the RGB channels, identity first (M = 6)."""
    return _product((0,), ALL_CHANNEL_ORDERS, "color_perm")


@TRANSFORMS.register("color_perm3")
def color_perm3() -> Transformation:
    """The three cyclic orders of the RGB channels, identity first (M = 3)."""
    return _product((0,), CYCLIC_CHANNEL_ORDERS, "color_perm3")


@TRANSFORMS.register("rot_color_perm12")
def rot_color_perm12() -> Transformation:
    """Rotation x cyclic colour permutation (M = 12), rotation-major as in the reference code."""
    return _product((0, 1, 2, 3), CYCLIC_CHANNEL_ORDERS, "rot_color_perm12")


@TRANSFORMS.register("rot_color_perm24")
def rot_color_perm24() -> Transformation:
    """Rotation x all colour permutations (M = 24), rotation-major as in the reference code."""
    return _product((0, 1, 2, 3), ALL_CHANNEL_ORDERS, "rot_color_perm24")
