"""Episodes: the N-way K-shot Q-query spec, a batched seeded sampler, and fixed, hashed episode sets.

Everything here works in a split's *canonical order* (classes sorted by name, image identifiers sorted
within a class), so a seed names the same episodes, image for image, in every store built from the same
source, whatever order that store keeps its images in.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import numbers
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fewshot_sla.atomic import atomic_path
from fewshot_sla.errors import UserError

# Episode sets are drawn this many episodes at a time (the last chunk cut short), so a set is a prefix of
# any longer set made with the same seed from the same source. Changing it changes every set.
SET_CHUNK = 1000
SET_FORMAT = 1
_SET_ARRAYS = ("identifiers", "class_names", "class_sizes", "positions")


class RowReader(Protocol):
    """Images left on disk (``fewshot_sla.data.disk_images.DiskImages``): rows read on demand onto ``device``."""

    shape: torch.Size  # [N, H, W, 3]
    device: torch.device

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 ``[len(rows), H, W, 3]`` on ``device``."""
        ...

    def submit(self, read: Callable[[], torch.Tensor]) -> Future[torch.Tensor]:
        """Run ``read`` in the background."""
        ...


class SplitLike(Protocol):
    """What episodes need of a split (``fewshot_sla.data.store.Split`` is one)."""

    name: str
    labels: torch.Tensor  # int64 [N], indexing class_names
    class_names: list[str]
    image_ids: list[str]

    @property
    def images(self) -> torch.Tensor | RowReader:
        """uint8 ``[N, H, W, 3]``, in memory or on disk."""
        ...


