"""Several processes, one run: the process group (torch.distributed), launched by torchrun or a Slurm job.

A run under ``torchrun --nproc-per-node N -m fewshot_sla run ...`` (or one Slurm task per process, whose
environment ``submitit.helpers.TorchDistributedEnvironment`` exports) finds ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK`` in its environment. Every process draws the same global meta-batch from the run's seeded
streams and takes its own contiguous share of the episodes; gradients are summed over processes with one
all-reduce per step (not DataParallel, so every learner works, second-order MAML and plug-ins included);
evaluation splits the episodes the same way and gathers the per-episode results in episode order. Process 0
alone writes. Backends: gloo on the CPU (or several processes sharing one GPU), nccl with one GPU per process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fewshot_sla.errors import UserError, setting

BACKENDS = ("auto", "gloo", "nccl")
# How long a collective waits for a silent process before the run stops (a dead or stuck peer).
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("FEWSHOT_SLA_DIST_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` of ``local_world_size`` on
    its machine. A single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether there are several processes (and a process group to talk through)."""
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (process 0 only)."""
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This process's contiguous share of ``count`` items (episodes): equal shares, the first ones one
        longer when ``count`` does not divide evenly."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    # ----- collectives (no-ops for one process) -----
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over every process, in place; returns it."""
        if self.active:
            _collective(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over processes (one flat all-reduce). A parameter
        without a gradient on some process counts as zero there (and gets a gradient everywhere)."""
        if not self.active or not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_(flat)
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def gather(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each process's per-episode arrays (same keys) -> the concatenation in rank order, on every process."""
        if not self.active:
            return arrays
        parts: list[Any] = [None] * self.world_size
        _collective(dist.all_gather_object, parts, arrays)
        return {key: np.concatenate([part[key] for part in parts]) for key in arrays}

    def first_error(self, message: str | None) -> str | None:
        """Agree on failure: the first process's error message (by rank), or None when every process succeeded."""
        if not self.active:
            return message
        messages: list[Any] = [None] * self.world_size
        _collective(dist.all_gather_object, messages, message)
        for rank, text in enumerate(messages):
            if text is not None:
                return text if rank == self.rank else f"process {rank}: {text}"
        return None

    def agree(self, error: UserError | None) -> None:
        """Every process learns whether any failed, so that none waits for the others forever: the first error
        (by rank) is raised in every process, marked as shared so that it is reported once. Call it in every
        process at the same point, with the error this process met there or None."""
        message = self.first_error(None if error is None else str(error))
        if message is not None:
            raise UserError(message, shared=self.active)

    def barrier(self) -> None:
        """Wait until every process arrives."""
        if self.active:
            _collective(dist.barrier)


SINGLE = Processes()  # a run of one process


def _collective(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A collective call; a lost or stuck peer becomes one UserError line instead of a traceback."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as err:  # gloo/nccl errors (DistBackendError is one), timeouts
        raise UserError(
            f"lost contact with another process of the run ({_reason(err)}); the run stopped at its last "
            f"checkpoint: resume it with the same launch command and {setting('resume')}"
        ) from None


def _reason(err: BaseException) -> str:
    """The gist of a backend error: its first line, without the source location gloo and nccl put first."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../pair.cc:545] Read error ...: Connection reset by peer."
    return text.split(". ")[0].rstrip(".")[:160]


def from_environment() -> Processes:
    """This process's place, read from the variables torchrun (or a Slurm job via submitit) sets."""
    if "WORLD_SIZE" not in os.environ:
        return Processes()
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise UserError(
            "WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers; launch with torchrun "
            "--nproc-per-node N -m fewshot_sla ..."
        ) from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise UserError(
            f"inconsistent process environment (RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK "
            f"{local_rank}, LOCAL_WORLD_SIZE {local_world}); launch with torchrun"
        )
    return Processes(rank, world, local_rank, local_world)


def process_device(processes: Processes, requested: str) -> torch.device:
    """The device of this process: ``auto``/``cuda`` -> GPU ``local_rank`` (modulo the GPUs visible) when GPUs
    are visible; ``cpu`` -> the CPU. One process: ``requested`` as it is (checked by the caller)."""
    if not processes.active or requested == "cpu" or requested.startswith("cuda:"):
        if processes.active and requested.startswith("cuda:"):
            raise UserError(
                f"{setting('device')} {requested} names one GPU, but this run has {processes.world_size} processes; "
                f"use {setting('device')} cuda (each process takes the GPU of its local rank) or "
                f"{setting('device')} cpu"
            )
        return torch.device(requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise UserError(
                f"{setting('device')} cuda asks for GPUs but none is visible; use {setting('device')} cpu or auto"
            )
        return torch.device("cpu")
    return torch.device("cuda", processes.local_rank % torch.cuda.device_count())


def check_process_count(processes: Processes, device: torch.device, backend: str) -> str:
    """The backend to use; too many processes for the cores or GPUs, or nccl without one GPU per process, is a
    UserError saying what works."""
    if backend not in BACKENDS:
        raise UserError(f"{setting('dist_backend')} must be one of {', '.join(BACKENDS)}, got '{backend}'")
    local = processes.local_world_size
    if device.type == "cpu":
        if backend == "nccl":
            raise UserError(
                f"{setting('dist_backend')} nccl needs GPUs, but this run is on the CPU; use "
                f"{setting('dist_backend')} gloo (or auto)"
            )
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if local > cores:
            raise UserError(
                f"{local} processes on this machine but only {cores} CPU core(s) for them; use "
                f"{setting('nproc_per_node')} {cores} or fewer"
            )
        return "gloo"
    gpus = torch.cuda.device_count()
    if backend == "nccl" and local > gpus:
        raise UserError(
            f"nccl needs one GPU per process: {local} processes but {gpus} GPU(s) visible; use "
            f"{setting('nproc_per_node')} {gpus} or fewer, or {setting('dist_backend')} gloo to share GPUs"
        )
    if backend == "auto":
        return "nccl" if local <= gpus else "gloo"
    return backend


def initialize(processes: Processes, device: torch.device, backend: str) -> None:
    """Join the process group (env:// rendezvous, as torchrun and submitit set it up)."""
    if not processes.active or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot join the other processes of the run ({first[:200]}); launch with torchrun "
            "--nproc-per-node N -m fewshot_sla ... (MASTER_ADDR/MASTER_PORT must be set)"
        ) from None


def shutdown(*, together: bool) -> None:
    """Leave the process group (if this process joined one). ``together`` (a normal exit, every process on the
    same path): wait for the others first, so that no process tears down its connections while a peer still
    uses them (gloo can abort a process then). After an error the others may never arrive: leave at once."""
    if not dist.is_initialized():
        return
    if together:
        with contextlib.suppress(RuntimeError):  # a peer already gone: nothing left to wait for
            dist.barrier()
    dist.destroy_process_group()
