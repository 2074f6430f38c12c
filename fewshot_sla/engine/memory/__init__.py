"""Memory preflight: how much memory one training step will take, known before the first step, against the budget.

One concept per module: ``estimate`` (the probe of a step's memory, ``profile_step``, and ``StepProfile``'s
estimate), ``budget`` (``memory_budget``: how much one process may use), ``plan`` (``plan_memory``: the
micro-batch and checkpointing checked or chosen against the budget), ``peak`` (``PeakMeter``: the measured peak),
``created`` (``CreatedBytes``: the bytes of the tensors a block of code creates, to size evaluation's head calls).
"""

from fewshot_sla.engine.memory.budget import (
    CONCURRENT_RUNS_VAR,
    CPU_MACHINE_SHARE,
    CPU_SHARE,
    GIB,
    GPU_SHARE,
    Budget,
    gib,
    host_memory,
    memory_budget,
    processes_on_machine,
)
from fewshot_sla.engine.memory.created import CreatedBytes
from fewshot_sla.engine.memory.estimate import PROBE_WAYS, PROBES, Probe, StepProfile, profile_step, static_bytes
from fewshot_sla.engine.memory.peak import PeakMeter
from fewshot_sla.engine.memory.plan import FIT_MODES, MemoryPlan, batch_statistics, plan_memory

__all__ = [
    "CONCURRENT_RUNS_VAR",
    "CPU_MACHINE_SHARE",
    "CPU_SHARE",
    "FIT_MODES",
    "GIB",
    "GPU_SHARE",
    "PROBES",
    "PROBE_WAYS",
    "Budget",
    "CreatedBytes",
    "MemoryPlan",
    "PeakMeter",
    "Probe",
    "StepProfile",
    "batch_statistics",
    "gib",
    "host_memory",
    "memory_budget",
    "plan_memory",
    "processes_on_machine",
    "profile_step",
    "static_bytes",
]