def _whole(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= minimum, else a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{name} must be a whole number >= {minimum}, got {value!r}; pass a value >= {minimum}")
    return int(value)


@dataclass(frozen=True)
class EpisodeSpec:
    """An N-way K-shot Q-query episode: ``ways`` classes, ``shots`` support and ``queries`` query images each."""

    ways: int
    shots: int
    queries: int

    def __post_init__(self) -> None:
        for field in ("ways", "shots", "queries"):
            object.__setattr__(self, field, _whole(field, getattr(self, field), 1))

    @property
    def per_class(self) -> int:
        """Images drawn from each chosen class (support + query)."""
        return self.shots + self.queries

    @property
    def tag(self) -> str:
        """Short name used in file names, e.g. ``5w1s15q``."""
        return f"{self.ways}w{self.shots}s{self.queries}q"


def _fingerprint(class_names: Sequence[str], class_sizes: np.ndarray, identifiers: Sequence[str]) -> str:
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
        return _fingerprint(self.class_names, self.class_sizes, self.identifiers)

    def check(self, spec: EpisodeSpec, flags: str = "--") -> None:
        """Raise a UserError when ``spec`` cannot be drawn from this split; the advice names the options
        ``<flags>ways``, ``<flags>shots`` and ``<flags>queries`` (``--train-`` for the training episodes)."""
        n_classes = len(self.class_names)
        if spec.ways > n_classes:
            raise UserError(
                f"{spec.ways}-way episodes need {spec.ways} classes but {self.where} has {n_classes}; "
                f"use {flags}ways {n_classes} or fewer"
            )
        smallest = int(np.argmin(self.class_sizes))
        size = int(self.class_sizes[smallest])
        if spec.per_class > size:
            raise UserError(
                f"{spec.shots} shots + {spec.queries} queries need {spec.per_class} images per class but "
                f"class '{self.class_names[smallest]}' of {self.where} has {size}; "
                f"lower {flags}shots/{flags}queries to at most {size} together"
            )


class PositionSampler:
    """Draws B episodes at once as canonical positions ``[B, N, K+Q]`` (label-major), on ``device``.

    Per episode: N classes uniformly without replacement, in random order (the n-th gets label n); per class,
    K+Q distinct images uniformly, in random order, the first K for support. The random stream depends on the
    batch sizes asked.
    """

    def __init__(
        self, order: CanonicalOrder, spec: EpisodeSpec, *, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        order.check(spec)
        self.spec = spec
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(_whole("seed", seed, 0))
        self._sizes = torch.as_tensor(order.class_sizes, device=self.device)
        self._starts = torch.as_tensor(order.class_starts, device=self.device)
        self._width = int(order.class_sizes.max())
        self._slot = torch.arange(self._width, device=self.device)
        # Draws per class for the fast path: enough to see K+Q distinct images almost always when classes
        # are a few times larger than K+Q (the usual case); other rows take the slower exact path.
        self._draws = 2 * spec.per_class + 8

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Canonical positions of ``batch_size`` new episodes, int64 ``[B, N, K+Q]``, drawn from ``generator``
        (default: the sampler's own)."""
        b = _whole("batch size", batch_size, 1)
        n, g = self.spec.ways, generator or self.generator
        class_keys = torch.rand(b, len(self._sizes), generator=g, device=self.device)
        classes = class_keys.topk(n, dim=1).indices  # [B, N]: a uniform ordered N-subset
        offsets = self._distinct_offsets(self._sizes.take(classes).view(-1), g).view(b, n, -1)
        return self._starts.take(classes).unsqueeze(-1) + offsets

    def _distinct_offsets(self, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """K+Q distinct offsets below each of ``sizes`` ``[R]``, a uniform ordered sample for each row.

        Fast path: the first K+Q distinct values of a few i.i.d. uniform draws (sequential sampling that skips
        repeats, i.e. sampling without replacement). Rows whose draws hold too few distinct values are
        redrawn exactly: the K+Q smallest of one uniform key per image of the class.
        """
        kq, draws = self.spec.per_class, self._draws
        values = torch.randint(0, 1 << 62, (len(sizes), draws), generator=generator, device=self.device)
        values %= sizes.unsqueeze(1)
        sorted_values, draw_index = values.sort(dim=1, stable=True)
        # A value equal to its sorted predecessor repeats an earlier draw: rank it last.
        draw_index[:, 1:].masked_fill_(sorted_values[:, 1:] == sorted_values[:, :-1], draws)
        first = draw_index.topk(kq, dim=1, largest=False)  # the first K+Q distinct values, in draw order
        offsets = sorted_values.gather(1, first.indices)
        short = first.values[:, -1] >= draws
        if short.any():
            rows = short.nonzero().squeeze(1)
            keys = torch.rand(len(rows), self._width, generator=generator, device=self.device)
            keys.masked_fill_(self._slot >= sizes[rows].unsqueeze(1), 2.0)  # past the class: never chosen
            offsets[rows] = keys.topk(kq, dim=1, largest=False).indices
        return offsets


@dataclass
class EpisodeBatch:
    """B episodes: ``support`` uint8 ``[B, N*K, C, H, W]``, ``query`` uint8 ``[B, N*Q, C, H, W]``, labels in 0..N-1.

    Rows are label-major (support row n*K+k and query row n*Q+q have label n). The image tensors are
    channels-last views of one gathered block (use ``reshape``, not ``view``, to merge their image dims);
    ``support_index``/``query_index`` give each row's row in the split (e.g. for feature caches).
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    ways: int
    support_index: torch.Tensor
    query_index: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Number of episodes B."""
        return self.support.shape[0]

    def select(self, episodes: slice) -> EpisodeBatch:
        """Some of the episodes (a slice along the batch dimension), as views."""
        return EpisodeBatch(
            self.support[episodes],
            self.support_labels[episodes],
            self.query[episodes],
            self.query_labels[episodes],
            self.ways,
            self.support_index[episodes],
            self.query_index[episodes],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EpisodeBatch:
        """The same episodes with every tensor on ``device``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return EpisodeBatch(
            move(self.support),
            move(self.support_labels),
            move(self.query),
            move(self.query_labels),
            self.ways,
            move(self.support_index),
            move(self.query_index),
        )


def _wide_rows(images: torch.Tensor) -> torch.Tensor:
    """Each image as one row of the widest integer type that tiles it: ``index_select`` copies such rows
    several times faster than the 4-D uint8 tensor (about as fast as a plain memory copy)."""
    flat = images.reshape(images.shape[0], -1)
    for dtype in (torch.int64, torch.int32):
        width = dtype.itemsize // images.element_size()
        if width > 1 and flat.shape[1] % width == 0 and flat.storage_offset() % width == 0 and flat.stride(1) == 1:
            return flat.view(dtype)
    return flat


def take_rows(images: torch.Tensor | RowReader, rows: torch.Tensor) -> torch.Tensor:
    """The split images of ``rows`` ``[R]``, uint8 ``[R, H, W, C]`` on the images' device, from memory or disk."""
    if not isinstance(images, torch.Tensor):
        return images.take(rows)
    picked = _wide_rows(images).index_select(0, rows.to(images.device))
    return picked.view(images.dtype).view(len(rows), *images.shape[1:])


def _flat_rows(rows: torch.Tensor, spec: EpisodeSpec) -> torch.Tensor:
    """Split rows ``[B, N, K+Q]`` in the order ``gather_episodes`` reads them: every support row, then every query."""
    k = spec.shots
    return torch.cat((rows[:, :, :k].reshape(len(rows), -1), rows[:, :, k:].reshape(len(rows), -1)), dim=1).view(-1)


def gather_episodes(
    images: torch.Tensor | RowReader, rows: torch.Tensor, spec: EpisodeSpec, picked: torch.Tensor | None = None
) -> EpisodeBatch:
    """An EpisodeBatch from split ``images`` ``[N, H, W, C]`` and split rows ``[B, ways, K+Q]``, in one gather
    (or from ``picked``, those rows' images already read, e.g. in the background)."""
    if len(images.shape) != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, C] with C = 1 or 3, got {list(images.shape)}")
    b, n, k, q = rows.shape[0], spec.ways, spec.shots, spec.queries
    if tuple(rows.shape) != (b, n, k + q):
        raise ValueError(f"rows must be [B, {n}, {k + q}], got {list(rows.shape)}")
    rows = rows.to(images.device)
    support_index = rows[:, :, :k].reshape(b, n * k)
    query_index = rows[:, :, k:].reshape(b, n * q)
    h, w, c = images.shape[1:4]
    if picked is None:
        picked = take_rows(images, _flat_rows(rows, spec))
    picked = picked.view(b, n * (k + q), h, w, c).permute(0, 1, 4, 2, 3)
    label = torch.arange(n, device=images.device).view(1, n, 1)
    return EpisodeBatch(
        support=picked[:, : n * k],
        support_labels=label.expand(b, n, k).reshape(b, n * k),
        query=picked[:, n * k :],
        query_labels=label.expand(b, n, q).reshape(b, n * q),
        ways=n,
        support_index=support_index,
        query_index=query_index,
    )


@dataclass
class _Ahead:
    """A meta-batch drawn and read in advance: valid while the sampler's generator is still in ``before``."""

    batch_size: int
    before: torch.Tensor
    after: torch.Tensor
    rows: torch.Tensor
    images: Future[torch.Tensor]


class EpisodeSampler:
    """Random N-way K-shot Q-query episodes from a split, B at a time, sampled and gathered on the images' device.

    The same split content, spec and seed (and the same sequence of batch sizes) give the same episodes, whether
    the split is in memory or on disk. On disk, each call also draws the next meta-batch (of the same size) from
    a copy of the generator and reads it in the background; the next call takes it when its size matches and the
    generator was not moved meanwhile (e.g. restored from a checkpoint), and otherwise draws afresh, so that the
    sampler's generator only ever advances by the batches it returned.
    """

    def __init__(self, split: SplitLike, spec: EpisodeSpec, *, seed: int) -> None:
        self.split = split
        self.spec = spec
        self.order = CanonicalOrder.of_split(split)
        device = split.images.device
        self.positions = PositionSampler(self.order, spec, seed=seed, device=device)
        self._rows = torch.as_tensor(self.order.rows, device=device)
        self._ahead: _Ahead | None = None

    def sample(self, batch_size: int) -> EpisodeBatch:
        """``batch_size`` new episodes."""
        images = self.split.images
        if isinstance(images, torch.Tensor):
            return gather_episodes(images, self._rows.take(self.positions.sample(batch_size)), self.spec)
        ahead, self._ahead = self._ahead, None
        generator = self.positions.generator
        if ahead is not None and ahead.batch_size == batch_size and torch.equal(ahead.before, generator.get_state()):
            generator.set_state(ahead.after)
            rows, picked = ahead.rows, ahead.images.result()
        else:
            rows = self._rows.take(self.positions.sample(batch_size))
            picked = images.take(_flat_rows(rows, self.spec))
        self._ahead = self._draw_ahead(images, batch_size)
        return gather_episodes(images, rows, self.spec, picked)

    def _draw_ahead(self, images: RowReader, batch_size: int) -> _Ahead:
        generator = self.positions.generator
        before = generator.get_state()
        copy = torch.Generator(device=self.positions.device)
        copy.set_state(before)
        rows = self._rows.take(self.positions.sample(batch_size, copy))
        flat = _flat_rows(rows, self.spec)
        return _Ahead(batch_size, before, copy.get_state(), rows, images.submit(lambda: images.take(flat)))

    def batches(self, batch_size: int, count: int) -> Iterator[EpisodeBatch]:
        """``count`` successive batches of ``batch_size`` episodes."""
        for _ in range(_whole("batch count", count, 1)):
            yield self.sample(batch_size)


def read_ahead(images: torch.Tensor | RowReader, blocks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``take_rows`` of each block of split rows in turn; from disk, the next block is read in the background
    while the caller works on the current one."""
    if isinstance(images, torch.Tensor):
        for block in blocks:
            yield take_rows(images, block)
        return
    pending: Future[torch.Tensor] | None = None
    for block in blocks:
        upcoming = images.submit(functools.partial(images.take, block))
        if pending is not None:
            yield pending.result()
        pending = upcoming
    if pending is not None:
        yield pending.result()


def episode_batches(
    images: torch.Tensor | RowReader, rows: torch.Tensor, spec: EpisodeSpec, batch_size: int
) -> Iterator[EpisodeBatch]:
    """The episodes of split rows ``[count, N, K+Q]`` in order, ``batch_size`` at a time (the last may be
    smaller), the next batch read ahead from disk."""
    step = _whole("batch size", batch_size, 1)
    chunks = [rows[start : start + step] for start in range(0, rows.shape[0], step)]
    for chunk, picked in zip(chunks, read_ahead(images, [_flat_rows(c, spec) for c in chunks]), strict=True):
        yield gather_episodes(images, chunk, spec, picked)


def _blob(values: Sequence[str]) -> np.ndarray:
    return np.frombuffer("\n".join(values).encode(), dtype=np.uint8)


def _unblob(blob: np.ndarray) -> tuple[str, ...]:
    text = blob.tobytes().decode()
    return tuple(text.split("\n")) if text else ()


@dataclass(frozen=True, eq=False)
class EpisodeSet:
    """A fixed, shareable list of episodes naming images by identifier (canonical positions into ``identifiers``).

    ``positions`` is ``[count, ways, K+Q]``; ``identifiers`` is the whole split in canonical order, grouped
    by class (``class_sizes`` images of each of ``class_names``).
    """

    dataset: str
    split: str
    spec: EpisodeSpec
    seed: int
    class_names: tuple[str, ...]
    class_sizes: np.ndarray
    identifiers: tuple[str, ...]
    positions: np.ndarray

    @classmethod
    def make(
        cls, order: CanonicalOrder, *, dataset: str, split: str, spec: EpisodeSpec, count: int, seed: int
    ) -> EpisodeSet:
        """Draw ``count`` episodes with ``seed`` from a split's canonical order (identifiers only, no pixels)."""
        count = _whole("count", count, 1)
        sampler = PositionSampler(order, spec, seed=seed)
        chunks = [sampler.sample(SET_CHUNK) for _ in range(0, count, SET_CHUNK)]
        dtype = np.dtype("<u2") if len(order.identifiers) <= 1 << 16 else np.dtype("<u4")
        return cls(
            dataset=dataset,
            split=split,
            spec=spec,
            seed=int(seed),
            class_names=order.class_names,
            class_sizes=order.class_sizes.astype("<i8"),
            identifiers=order.identifiers,
            positions=torch.cat(chunks)[:count].numpy().astype(dtype),
        )

    @property
    def count(self) -> int:
        """Number of episodes."""
        return int(self.positions.shape[0])

    @cached_property
    def identifiers_fingerprint(self) -> str:
        """The fingerprint (see ``CanonicalOrder.fingerprint``) of the split the set was drawn from."""
        return _fingerprint(self.class_names, self.class_sizes, self.identifiers)

    def _meta(self) -> dict[str, object]:
        return {
            "format": SET_FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "ways": self.spec.ways,
            "shots": self.spec.shots,
            "queries": self.spec.queries,
            "count": self.count,
            "seed": self.seed,
            "identifiers_sha256": self.identifiers_fingerprint,
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "identifiers": _blob(self.identifiers),
            "class_names": _blob(self.class_names),
            "class_sizes": np.ascontiguousarray(self.class_sizes, dtype="<i8"),
            "positions": np.ascontiguousarray(self.positions),
        }

    @cached_property
    def content_hash(self) -> str:
        """sha256 over a canonical serialisation of the metadata and every array: the set's identity."""
        h = hashlib.sha256(b"fewshot-sla episode set\n")
        h.update(json.dumps(self._meta(), sort_keys=True, separators=(",", ":")).encode())
        for name, array in self._arrays().items():
            h.update(f"\n{name} {array.dtype.str} {list(array.shape)}\n".encode())
            h.update(array.tobytes())
        return h.hexdigest()

    @staticmethod
    def default_name(dataset: str, split: str, spec: EpisodeSpec, count: int, seed: int) -> str:
        """The conventional file name, e.g. ``miniimagenet-test-5w1s15q-1000-seed0.npz``."""
        return f"{dataset}-{split}-{spec.tag}-{count}-seed{seed}.npz"

    def make_command(self, out: str | Path | None = None) -> str:
        """The ``fewshot-sla episodes make`` command that regenerates this set (into ``out``, if given)."""
        s = self.spec
        return (
            f"fewshot-sla episodes make --dataset {self.dataset} --split {self.split} --ways {s.ways} "
            f"--shots {s.shots} --queries {s.queries} --count {self.count} --seed {self.seed}"
            + (f" --out {out}" if out is not None else "")
        )

    def save(self, path: str | Path) -> Path:
        """Write the set atomically as a deterministic ``.npz`` (same set, same bytes)."""
        meta = dict(self._meta(), content_sha256=self.content_hash)
        arrays = dict(self._arrays(), meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8))
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, array, allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                archive.writestr(info, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EpisodeSet:
        """Read a set written by ``save``; a missing, unreadable, edited or inconsistent file is a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no episode set at '{path}'; check the path or make one with 'fewshot-sla episodes make'")
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("a plain .npy array, not an .npz archive")
            with loaded as npz:
                arrays = {name: npz[name] for name in _SET_ARRAYS + ("meta",)}
            meta = json.loads(arrays.pop("meta").tobytes().decode())
            if meta.get("format") != SET_FORMAT:
                raise UserError(
                    f"'{path}' has episode-set format {meta.get('format')!r}, this fewshot-sla reads "
                    f"format {SET_FORMAT}; upgrade fewshot-sla or regenerate the set"
                )
            spec = EpisodeSpec(meta["ways"], meta["shots"], meta["queries"])
            episode_set = cls(
                dataset=str(meta["dataset"]),
                split=str(meta["split"]),
                spec=spec,
                seed=int(meta["seed"]),
                class_names=_unblob(arrays["class_names"]),
                class_sizes=arrays["class_sizes"],
                identifiers=_unblob(arrays["identifiers"]),
                positions=arrays["positions"],
            )
            stored_hash = str(meta["content_sha256"])
            intact = (
                episode_set.content_hash == stored_hash
                and dict(episode_set._meta(), content_sha256=stored_hash) == meta
            )
        except UserError:
            raise
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            raise UserError(
                f"'{path}' is not a readable episode set ({type(err).__name__}: {err}); "
                "regenerate it with 'fewshot-sla episodes make'"
            ) from None
        if not intact:
            raise UserError(
                f"'{path}' was altered or damaged: its content hash does not match; restore it or "
                f"regenerate it with '{episode_set.make_command(path)}'"
            )
        episode_set._validate(path)
        return episode_set

    def _validate(self, path: Path) -> None:
        """Check that the positions form valid episodes (UserError otherwise)."""

        def bad(what: str) -> UserError:
            return UserError(
                f"'{path}' is not a valid episode set: {what}; regenerate it with '{self.make_command(path)}'"
            )

        s = self.spec
        if (
            len(self.class_names) != len(self.class_sizes)
            or int(self.class_sizes.sum()) != len(self.identifiers)
            or (self.class_sizes < 0).any()
        ):
            raise bad("its class table does not add up to its identifier table")
        if self.positions.ndim != 3 or self.positions.shape[1:] != (s.ways, s.per_class):
            raise bad(f"episode array of shape {list(self.positions.shape)}, expected [count, {s.ways}, {s.per_class}]")
        pos = self.positions.astype(np.int64)
        if pos.size and pos.max() >= len(self.identifiers):
            raise bad("an episode names an image past the identifier table")
        class_of = np.repeat(np.arange(len(self.class_names)), self.class_sizes)[pos]  # [count, N, K+Q]
        if (class_of != class_of[:, :, :1]).any():
            raise bad("an episode mixes classes under one label")
        classes = np.sort(class_of[:, :, 0], axis=1)
        images = np.sort(pos, axis=2)
        if (classes[:, 1:] == classes[:, :-1]).any() or (images[:, :, 1:] == images[:, :, :-1]).any():
            raise bad("an episode repeats a class or an image")

    def check_target(self, dataset: str, split: str) -> None:
        """Raise a UserError unless the set was made for split ``split`` of ``dataset``."""
        if dataset != self.dataset:
            raise UserError(
                f"this episode set was made for dataset '{self.dataset}', not '{dataset}'; "
                f"use a set made for '{dataset}' ('fewshot-sla episodes make --dataset {dataset} ...')"
            )
        if split != self.split:
            raise UserError(
                f"this episode set is for the '{self.split}' split, not '{split}'; "
                f"load the '{self.split}' split or use a set made for '{split}'"
            )

    def positions_in(self, order: CanonicalOrder, dataset: str, split: str) -> np.ndarray:
        """The episodes as canonical positions of ``order`` (a split of some store or list), int64 ``[count, N, K+Q]``.

        Checks that it is the split of ``dataset`` the set was made for and that every image the episodes use
        is there under the same class (extra images do not matter).
        """
        self.check_target(dataset, split)
        positions = self.positions.astype(np.int64)
        if order.fingerprint == self.identifiers_fingerprint:
            return positions
        position_of = {ident: p for p, ident in enumerate(order.identifiers)}
        used = np.unique(positions).tolist()
        missing = [self.identifiers[p] for p in used if self.identifiers[p] not in position_of]
        if missing:
            raise UserError(
                f"{len(missing)} images of this episode set are not in {dataset}/{split} "
                f"(e.g. '{missing[0]}'); the store was built from another source: rebuild it"
            )
        set_class = np.repeat(np.arange(len(self.class_names)), self.class_sizes)
        order_class = np.repeat(np.arange(len(order.class_names)), order.class_sizes)
        table = np.zeros(len(self.identifiers), dtype=np.int64)
        for p in used:
            table[p] = q = position_of[self.identifiers[p]]
            ours, theirs = self.class_names[set_class[p]], order.class_names[order_class[q]]
            if ours != theirs:
                raise UserError(
                    f"image '{self.identifiers[p]}' is class '{theirs}' in {dataset}/{split} but "
                    f"'{ours}' in this episode set; rebuild the store from the set's source"
                )
        return table[positions]

    def rows_in(self, split: SplitLike, dataset: str) -> torch.Tensor:
        """The split rows of every episode image, int64 ``[count, N, K+Q]`` on the split's device (checked as in
        ``positions_in``)."""
        order = CanonicalOrder.of_split(split)
        rows = order.rows[self.positions_in(order, dataset, split.name)]
        return torch.as_tensor(rows, device=split.images.device)

    def batches(self, split: SplitLike, dataset: str, batch_size: int) -> Iterator[EpisodeBatch]:
        """The set's episodes in order, ``batch_size`` at a time (the last batch may be smaller)."""
        yield from episode_batches(split.images, self.rows_in(split, dataset), self.spec, batch_size)
