"""Planning a run: resolve and check everything a user can get wrong before anything is written.

``plan_run`` resolves the configuration (recipe, or the stored one on ``--resume``), checks names, device,
dataset, episode specs, the episode file and the output folder, loads the splits, builds the model once (a run
that starts training with ``init_from`` takes another run's backbone weights, ``build.init_backbone``; a resumed
one has its own checkpoint's) and plans its memory (``memory/``: the micro-batch and checkpointing it trains with,
written into the resolved configuration); ``execute.execute_run`` then trains and tests exactly what was planned.
Every process of a distributed run plans the same run; only process 0 will write.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot_sla.atomic import remove_temporaries
from fewshot_sla.backbones import checkpointing
from fewshot_sla.config import RESUME_FREE_KEYS, RunConfig, load_config, required
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.data.store import DatasetStore, Split, joined
from fewshot_sla.engine.build import (
    ImagePipeline,
    InitSource,
    build_model,
    check_augmentation,
    check_channels,
    check_names,
    check_split,
    derived_seed,
    episode_specs,
    init_backbone,
    load_episode_file,
    open_dataset,
    pipeline_for,
    pretraining_classes,
    read_init_source,
    regime,
    resolve_device,
    training_sampler,
    validation_spec,
)
from fewshot_sla.engine.data_placement import load_splits
from fewshot_sla.engine.distributed import SINGLE, Processes, process_device
from fewshot_sla.engine.extension import check_same_store, extended_config
from fewshot_sla.engine.memory import FIT_MODES, MemoryPlan, memory_budget, plan_memory, profile_step
from fewshot_sla.episodes import EpisodeSet
from fewshot_sla.errors import UserError, command, setting
from fewshot_sla.io_errors import read_text
from fewshot_sla.learners.base import PRETRAINING, Learner
from fewshot_sla.locks import exclusive, lock_path
from fewshot_sla.objectives import Objective
from fewshot_sla.results import INCOMPLETE_RUN, InitRecord, RunPaths, default_run_dir, is_finished


@dataclass
class RunPlan:
    """A checked run, ready to execute: resolved configuration, folder, device, data, the built model, its memory
    plan and this process's place in the run."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    store: DatasetStore
    splits: dict[str, Split]
    episode_file: EpisodeSet | None
    resume: bool
    overwrite: bool
    pipeline: ImagePipeline
    learner: Learner
    objective: Objective
    memory: MemoryPlan
    processes: Processes = SINGLE
    data_note: str | None = None  # which splits are read from disk, when some are (errors.render reads it)
    init: InitRecord | None = None  # the checkpoint the backbone started from (``init_from``)
    extend_from: Path | None = None  # the finished run this one trains on from (``extension.py``)


