"""``prepare``: find a dataset's raw layout, read it and write its store, atomically and re-runnably.

The store is written to a temporary file beside its final name and renamed only once complete, so an
interrupted or failed prepare never leaves a store that looks finished. A re-run whose inputs (layout,
split files, source file names, sizes and times, image size, seed) are unchanged reuses the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fewshot_sla.atomic import atomic_path, remove_temporaries
from fewshot_sla.data.conventions import load_convention
from fewshot_sla.data.datasets import DatasetInfo
from fewshot_sla.data.importers import hf_datasets, imagefolder, torch_dataset
from fewshot_sla.data.importers.common import (
    DEFAULT_RESIZE_FILTER,
    RESIZE_FILTERS,
    BadImage,
    Layout,
    RawSplit,
    resize_image,
)
from fewshot_sla.data.root import resolve_data_root
from fewshot_sla.data.store import (
    IMAGENET_NORMALIZATION,
    DatasetStore,
    Normalization,
    StoreWriter,
    append_rows,
    create_split,
    encode_text,
    finish_store,
    store_path,
    writing,
)
from fewshot_sla.errors import UserError, setting
from fewshot_sla.locks import exclusive, lock_path
from fewshot_sla.registry import DATASETS
from fewshot_sla.version import __version__

MAX_IMAGE_SIZE = 1024
USER_ATTR = "user_dataset"  # store attribute marking a dataset of the user's own images: its layout (imagefolder)
LAYOUTS = (imagefolder.LAYOUT, torch_dataset.LAYOUT, hf_datasets.LAYOUT)  # ``--layout``: the user's own images
# A user dataset's name: it names the store file and run folders.
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_BATCH_BYTES = 8 << 20  # images decoded (in parallel) and appended to the store per step: about 8 MB
_TASK = 32  # images one thread decodes per task


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` did: the store, its fingerprint, whether it was reused, the images skipped."""

    path: Path
    fingerprint: str
    reused: bool
    source_format: str
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    """What a prepare will read and how the store records it."""

    source_format: str
    split_convention: str
    key: str
    attrs: dict[str, Any]
    read: Callable[[], Iterator[tuple[str, RawSplit]]]
    normalization: Normalization = IMAGENET_NORMALIZATION


def prepare(
    dataset: str,
    source: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    split_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    force: bool = False,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    wait: bool = False,
    log: Callable[[str], None] = lambda message: None,
    layout: str | None = None,
    split_file: str | os.PathLike | None = None,
    split_fractions: str | tuple[float, float, float] | None = None,
    split_seed: int | None = None,
    torch_object: Any = None,
    resize_filter: str = DEFAULT_RESIZE_FILTER,
) -> PrepareResult:
    """Build ``<data_root>/<dataset>.h5`` from ``source`` (or from ``seed`` for a generated dataset). One prepare
    of a store runs at a time: another one is refused, or waited for (``wait``).

    A name no registered dataset has is a dataset of the user's own images: ``layout`` must then be
    ``imagefolder`` (see ``importers/imagefolder.py``) or ``torch`` (a map-style torch dataset: ``source``
    ``MODULE:FACTORY``, or the dataset itself as ``torch_object``; ``importers/torch_dataset.py``), split by
    ``split_file`` or by ``split_fractions`` (text ``TRAIN,VAL,TEST`` or three floats; default 0.64/0.16/0.20) and
    ``split_seed`` (default 0), image size ``image_size`` (default 84). Its store records ``user_dataset`` (the
    layout), so it needs no registry entry.

    Images are resized with Pillow's ``resize_filter`` (``RESIZE_FILTERS``, default Lanczos), which the store
    records; a generated dataset is made at its size and takes no filter.
    """
    user = dataset not in DATASETS
    if user:
        _check_user_name(dataset, layout, split_dir)
        size = imagefolder.DEFAULT_IMAGE_SIZE if image_size is None else image_size
    else:
        if layout is not None:
            raise UserError(f"'{dataset}' is a built-in dataset; choose another name")
        if split_file is not None or split_fractions is not None or split_seed is not None:
            raise UserError(
                f"{setting('split_file')}, {setting('split_fractions')} and {setting('split_seed')} are for "
                f"your own images ({setting('layout')} imagefolder); "
                f"'{dataset}' is a built-in dataset with its own split ({setting('split_dir')} replaces its "
                "split files)"
            )
        info = DATASETS.get(dataset)
        size = info.image_size if image_size is None else image_size
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise UserError(f"{setting('image_size')} must be between 1 and {MAX_IMAGE_SIZE} pixels, got {size}")
    if resize_filter not in RESIZE_FILTERS:
        raise UserError(f"{setting('resize_filter')} must be one of {', '.join(RESIZE_FILTERS)}, got {resize_filter!r}")
    if user:
        plan = _user_images(
            dataset, size, source, split_file, split_fractions, split_seed, log, str(layout), torch_object
        )
    elif info.generator is not None:
        plan = _generated(info, seed, size, source, split_dir)
    else:
        plan = _imported(info, size, source, split_dir, log)
    if resize_filter != DEFAULT_RESIZE_FILTER:
        if not user and info.generator is not None:
            raise UserError(
                f"dataset '{info.name}' is generated at its image size and resizes nothing; drop "
                f"{setting('resize_filter')}"
            )
        # another filter makes another store (the default one keeps the keys of stores prepared before the option)
        plan = replace(plan, key=_key(key=plan.key, resize_filter=resize_filter))
    path = store_path(dataset, resolve_data_root(data_root))
    with exclusive(lock_path(path), f"the store {path}", "wait for that prepare to finish", wait=wait):
        remove_temporaries(path.parent, path.name)  # of a killed prepare
        if path.is_dir():  # refused now rather than after the whole store is written
            raise UserError(f"{path} is a folder, not a dataset store; move it away, then run the command again")
        if user and path.exists():
            _check_replaceable(path, dataset)
        if not force and path.exists():
            existing = _existing(path)
            if existing is not None and existing.attrs.get("source_key") == plan.key:
                log(
                    f"{path} is already prepared from this source (fingerprint {existing.fingerprint[:16]}); reusing it"
                )
                return PrepareResult(path, existing.fingerprint, True, plan.source_format)
        fingerprint, skipped = _write_store(path, plan, dataset, size, resize_filter, skip_bad, workers, progress)
    log(f"wrote {path} (fingerprint {fingerprint[:16]})")
    return PrepareResult(path, fingerprint, False, plan.source_format, skipped)


