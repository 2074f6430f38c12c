"""Self-supervised label augmentation (SLA): transformations, label augmentation of an episode,
aggregation of joint logits into N-way predictions, and the self-distillation loss.

Layout (see DESIGN.md): a transformation with M copies maps images ``[..., R, C, H, W]`` to
``[..., R*M, C, H, W]`` sample-major (row ``r*M + j`` is ``t_j(x_r)``); the joint label of class ``y``
under ``t_j`` is ``y*M + j`` (class-major), so an N-way episode becomes an N*M-way one.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fewshot_sla.errors import UserError
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


def augment_episode(episode: Any, transform: Transformation) -> Any:
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
    return dataclasses.replace(episode, **changes)


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
    """A Transformation from a registered name (entry: a Transformation or a factory) or an instance."""
    if isinstance(spec, Transformation):
        return spec
    entry = TRANSFORMS.get(spec)
    transform = entry if isinstance(entry, Transformation) else entry()
    if not isinstance(transform, Transformation):
        raise UserError(
            f"transform '{spec}' is registered as {entry!r}, which does not give a Transformation; "
            "fix the plug-in that registers it"
        )
    return transform


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