def plan_run(
    cfg: RunConfig,
    *,
    overrides: Mapping[str, Any],
    out: str | os.PathLike[str] | None,
    data_root: Any,
    resume: bool = False,
    overwrite: bool = False,
    processes: Processes = SINGLE,
    fit_memory: str = "auto",
    memory_budget_gb: float | None = None,
    data_memory_gb: float | None = None,
    extend_from: str | os.PathLike[str] | None = None,
) -> RunPlan:
    """Resolve and check a run without writing anything (every user mistake is a UserError here). ``extend_from``:
    a finished run to train for longer (to ``overrides['train_episodes']``) into the new folder ``out``."""
    if resume and overwrite:
        raise UserError(f"{setting('resume')} and {setting('overwrite')} contradict each other; pass only one")
    if extend_from is not None and (resume or out is None):
        raise UserError(
            f"{setting('extend')} trains a finished run for longer into a new run folder: give it {setting('out')} "
            f"NEW_DIR" + (f", without {setting('resume')} (which continues an unfinished run)" if resume else "")
        )
    if fit_memory not in FIT_MODES:
        raise UserError(f"{setting('fit_memory')} must be one of {', '.join(FIT_MODES)}, got '{fit_memory}'")
    if memory_budget_gb is not None and not (memory_budget_gb > 0 and math.isfinite(memory_budget_gb)):
        raise UserError(f"{setting('memory_budget')} must be a positive number of GB, got {memory_budget_gb}")
    run_dir = run_directory(cfg, out)
    extend_source = None if extend_from is None else Path(extend_from)
    if resume:
        cfg = _resumable_config(run_dir, overrides)
    elif extend_source is not None:
        if run_dir.resolve() == extend_source.resolve():
            raise UserError(
                f"{setting('extend')} keeps {extend_source} as it is and writes the longer run elsewhere; choose "
                f"another {setting('out')}"
            )
        cfg = extended_config(extend_source, overrides)
        _check_output_folder(run_dir, overwrite)
    else:
        cfg = apply_recipe(cfg)
        _check_output_folder(run_dir, overwrite)
    check_names(cfg)
    # the backbone's origin: another run's, read when training starts from step 0; else the run's own checkpoint
    source = None if extend_source is not None else _init_source(cfg, run_dir, resume)
    device = process_device(processes, cfg.device) if processes.active else resolve_device(cfg.device)
    meta_batch = required(cfg.meta_batch, "meta_batch")
    _check_scale(cfg, meta_batch, processes, device)
    store = open_dataset(cfg, data_root)
    if extend_source is not None:
        check_same_store(extend_source, store.fingerprint)
    train_spec, test_spec = episode_specs(cfg)
    episode_file = load_episode_file(cfg.episodes_file, cfg.dataset, store) if cfg.episodes_file else None
    if episode_file is not None and episode_file.spec != test_spec:
        s = episode_file.spec
        raise UserError(
            f"{setting('episodes_file')} holds {s.ways}-way {s.shots}-shot {s.queries}-query episodes but the "
            f"run tests {cfg.ways}-way {cfg.shots}-shot {cfg.queries}-query; match "
            f"{setting('ways')}/{setting('shots')}/{setting('queries')}"
        )
    names = ["train", "val", "test"] + ([episode_file.split] if episode_file is not None else [])
    placement = load_splits(store, names, device, processes.local_world_size, data_memory_gb)
    splits = placement.splits
    if cfg.train_split == "train+val":  # the final models of Snell et al. and Lee et al.
        splits["train"] = joined(splits["train"], splits["val"], "train+val")
    if episode_file is None:
        check_split(splits["test"], test_spec, "test")
    check_split(splits["val"], validation_spec(cfg), "validation")
    if regime(cfg) == PRETRAINING:  # batches of every training class: the classifier's width is their number
        cfg = pretraining_classes(cfg, splits["train"])
        train_spec, _ = episode_specs(cfg)
    else:
        check_split(splits["train"], train_spec, "training")
    if episode_file is not None:
        episode_file.rows_in(splits[episode_file.split], cfg.dataset)
    pipeline = pipeline_for(cfg, store)
    check_channels(cfg, pipeline.normalization.channels)
    check_augmentation(cfg)
    # bad backbone/learner options fail here
    learner, objective = build_model(cfg, pipeline.image_size, device, pipeline.normalization.channels)
    init = None
    if source is not None:  # a run that starts training: the other run's backbone replaces the seeded one
        init = init_backbone(learner, source, cfg, pipeline.normalization.channels)
    elif cfg.init_from is not None:  # resumed from its own checkpoint, which holds the weights
        init = _recorded_init(run_dir if extend_source is None else extend_source)
    can_checkpoint = checkpointing.supports(learner.backbone) and learner.supports_checkpointing
    if cfg.checkpointing and not can_checkpoint:
        why = (
            f"learner '{cfg.method}' adapts functional copies of the weights, which a recomputation cannot see"
            if not learner.supports_checkpointing
            else f"backbone '{cfg.backbone}' does not support it (built-in backbones that do: conv4, resnet12)"
        )
        raise UserError(f"activation checkpointing is not available here: {why}; drop {setting('checkpointing')}")
    profile = None
    if fit_memory != "off":
        sampler = training_sampler(cfg, splits["train"], train_spec, derived_seed(cfg.seed, "memory-probe"))
        optimizer = str(cfg.optimizer)
        profile = profile_step(
            learner, objective, sampler, pipeline, meta_batch, optimizer, cfg.momentum or 0.0, cfg.amp
        )
    budget = memory_budget(device, processes.local_world_size, memory_budget_gb)
    share = meta_batch // processes.world_size
    memory = plan_memory(
        profile, share, fit_memory, budget, learner, cfg.micro_batch, cfg.checkpointing, can_checkpoint
    )
    cfg = cfg.updated({"micro_batch": memory.micro_batch, "checkpointing": memory.checkpointing}, "memory plan")
    if memory.checkpointing:
        checkpointing.enable(learner.backbone)
    if cfg.sync_batchnorm:
        learner = nn.SyncBatchNorm.convert_sync_batchnorm(learner)  # type: ignore[no-untyped-call]  # untyped in torch
    return RunPlan(
        cfg,
        run_dir,
        device,
        store,
        splits,
        episode_file,
        resume,
        overwrite,
        pipeline,
        learner,
        objective,
        memory,
        processes,
        placement.note,
        init,
        extend_source,
    )