def _write_store(
    path: Path,
    plan: _Plan,
    dataset: str,
    size: int,
    resize_filter: str,
    skip_bad: bool,
    workers: int | None,
    progress: bool,
) -> tuple[str, list[str]]:
    """Write the store of ``plan`` to ``path`` atomically; its fingerprint and the images skipped."""
    attrs = {
        **plan.attrs,
        "dataset": dataset,
        "source_format": plan.source_format,
        "image_size": size,
        **({} if plan.source_format == "generated" else {"resize_filter": resize_filter}),
        "split_convention": plan.split_convention,
        "normalize_mean": list(plan.normalization.mean),
        "normalize_std": list(plan.normalization.std),
        "source_key": plan.key,
        "fewshot_sla_version": __version__,
    }
    skipped: list[str] = []
    # A progress bar on a terminal only (disable=None): a log file gets no carriage-return updates.
    bar = tqdm(total=0, unit="img", desc=f"prepare {dataset}", disable=None if progress else True, leave=False)
    pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))
    with atomic_path(path) as tmp, writing(tmp, path) as store, bar, pool:
        splits = plan.read()
        while True:
            with store.released():  # an importer may read its source for minutes: Ctrl-C works meanwhile
                item = next(splits, None)
            if item is None:
                break
            split, raw = item
            channels = plan.normalization.channels
            skipped += _write_split(store, split, raw, size, resize_filter, channels, pool, skip_bad, bar)
        attrs["skipped_images"] = len(skipped)
        fingerprint = finish_store(store.h5, attrs, store.check)
    return fingerprint, skipped


def _generated(
    info: DatasetInfo, seed: int, size: int, source: str | os.PathLike | None, split_dir: str | os.PathLike | None
) -> _Plan:
    assert info.generator is not None and info.generator_identity is not None
    if source is not None or split_dir is not None:
        raise UserError(
            f"dataset '{info.name}' is generated from a seed; drop {setting('source')} and {setting('split_dir')}"
        )
    generator = info.generator
    return _Plan(
        source_format="generated",
        split_convention=info.split_convention,
        key=_key(dataset=info.name, generator=info.generator_identity(), seed=seed, image_size=size),
        attrs={"seed": seed, "source": f"generated from seed {seed}"},
        read=lambda: generator(seed, size),
    )


