"""The memory budget of one process (``memory_budget``, ``--memory-budget``): by default 90% of the free memory of a
GPU, or on a CPU the smaller of 90% of the available RAM and a third of the machine's RAM, shared among the
processes and parallel runs on the machine (``FEWSHOT_SLA_CONCURRENT_RUNS``)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot_sla.errors import setting

GIB = 1 << 30
GPU_SHARE = 0.9  # of the free GPU memory
CPU_SHARE = 0.9  # of the available RAM
CPU_MACHINE_SHARE = 1 / 3  # of the machine's RAM, at most, for all the runs on it
CONCURRENT_RUNS_VAR = "FEWSHOT_SLA_CONCURRENT_RUNS"  # parallel runs sharing this machine (leaderboard --jobs)


def gib(n: float) -> str:
    """Bytes as ``12.3 GB`` (GiB, the unit memory is sold in)."""
    return f"{n / GIB:.1f} GB"


def _meminfo() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def _cgroup_room() -> int | None:
    """Memory left under this process's cgroup (v2 or v1) limit, if it has one."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - int(usage))
    return None


@dataclass(frozen=True)
class Budget:
    """How much one process may use for a training step, what is available, and where the figure comes from."""

    bytes: int | None
    available: int | None
    source: str


def host_memory() -> tuple[int | None, int | None]:
    """The RAM this process can still take (the smaller of MemAvailable and its cgroup's room), and the
    machine's total; None where the system does not tell."""
    info = _meminfo()
    room = [v for v in (info.get("MemAvailable"), _cgroup_room()) if v is not None]
    return (min(room) if room else None), info.get("MemTotal")


def processes_on_machine(local_processes: int) -> int:
    """The processes sharing this machine's RAM: this run's local ones times the parallel runs
    (``FEWSHOT_SLA_CONCURRENT_RUNS``)."""
    return max(1, int(os.environ.get(CONCURRENT_RUNS_VAR, "1") or 1)) * local_processes


def memory_budget(device: torch.device, local_processes: int, budget_gb: float | None = None) -> Budget:
    """The memory budget of one process (see the module docstring for the defaults)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available = int(free)
        default, source = int(GPU_SHARE * free), f"90% of the GPU's free {gib(free)}"
    else:
        room, total = host_memory()
        if room is None:
            return Budget(None if budget_gb is None else int(budget_gb * GIB), None, "unknown on this system")
        available = room
        runs = processes_on_machine(local_processes)
        share = min(CPU_SHARE * available, CPU_MACHINE_SHARE * (total or available))
        default = int(share / runs)
        source = (
            f"the smaller of 90% of the available {gib(available)} and a third of the machine's "
            f"{gib(total or available)} RAM" + (f", split among {runs} processes" if runs > 1 else "")
        )
    if budget_gb is not None:
        return Budget(int(budget_gb * GIB), available, setting("memory_budget"))
    return Budget(default, available, source)
