"""The on-disk dataset store: one HDF5 file per dataset, read back as in-memory uint8 tensors (or, for a split
larger than memory, left on disk and read on demand: ``disk_images.py``).

Layout of ``<data_root>/<dataset>.h5`` (format version 1):

- root attributes: ``format_version``, ``dataset``, ``source_format`` (the raw layout it came from),
  ``image_size``, ``split_convention``, ``fingerprint`` (sha256 hex, see ``compute_fingerprint``),
  ``source_key`` (identifies the inputs, to skip a re-run), ``skipped_images`` and ``complete``
  (written last, so a store without it was never finished);
- ``normalize_mean`` / ``normalize_std``: the per-channel normalisation the model's input gets (absent in older
  stores: ImageNet's, as every RGB dataset uses);
- one group per split (``train``, ``val``, ``test``) with ``images`` uint8 ``[N, H, W, C]`` (C = 3, RGB, or 1 for
  greyscale datasets such as Omniglot; unfiltered, one image
  per chunk in stores written since out-of-core reading; older stores' 32 MB chunks read the same),
  ``labels`` int64 ``[N]`` indexing ``class_names`` (str ``[C]``), and ``image_ids`` (str ``[N]``);
- ``digest_<split>``: the XXH3-128 digest of the split's content (see ``split_digest``), checked on every load
  (about 6% of the load time): a store whose content changed after it was prepared is refused. Stores written
  before the digests load with ``checked`` False.
"""

from __future__ import annotations

import errno as errnos
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import xxhash

from fewshot_sla.data.disk_images import DiskImages
from fewshot_sla.errors import UserError
from fewshot_sla.io_errors import errno_of, io_error

FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
_STR = h5py.string_dtype("utf-8")
# Images are stored one per HDF5 chunk, so that a split read out of core fetches each image alone (a whole
# split still loads as fast as from 32 MB chunks); reads of whole splits go in steps of about this many bytes.
_STEP_BYTES = 32 << 20
_LABEL_CHUNK = 4096  # labels and identifiers per chunk