def _imported(
    info: DatasetInfo,
    size: int,
    source: str | os.PathLike | None,
    split_dir: str | os.PathLike | None,
    log: Callable[[str], None],
) -> _Plan:
    if source is None:
        raise UserError(f"'data prepare {info.name}' needs {setting('source')} PATH: {info.source_hint}")
    layout, root = _find_layout(info, Path(source).expanduser())
    chosen = Path(split_dir).expanduser() if split_dir is not None else layout.split_dir(root)
    if chosen is not None and not chosen.is_dir():
        raise UserError(f"{setting('split_dir')} {chosen} is not a folder; pass the folder holding the split files")
    assert info.split_format is not None
    convention = load_convention(info.split_convention, info.split_format, info.packaged_splits, chosen)
    log(f"reading {info.title} from {root} ({layout.summary}); split convention: {convention.describe()}")
    return _Plan(
        source_format=layout.name,
        split_convention=convention.describe(),
        key=_key(
            dataset=info.name,
            layout=layout.name,
            splits=convention.digest,
            image_size=size,
            files=_file_stats(root, layout.source_files(root)),
            normalization=[info.normalization.mean, info.normalization.std],
        ),
        attrs={"source": str(root.resolve())},
        read=lambda: layout.read(root, convention),
        normalization=info.normalization,
    )


def _check_user_name(dataset: str, layout: str | None, split_dir: str | os.PathLike | None) -> None:
    """A new dataset name is fine for the user's own images given ``--layout imagefolder``."""
    if layout is None:
        raise UserError(
            f"unknown dataset '{dataset}': to prepare your own images pass {setting('layout')} imagefolder "
            f"(built-in datasets: {', '.join(DATASETS.names())})"
        )
    if layout not in LAYOUTS:
        raise UserError(
            f"unknown {setting('layout')} '{layout}'; the layout of your own images is: {', '.join(LAYOUTS)}"
        )
    if not USER_NAME.match(dataset):
        raise UserError(
            f"dataset name {dataset!r} must be one word of letters, digits, '_', '.', '+' or '-' "
            "(it names the store file and run folders); choose another name"
        )
    if split_dir is not None:
        raise UserError(
            f"{setting('split_dir')} is for built-in datasets; split your own images with {setting('split_file')} FILE"
        )


def _check_replaceable(path: Path, dataset: str) -> None:
    """A store that is there already may be replaced by a user dataset only when it is one (or is unreadable)."""
    existing = _existing(path)
    if existing is not None and existing.attrs.get(USER_ATTR) is None:
        raise UserError(
            f"{path} holds a store of dataset '{existing.dataset}' that is not one of your own images; "
            f"choose another name than '{dataset}', or move that store away"
        )


def _user_images(
    dataset: str,
    size: int,
    source: str | os.PathLike | None,
    split_file: str | os.PathLike | None,
    split_fractions: str | tuple[float, float, float] | None,
    split_seed: int | None,
    log: Callable[[str], None],
    layout: str = imagefolder.LAYOUT,
    torch_object: Any = None,
) -> _Plan:
    """The plan of a dataset of the user's own images: an image folder (``importers/imagefolder.py``) or a torch
    dataset (``importers/torch_dataset.py``: from ``source`` ``MODULE:FACTORY``, or ``torch_object`` itself)."""
    info = DatasetInfo(
        name=dataset,
        title=f"'{dataset}' image folder",
        image_size=size,
        split_convention=imagefolder.LAYOUT,
        source_hint="a folder with one subfolder of images per class (DIR/<class>/*.jpg)",
        layouts=(imagefolder.IMAGEFOLDER,),
    )
    if source is None and torch_object is None:
        hint = (
            "MODULE:FACTORY, a function returning the dataset" if layout == torch_dataset.LAYOUT else info.source_hint
        )
        what = "MODULE:FACTORY" if layout == torch_dataset.LAYOUT else "DIR"
        raise UserError(
            f"'data prepare {dataset} {setting('layout')} {layout}' needs {setting('source')} {what}: {hint}"
        )
    if split_file is not None and (split_fractions is not None or split_seed is not None):
        raise UserError(
            f"{setting('split_file')} gives the split itself; drop {setting('split_fractions')} / "
            f"{setting('split_seed')}, or the file"
        )
    if isinstance(split_fractions, str):
        fractions = imagefolder.parse_fractions(split_fractions)
    else:
        fractions = imagefolder.DEFAULT_FRACTIONS if split_fractions is None else split_fractions
    seed = imagefolder.DEFAULT_SEED if split_seed is None else split_seed
    if seed < 0:
        raise UserError(f"{setting('split_seed')} must be a whole number >= 0, got {seed}")
    if layout == torch_dataset.LAYOUT:
        return _torch_dataset(dataset, size, source, torch_object, split_file, fractions, seed, log)
    if layout == hf_datasets.LAYOUT:
        assert source is not None
        return _hf_folder(dataset, size, Path(source).expanduser(), split_file, fractions, seed, log)
    assert source is not None
    _, root = _find_layout(info, Path(source).expanduser())
    collection = imagefolder.scan(root)
    chosen = Path(split_file).expanduser() if split_file is not None else None
    split = imagefolder.convention(collection.classes, chosen, fractions, seed)
    described = imagefolder.describe(split)
    counts = ", ".join(f"{name} {len(split.classes[name])}" for name in split.classes)
    log(
        f"reading {sum(len(f) for f in collection.files.values())} images of {len(collection.files)} classes "
        f"from {root} ({imagefolder.LAYOUT}); split: {described} (classes: {counts})"
    )
    files = collection.paths()
    return _Plan(
        source_format=imagefolder.LAYOUT,
        split_convention=described,
        key=_key(
            dataset=dataset,
            layout=imagefolder.LAYOUT,
            splits=split.digest,
            image_size=size,
            files=_file_stats(root, files),
        ),
        attrs=_user_attrs(str(root.resolve()), imagefolder.LAYOUT, chosen, fractions, seed, seeded=chosen is None),
        read=lambda: imagefolder.read_splits(collection, split),
    )


