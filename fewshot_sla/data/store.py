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
  ``labels`` int64 ``[N]`` indexing ``class_names`` (str ``[C]``), and ``image_ids`` (str ``[N]``); text (these and
  the string attributes) is fixed-width UTF-8 (older stores' variable-length strings read the same);
- HDF5's 1.10 file format (``FILE_FORMAT``: checksummed metadata; older stores' 1.8 format reads the same), written
  through ``writing``, which turns a write the file system refuses into one ``OSError`` after a clean close;
- ``digest_<split>``: the XXH3-128 digest of the split's content (see ``split_digest``), checked on every load
  (about 6% of the load time): a store whose content changed after it was prepared is refused. Stores written
  before the digests load with ``checked`` False.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import xxhash

from fewshot_sla.data.disk_images import DiskImages
from fewshot_sla.errors import UserError, setting
from fewshot_sla.errors import command as action
from fewshot_sla.io_errors import IOFailure, errno_of, free_bytes, io_error

FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
# Images are stored one per HDF5 chunk, so that a split read out of core fetches each image alone (a whole
# split still loads as fast as from 32 MB chunks); reads of whole splits go in steps of about this many bytes.
_STEP_BYTES = 32 << 20
_LABEL_CHUNK = 4096  # labels and identifiers per chunk
# HDF5's file format as of 1.10 (readable by HDF5 1.10 and later): every piece of its metadata carries a checksum,
# so a damaged store is refused with an error instead of sending HDF5 into a crash or an endless loop (the 1.8
# format it writes by default has none); the pixels are covered by the splits' digests.
FILE_FORMAT = ("v110", "v110")


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


def joined(first: Split, second: Split, name: str) -> Split:
    """The images and classes of two splits as one (``second``'s labels after ``first``'s), e.g. train+val.

    Both must be in memory; a split left on disk gets one line saying how to hold it.
    """
    for split in (first, second):
        if not isinstance(split.images, torch.Tensor):
            raise UserError(
                f"{name} needs split '{split.name}' in memory, but it is over the data budget and read from disk; "
                f"raise {setting('data_memory')}"
            )
    assert isinstance(first.images, torch.Tensor) and isinstance(second.images, torch.Tensor)
    return Split(
        name,
        torch.cat([first.images, second.images]),
        torch.cat([first.labels, second.labels + first.num_classes]),
        first.class_names + second.class_names,
        first.image_ids + second.image_ids,
    )


def store_path(dataset: str, data_root: str | os.PathLike) -> Path:
    """Where the store of ``dataset`` lives under ``data_root``."""
    return Path(data_root) / f"{dataset}.h5"