@dataclass(frozen=True)
class Normalization:
    """The model's input per channel: ``(x - mean) / std`` with x in [0, 1]; the number of entries is the number of
    image channels."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        """Image channels (3 for RGB, 1 for greyscale)."""
        return len(self.mean)


IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass
class Split:
    """One split: images uint8 ``[N, H, W, C]`` (a tensor in memory, or ``DiskImages`` read from the store on
    demand for a split larger than memory), labels int64 ``[N]`` on the images' device."""

    name: str
    images: torch.Tensor | DiskImages
    labels: torch.Tensor
    class_names: list[str]
    image_ids: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes (``labels`` lie in ``0..num_classes-1``)."""
        return len(self.class_names)


def store_path(dataset: str, data_root: str | os.PathLike) -> Path:
    """Where the store of ``dataset`` lives under ``data_root``."""
    return Path(data_root) / f"{dataset}.h5"


def _step_rows(image_shape: tuple[int, ...]) -> int:
    return min(16384, max(1, _STEP_BYTES // int(np.prod(image_shape))))


def create_split(h5: h5py.File, name: str, class_names: list[str], image_size: int, channels: int = 3) -> h5py.Group:
    """Add an empty, growable split group to a store being written (fill it with ``append_rows``)."""
    group = h5.create_group(name)
    group.create_dataset("class_names", data=np.array(class_names, dtype=object), dtype=_STR)
    group.create_dataset(
        "images",
        shape=(0, image_size, image_size, channels),
        maxshape=(None, image_size, image_size, channels),
        dtype=np.uint8,
        chunks=(1, image_size, image_size, channels),
    )
    group.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_LABEL_CHUNK,))
    group.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(_LABEL_CHUNK,))
    return group


def append_rows(group: h5py.Group, images: np.ndarray, labels: np.ndarray, image_ids: list[str]) -> None:
    """Append images ``[b, H, W, C]`` with their labels and identifiers to a split being written."""
    start, b = group["labels"].shape[0], len(labels)
    for key, value in (("images", images), ("labels", labels), ("image_ids", np.array(image_ids, dtype=object))):
        group[key].resize(start + b, axis=0)
        group[key][start:] = value


def _feed(digest: hashlib._Hash, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def compute_fingerprint(h5: h5py.File) -> str:
    """sha256 of everything a store holds: per split (sorted), its name, class names, labels, ids and pixels.

    Every field is length-prefixed (the pixels by their shape) so that different contents cannot hash alike.
    """
    digest = hashlib.sha256(f"fewshot-sla-store-v{FORMAT_VERSION}".encode())
    for name in sorted(h5.keys()):
        group = h5[name]
        _feed(digest, name.encode())
        _feed(digest, "\n".join(s.decode() for s in group["class_names"][()]).encode())
        _feed(digest, group["labels"][()].astype("<i8").tobytes())
        _feed(digest, "\n".join(s.decode() for s in group["image_ids"][()]).encode())
        images = group["images"]
        _feed(digest, repr(images.shape).encode())
        _stream(images, lambda pixels: digest.update(pixels.data))
    return digest.hexdigest()


class _Digest:
    """The XXH3-128 digest of a split: its name, class names, labels and image identifiers, then its pixels."""

    def __init__(self, name: str, class_names: list[str], labels: np.ndarray, image_ids: list[str]) -> None:
        self.hash = xxhash.xxh3_128()
        for part in (
            name.encode(),
            "\n".join(class_names).encode(),
            labels.astype("<i8").tobytes(),
            "\n".join(image_ids).encode(),
        ):
            self.hash.update(len(part).to_bytes(8, "little"))
            self.hash.update(part)

    def update(self, pixels: np.ndarray) -> None:
        self.hash.update(np.ascontiguousarray(pixels).data)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def split_digest(h5: h5py.File, name: str) -> str:
    """The digest of split ``name`` as stored in ``h5`` (read chunk by chunk)."""
    group = h5[name]
    digest = _Digest(
        name,
        [s.decode() for s in group["class_names"][()]],
        group["labels"][()],
        [s.decode() for s in group["image_ids"][()]],
    )
    _stream(group["images"], digest.update)
    return digest.hexdigest()


def finish_store(h5: h5py.File, attrs: dict[str, Any]) -> str:
    """Stamp a fully written store with its attributes, digests and fingerprint; mark it complete last."""
    for key, value in attrs.items():
        h5.attrs[key] = value
    for name in h5:
        h5.attrs[f"digest_{name}"] = split_digest(h5, name)
    h5.attrs["format_version"] = FORMAT_VERSION
    fingerprint = compute_fingerprint(h5)
    h5.attrs["fingerprint"] = fingerprint
    h5.attrs["complete"] = True
    return fingerprint


class DatasetStore:
    """A prepared dataset on disk; ``split(name)`` loads one split into memory (or onto a GPU).

    ``rebuild`` is the command that rebuilds this store, for error messages (``catalog.open_store`` gives it).
    """

    def __init__(self, path: str | os.PathLike, rebuild: str | None = None) -> None:
        self.path = Path(path)
        dataset = self.path.stem
        command = rebuild or f"fewshot-sla data prepare {dataset} --force"
        self.rebuild = command
        try:
            with h5py.File(self.path, "r") as h5:
                self.attrs: dict[str, Any] = {k: _plain(v) for k, v in h5.attrs.items()}
                self.split_names: list[str] = [s for s in SPLIT_NAMES if s in h5] + sorted(
                    s for s in h5 if s not in SPLIT_NAMES
                )
        except (OSError, KeyError, RuntimeError, ValueError) as err:  # h5py's errors for damaged files
            raise self._damaged(err) from None
        if not self.attrs.get("complete"):
            raise UserError(f"store {self.path} was never finished; rebuild it with '{command}'")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"store {self.path} has format version {self.attrs.get('format_version')}, this fewshot-sla "
                f"reads version {FORMAT_VERSION}; rebuild it with '{command}'"
            )

    def _damaged(self, err: BaseException) -> UserError:
        if isinstance(err, OSError) and errno_of(err) in (errnos.EACCES, errnos.EPERM, errnos.EIO):
            return io_error(err, self.path, "read the store")
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        return UserError(
            f"store {self.path} is unreadable (damaged or not an HDF5 file: {reason}); rebuild it with '{self.rebuild}'"
        )

    @property
    def checked(self) -> bool:
        """Whether the store has content digests, so that every load is verified."""
        return all(f"digest_{name}" in self.attrs for name in self.split_names)

    @property
    def dataset(self) -> str:
        """The registered dataset name this store holds."""
        return str(self.attrs["dataset"])

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the store's content (recomputed by ``verify``)."""
        return str(self.attrs["fingerprint"])

    @property
    def image_size(self) -> int:
        """Side length in pixels of every (square) image."""
        return int(self.attrs["image_size"])

    @property
    def normalization(self) -> Normalization:
        """The model's input normalisation, which also gives the images' channel count."""
        if "normalize_mean" not in self.attrs:
            return IMAGENET_NORMALIZATION
        mean, std = self.attrs["normalize_mean"], self.attrs["normalize_std"]
        return Normalization(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))

    def split(self, name: str, device: str | torch.device | None = None, *, in_memory: bool = True) -> Split:
        """Split ``name``: its images read into memory as one uint8 tensor, optionally straight onto ``device``;
        with ``in_memory`` False left on disk (``DiskImages``, whose reads land on ``device``). Either way the
        split's content is checked against its digest first (for a split left on disk, one streaming pass)."""
        if name not in self.split_names:
            raise UserError(f"{self.path} has no split '{name}'; choose one of: {', '.join(self.split_names)}")
        target = torch.device(device) if device is not None else torch.device("cpu")
        expected = self.attrs.get(f"digest_{name}")
        images: torch.Tensor | DiskImages | None = None
        try:
            with h5py.File(self.path, "r") as h5:
                group = h5[name]
                labels_array = group["labels"][()].astype(np.int64)
                class_names = [s.decode() for s in group["class_names"][()]]
                image_ids = [s.decode() for s in group["image_ids"][()]]
                digest = _Digest(name, class_names, labels_array, image_ids) if expected is not None else None
                if in_memory:
                    images = _read_images(group["images"], target, digest)
                elif digest is not None:
                    _stream(group["images"], digest.update)
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise self._damaged(err) from None
        if digest is not None and digest.hexdigest() != expected:
            raise UserError(
                f"the '{name}' split of store {self.path} does not match its checksum: its content changed "
                f"after it was prepared; rebuild it with '{self.rebuild}'"
            )
        if images is None:
            images = DiskImages(self.path, name, target, self.rebuild)
        labels = torch.from_numpy(labels_array).to(target)
        return Split(name=name, images=images, labels=labels, class_names=class_names, image_ids=image_ids)

    def image_bytes(self, name: str) -> int:
        """Bytes the images of split ``name`` take in memory."""
        try:
            with h5py.File(self.path, "r") as h5:
                shape = h5[name]["images"].shape
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise self._damaged(err) from None
        return int(np.prod(shape))

    def summary(self) -> dict[str, Any]:
        """What ``fewshot-sla data info`` shows: attributes plus classes and images per split."""
        try:
            with h5py.File(self.path, "r") as h5:
                splits = {
                    s: {"classes": int(h5[s]["class_names"].shape[0]), "images": int(h5[s]["labels"].shape[0])}
                    for s in self.split_names
                }
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise self._damaged(err) from None
        return {
            "dataset": self.dataset,
            "path": str(self.path),
            "checksums": self.checked,
            "source_format": self.attrs.get("source_format"),
            "image_size": self.image_size,
            "channels": self.normalization.channels,
            "split_convention": self.attrs.get("split_convention"),
            "fingerprint": self.fingerprint,
            "skipped_images": int(self.attrs.get("skipped_images", 0)),
            "splits": splits,
        }

    def verify(self) -> bool:
        """Recompute the fingerprint from the stored content; True when it matches the recorded one."""
        try:
            with h5py.File(self.path, "r") as h5:
                return compute_fingerprint(h5) == self.fingerprint
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise self._damaged(err) from None