def _user_attrs(
    source: str, layout: str, chosen: Path | None, fractions: Any, seed: int, *, seeded: bool
) -> dict[str, Any]:
    """The store attributes of a dataset of the user's own images: its source, layout and how it was split (a split
    file, or the seeded fractions and seed when ``seeded``)."""
    return {
        "source": source,
        USER_ATTR: layout,
        "split_file": str(chosen.resolve()) if chosen is not None else "",
        "split_fractions": ",".join(f"{f:g}" for f in fractions) if seeded else "",
        "split_seed": seed if seeded else -1,
    }


def _torch_dataset(
    dataset: str,
    size: int,
    source: str | os.PathLike | None,
    torch_object: Any,
    split_file: str | os.PathLike | None,
    fractions: tuple[float, float, float] | Any,
    seed: int,
    log: Callable[[str], None],
) -> _Plan:
    """The plan of a torch dataset (``importers/torch_dataset.py``). Its content cannot be checked without reading
    it all, so a store of one is never reused: each prepare reads it anew."""
    spec = None if torch_object is not None else str(source)
    data = torch_object if spec is None else torch_dataset.load_factory(spec)
    where = torch_dataset.describe_source(data, spec)
    collection = torch_dataset.collect(data, where)
    chosen = Path(split_file).expanduser() if split_file is not None else None
    split = imagefolder.convention(collection.classes, chosen, fractions, seed)
    described = imagefolder.describe(split)
    images = sum(len(v) for v in collection.indices.values())
    log(f"reading {images} images of {len(collection.indices)} classes from {where} (torch); split: {described}")
    return _Plan(
        source_format=torch_dataset.LAYOUT,
        split_convention=described,
        key=_key(dataset=dataset, layout=torch_dataset.LAYOUT, read=os.urandom(16).hex()),
        attrs=_user_attrs(where, torch_dataset.LAYOUT, chosen, fractions, seed, seeded=chosen is None),
        read=lambda: torch_dataset.read_splits(collection, split),
    )


def _hf_folder(
    dataset: str,
    size: int,
    root: Path,
    split_file: str | os.PathLike | None,
    fractions: tuple[float, float, float] | Any,
    seed: int,
    log: Callable[[str], None],
) -> _Plan:
    """The plan of a Hugging Face datasets folder (``importers/hf_datasets.py``): its own class split when it has
    one, else split as an image folder is."""
    items = hf_datasets.Items(hf_datasets.load(root), str(root))
    collection = torch_dataset.collect(items, str(root), items.identifier)
    own = hf_datasets.source_split(items, str(root))
    chosen = Path(split_file).expanduser() if split_file is not None else None
    if own is not None and chosen is None:
        split = own
        described = f"the folder's own train/validation/test classes ({root.resolve()})"
    else:
        split = imagefolder.convention(collection.classes, chosen, fractions, seed)
        described = imagefolder.describe(split)
    log(f"reading {len(items)} images of {len(collection.indices)} classes from {root} (hf); split: {described}")
    return _Plan(
        source_format=hf_datasets.LAYOUT,
        split_convention=described,
        key=_key(
            dataset=dataset,
            layout=hf_datasets.LAYOUT,
            splits=split.digest,
            image_size=size,
            files=_file_stats(root, hf_datasets.source_files(root)),
        ),
        attrs=_user_attrs(
            str(root.resolve()), hf_datasets.LAYOUT, chosen, fractions, seed, seeded=split is not own and chosen is None
        ),
        read=lambda: torch_dataset.read_splits(collection, split),
    )


