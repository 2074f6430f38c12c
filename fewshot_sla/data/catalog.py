"""Finding a dataset's prepared store in the data root (a generated one is built on first use).

This is the data package's entry point for the rest of the suite: it sits above the store format
(``store.py``), the importers and ``prepare``, and only it combines them with the dataset registry.
A name the registry lacks is a dataset of the user's own images (``data prepare NAME --layout imagefolder``):
its store in the data root, marked ``user_dataset`` in its attributes, stands in for a registry entry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fewshot_sla.data.prepare import USER_ATTR, USER_NAME, prepare
from fewshot_sla.data.root import ENV_VAR, resolve_data_root
from fewshot_sla.data.store import DatasetStore, store_path
from fewshot_sla.errors import UserError, command, note, setting
from fewshot_sla.registry import DATASETS

log = logging.getLogger(__name__)


def prepare_command(dataset: str, *, force: bool = False) -> str:
    """The action that (re)builds the store of ``dataset`` (an ``errors.command`` marker), for error messages."""
    if dataset not in DATASETS:
        return command("data prepare", dataset, source="<DIR>", layout="imagefolder", force=force)
    if DATASETS.get(dataset).generator is not None:
        return command("data prepare", dataset, force=force)
    return command("data prepare", dataset, source="<PATH>", force=force)


def user_prepare_command(store: DatasetStore, *, force: bool = False) -> str:
    """The action that rebuilds a store of the user's own images, with the options it was prepared with."""
    attrs = store.attrs
    split: dict[str, object] = {}
    if attrs.get("split_file"):
        split["split_file"] = attrs["split_file"]
    elif attrs.get("split_fractions"):
        split.update(split_fractions=attrs["split_fractions"], split_seed=attrs.get("split_seed", 0))
    return command(
        "data prepare",
        store.path.stem,
        source=attrs.get("source", "<DIR>"),
        layout=attrs.get(USER_ATTR),
        image_size=store.image_size,
        **split,
        force=force,
    )


def is_user_store(path: Path) -> bool:
    """Whether ``path`` is a complete store of the user's own images (a damaged or other store is not)."""
    try:
        return DatasetStore(path).attrs.get(USER_ATTR) is not None
    except UserError:
        return False


def user_datasets(data_root: str | os.PathLike | None = None) -> list[str]:
    """The names of the datasets of the user's own images prepared in the data root, sorted."""
    root = resolve_data_root(data_root)
    if not root.is_dir():
        return []
    return sorted(
        path.stem
        for path in root.glob("*.h5")
        if path.stem not in DATASETS and USER_NAME.match(path.stem) and is_user_store(path)
    )


def _unknown(dataset: str, root: Path, why: str = "") -> UserError:
    return UserError(
        f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS.names() + user_datasets(root))}{why}, or "
        f"prepare your own images under that name with "
        f"'{command('data prepare', dataset, source='DIR', layout='imagefolder')}' (and the same "
        f"{setting('data_root')} / ${ENV_VAR})"
    )


def _user_store(dataset: str, root: Path) -> DatasetStore:
    """The store of a dataset of the user's own images, found in the data root by its name."""
    path = store_path(dataset, root)
    if not USER_NAME.match(dataset) or not path.is_file():
        raise _unknown(dataset, root)
    store = DatasetStore(path, rebuild=prepare_command(dataset, force=True))
    if store.attrs.get(USER_ATTR) is None:
        raise _unknown(dataset, root, f" ({path} is a store of no registered dataset nor of your own images)")
    store.rebuild = user_prepare_command(store, force=True)
    if store.dataset != dataset:
        raise UserError(
            f"store {path} holds the images prepared as '{store.dataset}', not '{dataset}'; rename it back to "
            f"{store.dataset}.h5, or rebuild it with '{store.rebuild}'"
        )
    return store


def open_store(dataset: str, data_root: str | os.PathLike | None = None) -> DatasetStore:
    """The prepared store of a registered dataset, or of a dataset of the user's own images prepared in the data
    root; a generated dataset (synthetic) is built on first use.

    A missing store of any other registered dataset is a UserError naming the ``fewshot-sla data prepare``
    command, and so is a name that is neither registered nor a prepared store of the user's own images. A store
    without content checksums (prepared before they existed) loads with a one-line note on how to upgrade it.
    """
    root = resolve_data_root(data_root)
    path = store_path(dataset, root)
    if dataset not in DATASETS:
        store = _user_store(dataset, root)
    else:
        info = DATASETS.get(dataset)
        if not path.exists():
            if info.generator is None:
                raise UserError(
                    f"dataset '{dataset}' is not prepared in {root} (no {path.name}); run "
                    f"'{command('data prepare', dataset, source='<PATH>')}' with <PATH> {info.source_hint} "
                    f"(and the same {setting('data_root')} / ${ENV_VAR})"
                )
            log.info("generating the %s dataset into %s (one-off, a few seconds)", dataset, path)
            prepare(dataset, data_root=root, progress=False, wait=True)  # a concurrent first use waits, then reuses
        store = DatasetStore(path, rebuild=prepare_command(dataset, force=True))
    if not store.checked and path not in _NOTED and os.environ.get("RANK", "0") == "0":
        _NOTED.add(path)
        log.info(
            "note: %s has no content checksums (an older fewshot-sla prepared it), so its loads are not verified; "
            "rebuild it with '%s' to have them checked",
            path,
            note(store.rebuild),
        )
    return store


def check_dataset_name(dataset: str) -> None:
    """A name that can name a dataset: a registered one, or one a user dataset may have (whose store is looked
    up in the data root when it is opened). Anything else is the registry's UserError listing the valid names."""
    if dataset not in DATASETS and not USER_NAME.match(dataset):
        DATASETS.get(dataset)


_NOTED: set[Path] = set()  # stores whose missing checksums were already pointed out by this process


def packaged_files(dataset: str) -> tuple[str, str, str] | None:
    """A registered dataset's ``DatasetInfo.packaged_files`` (split lists naming every image, usable without a
    store); None for a name the registry lacks, a dataset of the user's own images, which only its store knows."""
    check_dataset_name(dataset)
    return DATASETS.get(dataset).packaged_files if dataset in DATASETS else None
