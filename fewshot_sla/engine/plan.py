"""Planning a run: resolve and check everything a user can get wrong before anything is written.

``plan_run`` resolves the configuration (recipe, or the stored one on ``--resume``), checks names, device,
dataset, episode specs, the episode file and the output folder, loads the splits and builds the model once;
``execute.execute_run`` then trains and tests exactly what was planned.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.data.store import DatasetStore, Split
from fewshot_sla.engine.build import (
    ImagePipeline,
    build_model,
    check_names,
    check_split,
    episode_specs,
    load_episode_file,
    open_dataset,
    pipeline_for,
    resolve_device,
)
from fewshot_sla.engine.recipes import apply_recipe
from fewshot_sla.episodes import EpisodeSet
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import Learner
from fewshot_sla.objectives import Objective
from fewshot_sla.results import RunPaths, default_run_dir

# Keys that may differ between the stored configuration and the flags of a --resume call.
RESUME_FREE_KEYS = ("device",)


@dataclass
class RunPlan:
    """A checked run, ready to execute: resolved configuration, folder, device, data and the built model."""

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


def plan_run(
    cfg: RunConfig,
    *,
    overrides: Mapping[str, Any],
    out: str | os.PathLike | None,
    data_root: Any,
    resume: bool = False,
    overwrite: bool = False,
) -> RunPlan:
    """Resolve and check a run without writing anything (every user mistake is a UserError here)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass only one")
    if resume:
        run_dir = (
            Path(out)
            if out is not None
            else default_run_dir(cfg.dataset, cfg.method, cfg.ways, cfg.shots, cfg.transform, cfg.objective, cfg.seed)
        )
        cfg = _resumable_config(run_dir, overrides)
    else:
        cfg = apply_recipe(cfg)
        run_dir = (
            Path(out)
            if out is not None
            else default_run_dir(cfg.dataset, cfg.method, cfg.ways, cfg.shots, cfg.transform, cfg.objective, cfg.seed)
        )
        _check_output_folder(run_dir, overwrite)
    check_names(cfg)
    device = resolve_device(cfg.device)
    store = open_dataset(cfg, data_root)
    splits = {name: store.split(name, device=device) for name in ("train", "val", "test")}
    train_spec, test_spec = episode_specs(cfg)
    if not cfg.episodes_file:
        check_split(splits["test"], test_spec, "test")
    check_split(splits["val"], test_spec, "validation")
    check_split(splits["train"], train_spec, "training")
    episode_file = None
    if cfg.episodes_file:
        episode_file = load_episode_file(cfg.episodes_file, cfg.dataset, store)
        if episode_file.spec != test_spec:
            s = episode_file.spec
            raise UserError(
                f"--episodes-file holds {s.ways}-way {s.shots}-shot {s.queries}-query episodes but the "
                f"run tests {cfg.ways}-way {cfg.shots}-shot {cfg.queries}-query; "
                "match --ways/--shots/--queries"
            )
        if episode_file.split not in splits:
            splits[episode_file.split] = store.split(episode_file.split, device=device)
        episode_file.rows_in(splits[episode_file.split], cfg.dataset)
    pipeline = pipeline_for(cfg, store)
    learner, objective = build_model(cfg, pipeline.image_size, device)  # bad backbone/learner options fail here
    return RunPlan(cfg, run_dir, device, store, splits, episode_file, resume, overwrite, pipeline, learner, objective)


def _resumable_config(run_dir: Path, overrides: Mapping[str, Any]) -> RunConfig:
    """The stored configuration of an unfinished run, with the few flags allowed to change on resume."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise UserError(f"nothing to resume in {run_dir} (no {paths.config.name}); start the run without --resume")
    if paths.results.is_file():
        raise UserError(
            f"{run_dir} already finished; re-evaluate it with 'fewshot-sla eval {run_dir}' "
            "or start again with --overwrite"
        )
    stored = load_config(paths.config)
    changed = [k for k, v in overrides.items() if k not in RESUME_FREE_KEYS and getattr(stored, k) != v]
    if changed:
        raise UserError(
            f"--resume continues {run_dir} with its stored configuration, which differs in "
            f"{', '.join(changed)}; drop those flags or start a new run with another --out"
        )
    return stored.updated({k: v for k, v in overrides.items() if k in RESUME_FREE_KEYS}, "command line")


def _check_output_folder(run_dir: Path, overwrite: bool) -> None:
    """An existing non-empty folder needs --overwrite (and must be a run); the location must be writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"output folder {run_dir} already exists; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        if not RunPaths(run_dir).config.is_file():
            raise UserError(
                f"--overwrite refuses to delete {run_dir}: it is not a fewshot-sla run folder; choose another --out"
            )
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create --out {run_dir}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent} (permission denied); choose a writable --out")