def _find_layout(info: DatasetInfo, source: Path) -> tuple[Layout, Path]:
    """The first of the dataset's layouts found in ``source``, with the folder holding it."""
    hint = f"pass {setting('source')} {info.source_hint}"
    if not source.exists():
        raise UserError(f"source {source} does not exist; {hint}")
    if not source.is_dir():
        raise UserError(f"source {source} is a file, not a folder (extract archives first); {hint}")
    if not any(source.iterdir()):
        raise UserError(f"source folder {source} is empty; {hint}")
    for layout in info.layouts:
        root = layout.locate(source)
        if root is not None:
            return layout, root
    expected = "; ".join(layout.summary for layout in info.layouts)
    raise UserError(f"no {info.title} layout recognised in {source}; expected one of: {expected}")


def _key(**parts: Any) -> str:
    """A digest of everything that determines a store's content, to recognise a re-run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_stats(root: Path, files: list[Path]) -> list[tuple[str, int, int]]:
    stats = []
    for path in files:
        st = path.stat()
        stats.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return stats


def _existing(path: Path) -> DatasetStore | None:
    """The store at ``path`` if it is a complete, readable one (else it will simply be replaced)."""
    try:
        return DatasetStore(path)
    except UserError:
        return None


def _load(raw: RawSplit, index: int, size: int, resize_filter: str, channels: int) -> np.ndarray | BadImage:
    try:
        image = raw.load(index)
    except BadImage as bad:
        return bad
    if image.ndim != 3 or image.shape[2] != channels:
        raise ValueError(f"the importer gave an image of shape {image.shape}, the dataset has {channels} channel(s)")
    resized = resize_image(image, size, resize_filter)
    if raw.quarter_turns is None or raw.quarter_turns[index] == 0:
        return resized
    return np.ascontiguousarray(np.rot90(resized, int(raw.quarter_turns[index])))


def _write_split(
    store: StoreWriter,
    split: str,
    raw: RawSplit,
    size: int,
    resize_filter: str,
    channels: int,
    pool: ThreadPoolExecutor,
    skip_bad: bool,
    bar: tqdm,
) -> list[str]:
    """Decode, resize and append every image of one split; return the paths of the unreadable ones skipped. A split
    whose pixels alone exceed the free disk space is refused before it is decoded; a write the disk refuses
    stops the split at the next batch (``StoreWriter``)."""
    store.expect(len(raw.labels) * channels * size * size, f"{split} split")
    bar.total = (bar.total or 0) + len(raw.labels)
    bar.refresh()
    id_bytes = max((len(encode_text(image_id)) for image_id in raw.image_ids), default=1)
    group = create_split(store.h5, split, raw.class_names, size, channels, id_bytes)
    skipped: list[str] = []
    batch = min(4096, max(_TASK, _BATCH_BYTES // (channels * size * size)))
    for start in range(0, len(raw.labels), batch):
        rows = range(start, min(start + batch, len(raw.labels)))
        tasks = [rows[i : i + _TASK] for i in range(0, len(rows), _TASK)]
        with store.released():
            loaded = [
                image
                for done in pool.map(lambda task: [_load(raw, i, size, resize_filter, channels) for i in task], tasks)
                for image in done
            ]
        for image in loaded:
            if isinstance(image, BadImage):
                if not skip_bad:
                    raise UserError(
                        f"cannot read image {image.path} ({image.reason}); replace it, or pass "
                        f"{setting('skip_bad')} to skip it"
                    )
                skipped.append(image.path)
        good = [i for i, image in zip(rows, loaded) if not isinstance(image, BadImage)]
        if good:
            append_rows(
                group,
                np.stack([image for image in loaded if not isinstance(image, BadImage)]),
                raw.labels[good],
                [raw.image_ids[i] for i in good],
            )
            store.check()
        bar.update(len(rows))
    counts = np.bincount(group["labels"][()], minlength=len(raw.class_names))
    if (counts == 0).any():
        empty = raw.class_names[int(np.argmin(counts))]
        raise UserError(f"every image of class '{empty}' ({split} split) is unreadable; fix the source images")
    return skipped