def _step_rows(image_shape: tuple[int, ...]) -> int:
    return min(16384, max(1, _STEP_BYTES // int(np.prod(image_shape))))


def encode_text(value: str) -> bytes:
    """``value`` as the store keeps it: UTF-8, where bytes that are not UTF-8 (a file name from another system,
    which Python holds as surrogate escapes) are written as ``\\xNN``."""
    try:
        return value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode()


def _text(values: list[str], width: int | None = None) -> np.ndarray:
    """UTF-8 strings as a fixed-width byte array (``width`` bytes, by default the longest), as the store keeps text:
    variable-length strings would live in HDF5's global heap, which has no checksum, and a damaged one can send
    HDF5 into an endless loop."""
    encoded = [encode_text(value) for value in values]
    longest = max((len(e) for e in encoded), default=0)
    if width is not None and longest > width:
        raise ValueError(f"an identifier is {longest} bytes long, the store keeps at most {width}")
    return np.array(encoded, dtype=_text_type(longest if width is None else width))


def _text_type(width: int) -> np.dtype:
    """Fixed-width UTF-8 text of ``width`` bytes (numpy bytes tagged for h5py)."""
    return h5py.string_dtype("utf-8", length=max(1, width))


def create_split(
    h5: h5py.File, name: str, class_names: list[str], image_size: int, channels: int = 3, id_bytes: int = 256
) -> h5py.Group:
    """Add an empty, growable split group to a store being written (fill it with ``append_rows``); its image
    identifiers take at most ``id_bytes`` bytes of UTF-8 each."""
    group = h5.create_group(name)
    names = _text(class_names)
    group.create_dataset("class_names", data=names, dtype=_text_type(names.dtype.itemsize))
    group.create_dataset(
        "images",
        shape=(0, image_size, image_size, channels),
        maxshape=(None, image_size, image_size, channels),
        dtype=np.uint8,
        chunks=(1, image_size, image_size, channels),
    )
    group.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_LABEL_CHUNK,))
    id_chunk = max(1, min(_LABEL_CHUNK, (_LABEL_CHUNK * 8) // max(1, id_bytes)))  # as many bytes as a labels chunk
    group.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype=_text_type(id_bytes), chunks=(id_chunk,))
    return group


def append_rows(group: h5py.Group, images: np.ndarray, labels: np.ndarray, image_ids: list[str]) -> None:
    """Append images ``[b, H, W, C]`` with their labels and identifiers to a split being written."""
    start, b = group["labels"].shape[0], len(labels)
    ids = _text(image_ids, group["image_ids"].dtype.itemsize)
    for key, value in (("images", images), ("labels", labels), ("image_ids", ids)):
        group[key].resize(start + b, axis=0)
        group[key][start:] = value


def _feed(digest: hashlib._Hash, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def compute_fingerprint(h5: h5py.File, check: Callable[[], None] | None = None) -> str:
    """sha256 of everything a store holds: per split (sorted), its name, class names, labels, ids and pixels.

    Every field is length-prefixed (the pixels by their shape) so that different contents cannot hash alike.
    ``check`` is called between reads (a store being written: ``StoreWriter.check``).
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
        _stream(images, lambda pixels: digest.update(pixels.data), check)
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


def split_digest(h5: h5py.File, name: str, check: Callable[[], None] | None = None) -> str:
    """The digest of split ``name`` as stored in ``h5`` (read chunk by chunk; ``check`` between reads)."""
    group = h5[name]
    digest = _Digest(
        name,
        [s.decode() for s in group["class_names"][()]],
        group["labels"][()],
        [s.decode() for s in group["image_ids"][()]],
    )
    _stream(group["images"], digest.update, check)
    return digest.hexdigest()


def _set_attribute(h5: h5py.File, key: str, value: Any) -> None:
    """A store attribute; text as a fixed-width string (kept in the checksummed object header, see ``_text``)."""
    if isinstance(value, str):
        text = _text([value])
        h5.attrs.create(key, text[0], dtype=_text_type(text.dtype.itemsize))
    else:
        h5.attrs[key] = value


def finish_store(h5: h5py.File, attrs: dict[str, Any], check: Callable[[], None] | None = None) -> str:
    """Stamp a fully written store with its attributes, digests and fingerprint; mark it complete last. ``check``
    is called between reads (``StoreWriter.check``: a failed write or a Ctrl-C surfaces there)."""
    for key, value in attrs.items():
        _set_attribute(h5, key, value)
    for name in h5:
        _set_attribute(h5, f"digest_{name}", split_digest(h5, name, check))
    h5.attrs["format_version"] = FORMAT_VERSION
    fingerprint = compute_fingerprint(h5, check)
    _set_attribute(h5, "fingerprint", fingerprint)
    h5.attrs["complete"] = True
    return fingerprint


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def _write_at(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, view, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows
    return os.write(fd, view)


class _Sink:
    """The file a store is written to, as HDF5 sees it (h5py's file-object driver): every write HDF5 makes comes
    through here.

    HDF5 cannot recover from a write the file system refuses: its chunk and metadata caches stay dirty, every
    later flush and close fails again (h5py prints each as 'Exception ignored'), and the process may crash. So
    the first refused write (a full disk, a quota, an I/O error) is recorded here and never reported to HDF5:
    that write and every later one are held in memory instead, HDF5 carries on and closes normally, and
    ``StoreWriter.check`` raises the recorded error. Only the writes between the failure and the writer's next
    check are held (one batch of rows, the chunk cache, the metadata: a few MB, whatever the store's size).
    Reads (the digests of the finished store) come from the file, with the held writes laid over them.
    """

    def __init__(self, path: Path) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        self.fd = os.open(path, flags, 0o600)
        self.position = 0
        self.size = 0  # the file's size as HDF5 sees it
        self.failure: OSError | None = None
        self.held: list[tuple[int, bytes]] = []  # (offset, data) of the writes after the failure, in order

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = offset + (self.position if whence == os.SEEK_CUR else self.size if whence == os.SEEK_END else 0)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self.position))
        done = 0
        while done < n:
            got = _read_at(self.fd, view[done:n], self.position + done)
            if got == 0:  # past the end of what reached the disk
                view[done:n] = bytes(n - done)
                break
            done += got
        for offset, data in self.held:
            start, end = max(offset, self.position), min(offset + len(data), self.position + n)
            if start < end:
                view[start - self.position : end - self.position] = data[start - offset : end - offset]
        self.position += n
        return n

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self.size - self.position) if size is None or size < 0 else size)
        return bytes(buffer[: self.readinto(buffer)])

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.failure is None:
            try:
                done = 0
                while done < len(view):
                    written = _write_at(self.fd, view[done:], self.position + done)
                    if written <= 0:
                        raise OSError(errnos.ENOSPC, os.strerror(errnos.ENOSPC))
                    done += written
            except OSError as err:
                self.failure = err
        if self.failure is not None:
            self.held.append((self.position, bytes(view)))
        self.position += len(view)
        self.size = max(self.size, self.position)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.position if size is None else size
        if self.failure is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as err:
                self.failure = err
        self.held = [(offset, data[: size - offset]) for offset, data in self.held if offset < size]
        self.size = size
        return size

    def flush(self) -> None:
        """Nothing to do: every write went straight to the file (``atomic_path`` flushes it to the disk)."""

    def close(self) -> None:
        os.close(self.fd)


class _SignalHold:
    """SIGINT and SIGTERM, where Python handles them (in the main thread), held while HDF5 works on a store being
    written: a handler raising (Ctrl-C's KeyboardInterrupt) inside one of the sink's calls would fail HDF5's write
    or read. Held signals are delivered, to the handlers they were meant for, by ``deliver`` (between two HDF5
    calls) and on ``release``."""

    def __init__(self) -> None:
        self.previous: dict[int, Callable[..., Any]] = {}
        self.held: list[int] = []

    def hold(self) -> None:
        if self.previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if callable(handler):
                self.previous[signum] = handler
                signal.signal(signum, lambda number, frame: self.held.append(number))

    def release(self) -> None:
        previous, self.previous = self.previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        self._run(previous)

    def deliver(self) -> None:
        self._run(self.previous)

    def _run(self, handlers: dict[int, Callable[..., Any]]) -> None:
        while self.held:
            signum = self.held.pop(0)
            if signum in handlers:
                handlers[signum](signum, None)


class StoreWriter:
    """A store being written (``writing``): ``h5`` to fill with ``create_split`` / ``append_rows`` /
    ``finish_store``; ``expect`` before a split, ``check`` after each batch of rows, and ``released`` around long
    work that does not touch the store (reading the source), so that a Ctrl-C meanwhile acts at once."""

    def __init__(self, h5: h5py.File, sink: _Sink, shown: Path, signals: _SignalHold) -> None:
        self.h5, self._sink, self._shown, self._signals = h5, sink, shown, signals

    def check(self) -> None:
        """Between two HDF5 calls: deliver a Ctrl-C held meanwhile, or raise a write the file system refused (an
        ``OSError``)."""
        self._signals.deliver()
        if self._sink.failure is not None:
            raise self._sink.failure

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Signals act as usual in this block, which must not use ``h5``."""
        self._signals.release()
        try:
            yield
        finally:
            self._signals.hold()

    def expect(self, nbytes: int, what: str) -> None:
        """Refuse at once, before anything of ``what`` is written, when its ``nbytes`` of pixels alone exceed the
        free space of the disk (rather than filling the disk and failing part of the way through)."""
        free = free_bytes(self._shown.parent)
        if free is not None and nbytes > free:
            raise IOFailure(
                f"cannot write {self._shown}: no space is left on the device for its {what} (it needs "
                f"{_amount(nbytes)}, {_amount(free)} are free)",
                "free some space (or write elsewhere)",
            )


def _amount(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.1f} GB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.1f} MB"


@contextlib.contextmanager
def writing(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> Iterator[StoreWriter]:
    """Write a new store at ``path`` (a temporary file, see ``atomic.atomic_path``; ``shown`` names the store in
    messages). A write the file system refuses is raised as an ``OSError`` by ``StoreWriter.check`` or on leaving,
    only once the HDF5 file has been closed cleanly, so it can never crash the process or fill stderr with
    HDF5's errors; the caller removes the file. SIGINT and SIGTERM are held while HDF5 works (``_SignalHold``)."""
    sink = _Sink(Path(path))
    signals = _SignalHold()
    try:
        signals.hold()
        try:
            h5 = h5py.File(sink, "w", libver=FILE_FORMAT)
            try:
                yield StoreWriter(h5, sink, Path(shown if shown is not None else path), signals)
            finally:
                signals.hold()  # the close flushes HDF5's caches through the sink
                h5.close()
        finally:
            signals.release()
        if sink.failure is not None:
            raise sink.failure
    finally:
        sink.close()


class DatasetStore:
    """A prepared dataset on disk; ``split(name)`` loads one split into memory (or onto a GPU).

    ``rebuild`` is the command that rebuilds this store, for error messages (``catalog.open_store`` gives it).
    """

    def __init__(self, path: str | os.PathLike, rebuild: str | None = None) -> None:
        self.path = Path(path)
        dataset = self.path.stem
        command = rebuild or action("data prepare", dataset, force=True)
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
        if self.path.is_dir():
            return UserError(f"store {self.path} is a folder, not a file; move it away, then run '{self.rebuild}'")
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
            "resize_filter": self.attrs.get("resize_filter"),  # None: generated, or prepared before it was recorded
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


def _stream(dataset: h5py.Dataset, feed: Callable[[np.ndarray], None], check: Callable[[], None] | None = None) -> None:
    """Pass every image of ``dataset`` to ``feed`` in order, a contiguous step of them at a time, through one buffer
    (``check`` is called before each step)."""
    step = _step_rows(dataset.shape[1:])
    buffer = np.empty((min(step, dataset.shape[0]), *dataset.shape[1:]), dtype=np.uint8)
    for start in range(0, dataset.shape[0], step):
        if check is not None:
            check()
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
