"""Finding a registered dataset's prepared store in the data root (a generated one is built on first use).

This is the data package's entry point for the rest of the suite: it sits above the store format
(``store.py``), the importers and ``prepare``, and only it combines them with the dataset registry.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fewshot_sla.data.prepare import prepare
from fewshot_sla.data.root import ENV_VAR, resolve_data_root
from fewshot_sla.data.store import DatasetStore, store_path
from fewshot_sla.errors import UserError
from fewshot_sla.registry import DATASETS


def prepare_command(dataset: str) -> str:
    """The command that (re)builds the store of ``dataset``, for error messages."""
    if dataset in DATASETS and DATASETS.get(dataset).generator is not None:
        return f"fewshot-sla data prepare {dataset}"
    return f"fewshot-sla data prepare {dataset} --source <PATH>"


def open_store(dataset: str, data_root: str | os.PathLike | None = None) -> DatasetStore:
    """The prepared store of a registered dataset; a generated dataset (synthetic) is built on first use.

    A missing store of any other dataset is a UserError naming the ``fewshot-sla data prepare`` command. A store
    without content checksums (prepared before they existed) loads with a one-line note on how to upgrade it.
    """
    info = DATASETS.get(dataset)
    root = resolve_data_root(data_root)
    path = store_path(dataset, root)
    if not path.exists():
        if info.generator is None:
            raise UserError(
                f"dataset '{dataset}' is not prepared in {root} (no {path.name}); run "
                f"'fewshot-sla data prepare {dataset} --source <PATH>' with <PATH> {info.source_hint} "
                f"(and the same --data-root / ${ENV_VAR})"
            )
        sys.stderr.write(f"fewshot-sla: generating the {dataset} dataset into {path} (one-off, a few seconds)\n")
        prepare(dataset, data_root=root, progress=False, wait=True)  # a concurrent first use waits, then reuses
    store = DatasetStore(path, rebuild=f"{prepare_command(dataset)} --force")
    if not store.checked and path not in _NOTED and os.environ.get("RANK", "0") == "0":
        _NOTED.add(path)
        sys.stderr.write(
            f"fewshot-sla: note: {path} has no content checksums (an older fewshot-sla prepared it), so its loads "
            f"are not verified; rebuild it with '{store.rebuild}' to have them checked\n"
        )
    return store


_NOTED: set[Path] = set()  # stores whose missing checksums were already pointed out by this process
