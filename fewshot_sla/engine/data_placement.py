"""Which splits a run holds in memory and which it reads from disk: the data budget.

A split is loaded whole (into RAM, or straight onto the GPU the run uses) while the splits loaded so far fit the
data budget, smallest first; a split that does not fit stays on disk and its episodes are read from the store
on demand (``data/disk_images.py``), with the same episodes either way. The budget is ``--data-memory`` GB, by
default half of the memory where the splits would live: the GPU's free memory, or on a CPU the available RAM
shared among the run's local processes and the parallel runs on the machine. The other half is left to
training, whose own budget (``memory/``) is measured after the splits are loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fewshot_sla.data.store import DatasetStore, Split
from fewshot_sla.engine.memory import Budget, gib, host_memory, processes_on_machine
from fewshot_sla.errors import UserError, setting

DATA_SHARE = 0.5  # of the memory where the splits live


def data_budget(device: torch.device, local_processes: int = 1, budget_gb: float | None = None) -> Budget:
    """How many bytes of splits one process may hold in memory."""
    if budget_gb is not None:
        if not (budget_gb >= 0 and math.isfinite(budget_gb)):
            raise UserError(
                f"{setting('data_memory')} must be a number of GB >= 0, got {budget_gb}; 0 reads every split from disk"
            )
        return Budget(int(budget_gb * 2**30), None, setting("data_memory"))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Budget(int(DATA_SHARE * free), int(free), f"half the GPU's free {gib(free)}")
    room, _ = host_memory()
    if room is None:
        return Budget(None, None, "unknown on this system: every split is held in memory")
    runs = processes_on_machine(local_processes)
    share = f", split among {runs} processes" if runs > 1 else ""
    return Budget(int(DATA_SHARE * room / runs), room, f"half the available {gib(room)} RAM{share}")


def in_memory(sizes: dict[str, int], budget: Budget) -> dict[str, bool]:
    """For each split (name -> bytes of images), whether it is held in memory: smallest first, while the total fits."""
    if budget.bytes is None:
        return dict.fromkeys(sizes, True)
    held, total = {}, 0
    for name in sorted(sizes, key=lambda n: (sizes[n], n)):
        held[name] = total + sizes[name] <= budget.bytes
        total += sizes[name] if held[name] else 0
    return {name: held[name] for name in sizes}


def _size(n: int) -> str:
    return gib(n) if n >= 2**30 else f"{n / 2**20:.0f} MB"


@dataclass
class Placement:
    """The loaded splits and, when some stay on disk, one line saying so for the run's header."""

    splits: dict[str, Split]
    note: str | None  # with errors.py markers: read it through errors.render


def load_splits(
    store: DatasetStore,
    names: Iterable[str],
    device: torch.device,
    local_processes: int = 1,
    budget_gb: float | None = None,
) -> Placement:
    """Load ``names`` of ``store``, each in memory on ``device`` or left on disk, as the data budget allows."""
    names = list(dict.fromkeys(names))
    budget = data_budget(device, local_processes, budget_gb)
    sizes = {name: store.image_bytes(name) for name in names}
    held = in_memory(sizes, budget)
    splits = {name: store.split(name, device=device, in_memory=held[name]) for name in names}
    on_disk = [name for name in names if not held[name]]
    note = None
    if on_disk:
        listed = ", ".join(f"{name} ({_size(sizes[name])})" for name in on_disk)
        assert budget.bytes is not None
        where = (
            budget.source
            if budget.source == setting("data_memory")
            else f"{budget.source}; {setting('data_memory')} GB sets it"
        )
        note = (
            f"data: {listed} read from {store.path} on demand, over the data budget of {_size(budget.bytes)} ({where})"
        )
    return Placement(splits, note)
