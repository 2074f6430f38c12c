"""Episode sets (``EpisodeSet``): a fixed, shareable list of episodes naming images by identifier, drawn with a seed
from a split's canonical order, saved as a deterministic ``.npz`` named by its content hash, loaded and validated."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from fewshot_sla.atomic import atomic_path
from fewshot_sla.episodes.batch import EpisodeBatch
from fewshot_sla.episodes.canonical import CanonicalOrder, identifiers_fingerprint
from fewshot_sla.episodes.rows import episode_batches
from fewshot_sla.episodes.sampler import PositionSampler
from fewshot_sla.episodes.spec import EpisodeSpec, whole_number
from fewshot_sla.episodes.split import SplitLike
from fewshot_sla.errors import UserError, command

# Episode sets are drawn this many episodes at a time (the last chunk cut short), so a set is a prefix of
# any longer set made with the same seed from the same source. Changing it changes every set.
SET_CHUNK = 1000
SET_FORMAT = 1
_SET_ARRAYS = ("identifiers", "class_names", "class_sizes", "positions")


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
        count = whole_number("count", count, 1)
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
        return identifiers_fingerprint(self.class_names, self.class_sizes, self.identifiers)

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
        """The ``episodes make`` action that regenerates this set (into ``out``, if given), an ``errors.command``
        marker (``errors.render`` reads it)."""
        s = self.spec
        return command(
            "episodes make",
            dataset=self.dataset,
            split=self.split,
            ways=s.ways,
            shots=s.shots,
            queries=s.queries,
            count=self.count,
            seed=self.seed,
            out=out,
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
            raise UserError(f"no episode set at '{path}'; check the path or make one with '{command('episodes make')}'")
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
                f"regenerate it with '{command('episodes make')}'"
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
                f"use a set made for '{dataset}' ('{command('episodes make', dataset=dataset)} ...')"
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
