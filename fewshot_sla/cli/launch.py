"""The options every command that trains or evaluates shares: joining a torchrun/Slurm launch, torch's CPU threads,
the memory the dataset splits may take, and the CPU allocator."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fewshot_sla.cli.data import positive_integer
from fewshot_sla.cpu_memory import reuse_freed_memory
from fewshot_sla.errors import UserError

if TYPE_CHECKING:
    from fewshot_sla.engine.distributed import Processes


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dist-backend",
        metavar="auto|gloo|nccl",
        default="auto",
        help="under torchrun: the torch.distributed backend (auto: nccl with one GPU per process, else gloo)",
    )


def join_processes(args: argparse.Namespace, device: str) -> Processes:
    """This process's place in a torchrun/Slurm launch, joined to the others (one process: nothing to join)."""
    from fewshot_sla.engine.distributed import check_process_count, from_environment, initialize, process_device

    processes = from_environment()
    if processes.active:
        try:
            dev = process_device(processes, device)
            backend = check_process_count(processes, dev, args.dist_backend)
        except UserError as err:  # every process finds the same problem: report it once
            raise UserError(str(err), shared=True) from None
        initialize(processes, dev, backend)
    return processes


def add_data_memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-memory",
        type=float,
        metavar="GB",
        help="memory the dataset splits may take in one process; a split that does not fit (smallest are kept "
        "first) stays on disk and its episodes are read from the store, the same episodes (default: half the "
        "GPU's free memory, or on a CPU half the available RAM; 0 reads every split from disk)",
    )


def add_malloc_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="on the CPU, keep glibc's default allocator, which returns freed memory to the OS (by "
        "default a CPU run keeps it for reuse: faster steps, the peak memory held until exit)",
    )


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_integer,
        metavar="N",
        help="CPU threads of torch's operations in this process, in each process under torchrun (default: "
        "torch's own choice: OMP_NUM_THREADS when set, which torchrun sets to 1 for several processes per "
        "machine, else one per core)",
    )


def set_threads(args: argparse.Namespace) -> None:
    """``--threads``: torch's intra-op thread count in this process; without it torch's own choice stands."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def reuse_memory_on_cpu(device_type: str, args: argparse.Namespace) -> None:
    """The CLI's one process-wide setting: keep freed memory for reuse on CPU runs (see ``cpu_memory``)."""
    if device_type == "cpu" and not args.default_malloc:
        reuse_freed_memory()