def run_directory(cfg: RunConfig, out: str | os.PathLike[str] | None) -> Path:
    """The run folder: ``out``, else the default one named after the run's dataset, method, task and seed."""
    if out is not None:
        return Path(out)
    return default_run_dir(cfg.dataset, cfg.method, cfg.ways, cfg.shots, cfg.transform, cfg.objective, cfg.seed)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock while a run or an evaluation writes it (one writer at a time), and clear the
    temporary files a killed writer left in it."""
    _check_location(run_dir)
    with exclusive(
        lock_path(run_dir), f"run folder {run_dir}", f"wait for it to end, or choose another {setting('out')}"
    ):
        remove_temporaries(run_dir, recursive=True)
        yield


def _check_scale(cfg: RunConfig, meta_batch: int, processes: Processes, device: torch.device) -> None:
    """The micro-batch and the process count must fit the meta-batch; SyncBatchNorm needs processes on GPUs."""
    if cfg.micro_batch is not None and cfg.micro_batch > meta_batch:
        raise UserError(
            f"{setting('micro_batch')} {cfg.micro_batch} is above the meta-batch of {meta_batch} episodes; use "
            f"{setting('micro_batch')} {meta_batch} or fewer"
        )
    world = processes.world_size
    if meta_batch % world:
        counts = [n for n in range(1, meta_batch + 1) if meta_batch % n == 0]
        raise UserError(
            f"{world} processes cannot share a meta-batch of {meta_batch} episodes evenly; use a process count in "
            f"{counts} or {setting('meta_batch')} {world * max(1, round(meta_batch / world))}"
        )
    if cfg.sync_batchnorm and not (processes.active and device.type == "cuda"):
        raise UserError(
            f"{setting('sync_batchnorm')} synchronises BatchNorm across processes on GPUs (torch's "
            "SyncBatchNorm has no CPU "
            "kernel); launch several processes on GPUs with torchrun, or drop it"
        )


def _resumable_config(run_dir: Path, overrides: Mapping[str, Any]) -> RunConfig:
    """The stored configuration of an unfinished run, with the few flags allowed to change on resume."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise UserError(
            f"nothing to resume in {run_dir} (no {paths.config.name}); start the run without {setting('resume')}"
        )
    if is_finished(run_dir):  # a damaged results file is rebuilt by resuming (the last checkpoint is final)
        raise UserError(
            f"{run_dir} already finished; re-evaluate it with '{command('eval', run_dir)}' "
            f"or start again with {setting('overwrite')}"
        )
    stored = load_config(paths.config, INCOMPLETE_RUN)
    changed = [k for k, v in overrides.items() if k not in RESUME_FREE_KEYS and getattr(stored, k) != v]
    if changed:
        raise UserError(
            f"{setting('resume')} continues {run_dir} with its stored configuration, which differs in "
            f"{', '.join(changed)}; drop those flags or start a new run with another {setting('out')}"
        )
    return stored.updated({k: v for k, v in overrides.items() if k in RESUME_FREE_KEYS}, "command line")


def _init_source(cfg: RunConfig, run_dir: Path, resume: bool) -> InitSource | None:
    """The other run's backbone a run starts from (``init_from``): read and checked when training starts at step 0,
    a new run or a resumed one without a checkpoint; None when the run's own ``last.pt`` holds its weights."""
    if cfg.init_from is None:
        if cfg.init_checkpoint is not None:
            raise UserError(
                f"{setting('init_checkpoint')} {cfg.init_checkpoint} chooses a checkpoint of "
                f"{setting('init_from')}, which is not given; "
                f"add {setting('init_from')} RUN_DIR or drop {setting('init_checkpoint')}"
            )
        return None
    if resume and RunPaths(run_dir).last_checkpoint.is_file():
        return None
    return read_init_source(cfg, run_dir)


def _recorded_init(run_dir: Path) -> InitRecord:
    """The ``InitRecord`` a run wrote when it started from another run's backbone (``execute.py``), which a resumed
    run reports without reading that run again."""
    file = RunPaths(run_dir).init_source
    if not file.is_file():
        raise UserError(f"{file} is missing; {INCOMPLETE_RUN}")
    try:
        return InitRecord.model_validate_json(read_text(file, "the init record", INCOMPLETE_RUN))
    except ValueError:
        raise UserError(f"{file} is damaged; {INCOMPLETE_RUN}") from None


def _check_output_folder(run_dir: Path, overwrite: bool) -> None:
    """An existing non-empty folder needs --overwrite (and must be a run); the location must be writable."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            if is_finished(run_dir):
                advice = f"re-evaluate it with '{command('eval', run_dir)}', pass {setting('overwrite')} to replace it"
            elif RunPaths(run_dir).config.is_file():
                advice = f"pass {setting('resume')} to continue it, {setting('overwrite')} to replace it"
            else:
                advice = "empty it"
            raise UserError(f"output folder {run_dir} already exists; {advice}, or choose another {setting('out')}")
        if not RunPaths(run_dir).config.is_file():
            raise UserError(
                f"{setting('overwrite')} refuses to delete {run_dir}: it is not a fewshot-sla run folder; "
                f"choose another {setting('out')}"
            )
    _check_location(run_dir)


def _check_location(run_dir: Path) -> None:
    """The run folder must be a folder, or creatable in a writable one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{setting('out')} {run_dir} is a file, not a folder; choose another {setting('out')}")
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(
            f"cannot create {setting('out')} {run_dir}: {parent} is a file, not a folder; choose another "
            f"{setting('out')}"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only_file_system(parent) else "permission denied"
        raise UserError(f"cannot write to {parent} ({why}); choose a writable {setting('out')}")


def _read_only_file_system(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