def _plain(value: Any) -> Any:
    """HDF5 attribute values as plain Python scalars."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _stream(dataset: h5py.Dataset, feed: Callable[[np.ndarray], None]) -> None:
    """Pass every image of ``dataset`` to ``feed`` in order, a contiguous step of them at a time, through one buffer."""
    step = _step_rows(dataset.shape[1:])
    buffer = np.empty((min(step, dataset.shape[0]), *dataset.shape[1:]), dtype=np.uint8)
    for start in range(0, dataset.shape[0], step):
        n = min(step, dataset.shape[0] - start)
        dataset.read_direct(buffer, np.s_[start : start + n], np.s_[0:n])
        feed(buffer[:n])


def _read_images(dataset: h5py.Dataset, device: torch.device, digest: _Digest | None = None) -> torch.Tensor:
    """One uint8 tensor on ``device`` (fed to ``digest`` on the way); for a GPU, copy chunk by chunk through a
    pinned staging buffer."""
    if device.type == "cpu":
        out = torch.empty(dataset.shape, dtype=torch.uint8)
        if out.numel():
            dataset.read_direct(out.numpy())
            if digest is not None:
                digest.update(out.numpy())
        return out
    out = torch.empty(dataset.shape, dtype=torch.uint8, device=device)
    step = _step_rows(dataset.shape[1:])
    staging = torch.empty((step, *dataset.shape[1:]), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    for start in range(0, dataset.shape[0], step):
        n = min(step, dataset.shape[0] - start)
        dataset.read_direct(staging.numpy(), np.s_[start : start + n], np.s_[0:n])
        if digest is not None:
            digest.update(staging.numpy()[:n])
        out[start : start + n].copy_(staging[:n])
    return out
