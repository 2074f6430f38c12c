"""A split's *canonical order* (``CanonicalOrder``): classes sorted by name, image identifiers sorted within a class.

Episodes are drawn in canonical positions, so a seed names the same episodes, image for image, in every store built
from the same source, whatever order that store keeps its images in; the order's fingerprint names the split's
content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from fewshot_sla.episodes.spec import EpisodeSpec
from fewshot_sla.episodes.split import SplitLike
from fewshot_sla.errors import UserError, setting


def identifiers_fingerprint(class_names: Sequence[str], class_sizes: np.ndarray, identifiers: Sequence[str]) -> str:
    """sha256 of ``class<TAB>identifier\\n`` for every image, identifiers grouped by class in canonical order."""
    classes = np.repeat(np.arange(len(class_names)), class_sizes).tolist()
    lines = "".join(f"{class_names[c]}\t{ident}\n" for c, ident in zip(classes, identifiers, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()


class CanonicalOrder:
    """A split's images in canonical order: classes sorted by name, identifiers sorted within a class.

    Canonical position ``p`` is the p-th image in that order; ``rows[p]`` is its row in the split.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        image_ids: Sequence[str],
        *,
        where: str = "split",
    ) -> None:
        names = [str(c) for c in class_names]
        ids = [str(i) for i in image_ids]
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(label_array) != len(ids):
            raise ValueError(f"{where}: {len(label_array)} labels but {len(ids)} image identifiers")
        if len(label_array) and (label_array.min() < 0 or label_array.max() >= len(names)):
            raise ValueError(f"{where}: labels must lie in 0..{len(names) - 1}")
        for kind, values in (("class name", names), ("image identifier", ids)):
            if len(set(values)) != len(values):
                dup = next(v for v, c in zip(sorted(values), sorted(values)[1:], strict=False) if v == c)
                raise UserError(f"{where} has the duplicate {kind} '{dup}'; each must be unique (fix the dataset)")
        if any("\n" in v for v in names + ids):
            raise UserError(f"{where} has a class name or image identifier with a line break; rename it")
        rank = np.empty(len(names), dtype=np.int64)
        rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
        image_rank = rank[label_array]
        order = sorted(range(len(ids)), key=lambda i: (image_rank[i], ids[i]))
        self.class_names: tuple[str, ...] = tuple(sorted(names))
        self.identifiers: tuple[str, ...] = tuple(ids[i] for i in order)
        self.rows = np.asarray(order, dtype=np.int64)
        self.class_sizes = np.bincount(image_rank, minlength=len(names)).astype(np.int64)
        self.where = where

    @classmethod
    def of_split(cls, split: SplitLike) -> CanonicalOrder:
        """The canonical order of a store split."""
        return cls(split.class_names, split.labels, split.image_ids, where=f"split '{split.name}'")

    @property
    def class_starts(self) -> np.ndarray:
        """Canonical position of each class's first image."""
        return np.concatenate(([0], np.cumsum(self.class_sizes)[:-1])).astype(np.int64)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the ``class<TAB>identifier`` lines in canonical order: names the split's content."""
        return identifiers_fingerprint(self.class_names, self.class_sizes, self.identifiers)

    def check(self, spec: EpisodeSpec, prefix: str = "") -> None:
        """Raise a UserError when ``spec`` cannot be drawn from this split; the advice names the settings
        ``<prefix>ways``, ``<prefix>shots`` and ``<prefix>queries`` (``train_`` for the training episodes)."""
        n_classes = len(self.class_names)
        if spec.ways > n_classes:
            raise UserError(
                f"{spec.ways}-way episodes need {spec.ways} classes but {self.where} has {n_classes}; "
                f"use {setting(prefix + 'ways')} {n_classes} or fewer"
            )
        smallest = int(np.argmin(self.class_sizes))
        size = int(self.class_sizes[smallest])
        if spec.per_class > size:
            raise UserError(
                f"{spec.shots} shots + {spec.queries} queries need {spec.per_class} images per class but "
                f"class '{self.class_names[smallest]}' of {self.where} has {size}; "
                f"lower {setting(prefix + 'shots')}/{setting(prefix + 'queries')} to at most {size} together"
            )
