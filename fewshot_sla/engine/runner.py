"""Whole commands as library calls: plan and execute a run, re-evaluate a run, compare two runs.

``plan_run`` checks everything a user can get wrong (names, device, dataset, episode specs, episode file,
output folder) before anything is written; ``execute_run`` trains, evaluates the best checkpoint on the
fixed test episodes and writes ``results.json``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fewshot_sla.atomic import write_text_atomic
from fewshot_sla.augment import TrainAugment
from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.cpu_memory import reuse_freed_memory
from fewshot_sla.data.store import DatasetStore, Split
from fewshot_sla.engine.build import (
    ImagePipeline,
    build_model,
    check_names,
    check_split,
    describe_device,
    episode_specs,
    open_dataset,
    resolve_device,
)
from fewshot_sla.engine.checkpoint import load_checkpoint
from fewshot_sla.engine.evaluate import Evaluation, evaluate, fixed_test_set
from fewshot_sla.engine.recipes import apply_recipe
from fewshot_sla.engine.stats import PairedComparison, paired_comparison, summarize
from fewshot_sla.engine.train import Trainer
from fewshot_sla.episodes import EpisodeSet
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import Learner
from fewshot_sla.prediction_kinds import display_order, headline_kind
from fewshot_sla.results import (
    RunPaths,
    RunResult,
    add_evaluation,
    default_run_dir,
    git_commit,
    load_results,
    now_iso,
    save_per_episode,
    versions,
    write_results,
)

# Keys that may differ between the stored configuration and the flags of a --resume call.
RESUME_FREE_KEYS = ("device",)


@dataclass
class RunPlan:
    """A checked run, ready to execute: resolved configuration, folder, device, data."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    store: DatasetStore
    splits: dict[str, Split]
    episode_file: EpisodeSet | None
    resume: bool
    overwrite: bool


def plan_run(cfg: RunConfig, *, overrides: Mapping[str, Any], out: str | os.PathLike | None, data_root: Any,
             resume: bool = False, overwrite: bool = False) -> RunPlan:
    """Resolve and check a run without writing anything (every user mistake is a UserError here)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass only one")
    if resume:
        run_dir = Path(out) if out is not None else default_run_dir(
            cfg.dataset, cfg.method, cfg.ways, cfg.shots, cfg.transform, cfg.objective, cfg.seed)
        cfg = _resumable_config(run_dir, overrides)
    else:
        cfg = apply_recipe(cfg.validate())
        run_dir = Path(out) if out is not None else default_run_dir(
            cfg.dataset, cfg.method, cfg.ways, cfg.shots, cfg.transform, cfg.objective, cfg.seed)
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
        episode_file = _load_episode_file(cfg.episodes_file, cfg.dataset, store)
        if episode_file.spec != test_spec:
            s = episode_file.spec
            raise UserError(f"--episodes-file holds {s.ways}-way {s.shots}-shot {s.queries}-query episodes but the "
                            f"run tests {cfg.ways}-way {cfg.shots}-shot {cfg.queries}-query; "
                            "match --ways/--shots/--queries")
        if episode_file.split not in splits:
            splits[episode_file.split] = store.split(episode_file.split, device=device)
        episode_file.rows_in(splits[episode_file.split], cfg.dataset)
    build_model(cfg, cfg.image_size or store.image_size, device)  # bad backbone/learner options fail here
    return RunPlan(cfg, run_dir, device, store, splits, episode_file, resume, overwrite)


def _resumable_config(run_dir: Path, overrides: Mapping[str, Any]) -> RunConfig:
    """The stored configuration of an unfinished run, with the few flags allowed to change on resume."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise UserError(f"nothing to resume in {run_dir} (no {paths.config.name}); start the run without --resume")
    if paths.results.is_file():
        raise UserError(f"{run_dir} already finished; re-evaluate it with 'fewshot-sla eval {run_dir}' "
                        "or start again with --overwrite")
    stored = load_config(paths.config)
    changed = [k for k, v in overrides.items() if k not in RESUME_FREE_KEYS and getattr(stored, k) != v]
    if changed:
        raise UserError(f"--resume continues {run_dir} with its stored configuration, which differs in "
                        f"{', '.join(changed)}; drop those flags or start a new run with another --out")
    free = {k: v for k, v in overrides.items() if k in RESUME_FREE_KEYS}
    return stored.updated(free).validate()


def _check_output_folder(run_dir: Path, overwrite: bool) -> None:
    """An existing non-empty folder needs --overwrite (and must be a run); the location must be writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {run_dir} already exists; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --out")
        if not RunPaths(run_dir).config.is_file():
            raise UserError(f"--overwrite refuses to delete {run_dir}: it is not a fewshot-sla run folder; "
                            "choose another --out")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create --out {run_dir}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent} (permission denied); choose a writable --out")


def _load_episode_file(path: str | os.PathLike, dataset: str, store: DatasetStore) -> EpisodeSet:
    episode_set = EpisodeSet.load(path)
    if episode_set.dataset != dataset:
        raise UserError(f"episode file {path} is for dataset '{episode_set.dataset}', not '{dataset}'; "
                        f"use a set made with 'fewshot-sla episodes make --dataset {dataset} ...'")
    if episode_set.split not in store.split_names:
        raise UserError(f"episode file {path} uses split '{episode_set.split}', which the {dataset} store lacks")
    return episode_set


@dataclass
class RunReport:
    """What ``execute_run`` did: status ``finished``, ``max-steps`` or ``interrupted``; results when finished."""

    status: str
    step: int
    run_dir: Path
    results: dict[str, Any] | None


def _pipeline(cfg: RunConfig, store: DatasetStore) -> ImagePipeline:
    augment = TrainAugment(padding=8 if store.image_size >= 64 else 4) if cfg.augment else None
    return ImagePipeline(cfg.image_size or store.image_size, store.image_size, augment)


def _autocast(device: torch.device, amp: bool) -> Callable[[], Any]:
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def execute_run(plan: RunPlan, *, max_steps: int | None = None, progress: bool = True,
                step_hook: Callable[[int], None] | None = None) -> RunReport:
    """Train (or continue training), then evaluate the best checkpoint and write results.json."""
    cfg, paths = plan.cfg, RunPaths(plan.run_dir)
    if plan.device.type == "cpu":
        reuse_freed_memory()
    if plan.overwrite and plan.run_dir.exists():
        shutil.rmtree(plan.run_dir)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if not plan.resume:
        write_text_atomic(paths.config, cfg.to_yaml())
    pipeline = _pipeline(cfg, plan.store)
    learner, objective = build_model(cfg, pipeline.image_size, plan.device)
    trainer = Trainer(cfg, plan.run_dir, learner, objective, plan.splits["train"], plan.splits["val"], pipeline,
                      plan.device, progress=progress)
    outcome = trainer.run(resume=plan.resume, max_steps=max_steps, step_hook=step_hook)
    if outcome.status != "finished":
        return RunReport(outcome.status, outcome.step, plan.run_dir, None)
    results = {
        "status": "finished", "method": cfg.method, "backbone": cfg.backbone, "dataset": cfg.dataset,
        "dataset_fingerprint": plan.store.fingerprint, "transform": cfg.transform, "objective": cfg.objective,
        "seed": cfg.seed, "ways": cfg.ways, "shots": cfg.shots, "queries": cfg.queries,
        "train": outcome.summary, "device": describe_device(plan.device), "amp": cfg.amp,
        "versions": versions(), "git_commit": git_commit(), "created": now_iso(), "config": cfg.to_dict(),
    }
    episode_set, set_path = (plan.episode_file, Path(cfg.episodes_file)) if plan.episode_file is not None else \
        fixed_test_set(cfg.dataset, plan.splits["test"], episode_specs(cfg)[1], cfg.eval_episodes, plan.run_dir)
    results = _evaluate_into(results, plan.run_dir, cfg, learner, objective, episode_set, set_path,
                             plan.splits[episode_set.split], pipeline, plan.device, plan.store.fingerprint, progress)
    return RunReport("finished", outcome.step, plan.run_dir, results)


def _evaluate_into(results: dict[str, Any], run_dir: Path, cfg: RunConfig, learner: Learner, objective: Any,
                   episode_set: EpisodeSet, set_path: Path, split: Split, pipeline: ImagePipeline,
                   device: torch.device, fingerprint: str, progress: bool) -> dict[str, Any]:
    """Load the best checkpoint, evaluate it on ``episode_set``, store per-episode results, write results.json."""
    paths = RunPaths(run_dir)
    best = load_checkpoint(paths.best_checkpoint)
    learner.load_state_dict(best["model"])
    objective.load_state_dict(best["objective"])
    outcome: Evaluation = evaluate(learner, objective, episode_set, split, cfg.dataset, pipeline,
                                   batch_size=cfg.eval_batch, use_cache=cfg.feature_cache,
                                   autocast=_autocast(device, cfg.amp), progress=progress)
    per_episode = paths.per_episode(episode_set.content_hash)
    save_per_episode(per_episode, outcome.accuracies, episode_set.content_hash, fingerprint)
    try:
        shown_path = str(set_path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        shown_path = str(set_path)
    spec = episode_set.spec
    block = {
        "episode_set": {"hash": episode_set.content_hash, "file": shown_path, "dataset": episode_set.dataset,
                        "split": episode_set.split, "ways": spec.ways, "shots": spec.shots,
                        "queries": spec.queries, "count": episode_set.count, "seed": episode_set.seed},
        "episodes": outcome.episodes, "checkpoint": "best", "best_step": int(best["step"]),
        "cached": outcome.cached, "time_s": outcome.time_s,
        "episodes_per_s": outcome.episodes / outcome.time_s if outcome.time_s > 0 else None,
        "accuracy": {kind: summarize(acc).scaled(100.0).as_dict() for kind, acc in outcome.accuracies.items()},
        "headline": headline_kind(list(outcome.accuracies)),
        "per_episode_file": str(per_episode.relative_to(run_dir)),
        "device": describe_device(device),
    }
    results = add_evaluation(results, block)
    write_results(run_dir, results)
    return results


def evaluate_run(run_dir: str | os.PathLike, *, data_root: Any, episodes_file: str | None = None,
                 eval_episodes: int | None = None, device: str | None = None, use_cache: bool | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Re-evaluate a finished run's best checkpoint on another (or the same) fixed episode set."""
    run_dir = Path(run_dir)
    previous = load_results(run_dir)
    paths = RunPaths(run_dir)
    cfg = load_config(paths.config)
    changes: dict[str, Any] = {}
    if device is not None:
        changes["device"] = device
    if use_cache is not None:
        changes["feature_cache"] = use_cache
    cfg = cfg.updated(changes).validate()
    dev = resolve_device(cfg.device)
    if dev.type == "cpu":
        reuse_freed_memory()
    check_names(cfg)
    store = open_dataset(cfg, data_root)
    if store.fingerprint != previous.data["dataset_fingerprint"]:
        raise UserError(f"the {cfg.dataset} store changed since {run_dir} was trained (fingerprint "
                        f"{store.fingerprint[:12]} vs {previous.data['dataset_fingerprint'][:12]}); "
                        "rebuild the original store or train a new run")
    if episodes_file is not None:
        episode_set = _load_episode_file(episodes_file, cfg.dataset, store)
        set_path = Path(episodes_file)
        split = store.split(episode_set.split, device=dev)
    else:
        split = store.split("test", device=dev)
        spec = episode_specs(cfg)[1]
        check_split(split, spec, "test")
        episode_set, set_path = fixed_test_set(cfg.dataset, split, spec, eval_episodes or cfg.eval_episodes, run_dir)
    episode_set.rows_in(split, cfg.dataset)
    pipeline = _pipeline(cfg, store)
    learner, objective = build_model(cfg, pipeline.image_size, dev)
    return _evaluate_into(previous.data, run_dir, cfg, learner, objective, episode_set, set_path, split, pipeline,
                          dev, store.fingerprint, progress)


@dataclass
class Comparison:
    """A paired comparison of two runs on one episode set: one entry per (kind of A, kind of B) pair."""

    run_a: RunResult
    run_b: RunResult
    episode_set_hash: str
    pairs: list[tuple[str, str, float, float, PairedComparison]]  # kind_a, kind_b, mean_a %, mean_b %, stats

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (accuracies and differences in percent, p-values as they are)."""
        out = []
        for kind_a, kind_b, mean_a, mean_b, c in self.pairs:
            d = c.as_dict()
            for key in ("mean_diff", "std_diff", "ci95", "ci95_t"):
                d[key] = 100.0 * d[key]
            out.append({"kind_a": kind_a, "kind_b": kind_b, "mean_a": mean_a, "mean_b": mean_b, **d})
        return {"run_a": str(self.run_a.path), "run_b": str(self.run_b.path),
                "episode_set_hash": self.episode_set_hash, "comparisons": out}


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, *, kind: str | None = None,
                 kind_a: str | None = None, kind_b: str | None = None, episode_set: str | None = None) -> Comparison:
    """Compare two finished runs episode by episode on an episode set both were evaluated on."""
    a, b = load_results(run_a), load_results(run_b)
    if a.data["dataset"] != b.data["dataset"] or a.data["dataset_fingerprint"] != b.data["dataset_fingerprint"]:
        raise UserError(f"the runs used different data ({a.data['dataset']} {a.data['dataset_fingerprint'][:12]} vs "
                        f"{b.data['dataset']} {b.data['dataset_fingerprint'][:12]}); compare runs on the same store")
    set_hash = _common_episode_set(a, b, episode_set)
    block_a, block_b = a.evaluation_for(set_hash), b.evaluation_for(set_hash)
    assert block_a is not None and block_b is not None
    kinds_a, kinds_b = list(block_a["accuracy"]), list(block_b["accuracy"])
    if kind is not None:
        kind_a, kind_b = kind_a or kind, kind_b or kind
    if kind_a is None and kind_b is None:
        shared = display_order([k for k in kinds_a if k in kinds_b])
        if not shared:
            raise UserError(f"the runs share no prediction kind ({run_a}: {', '.join(kinds_a)}; {run_b}: "
                            f"{', '.join(kinds_b)}); choose them with --kind-a and --kind-b")
        wanted = [(k, k) for k in shared]
    else:
        wanted = [(kind_a or headline_kind(kinds_a), kind_b or headline_kind(kinds_b))]
    for ka, kb in wanted:
        for k, kinds, run in ((ka, kinds_a, run_a), (kb, kinds_b, run_b)):
            if k not in kinds:
                raise UserError(f"run {run} has no '{k}' predictions; it has: {', '.join(kinds)}")
    per_a, per_b = a.per_episode(set_hash), b.per_episode(set_hash)
    pairs = [(ka, kb, 100.0 * float(per_a[ka].mean()), 100.0 * float(per_b[kb].mean()),
              paired_comparison(per_a[ka], per_b[kb])) for ka, kb in wanted]
    return Comparison(a, b, set_hash, pairs)


def _common_episode_set(a: RunResult, b: RunResult, prefix: str | None) -> str:
    hashes_a = [blk["episode_set"]["hash"] for blk in a.data.get("evaluations", [])]
    hashes_b = [blk["episode_set"]["hash"] for blk in b.data.get("evaluations", [])]
    common = [h for h in hashes_a if h in hashes_b]
    if prefix is not None:
        common = [h for h in common if h.startswith(prefix)]
        if not common:
            raise UserError(f"no episode set with hash {prefix}... was used to evaluate both runs; "
                            "see 'episode_set' in their results.json")
    if not common:
        file_a = a.evaluation["episode_set"]["file"]
        raise UserError(f"the runs were evaluated on different episode sets ({a.path}: "
                        f"{a.evaluation['episode_set']['hash'][:12]}, {b.path}: "
                        f"{b.evaluation['episode_set']['hash'][:12]}); evaluate both on one set, e.g. "
                        f"'fewshot-sla eval {b.path} --episodes-file {_set_file(a, file_a)}'")
    latest_a, latest_b = a.evaluation["episode_set"]["hash"], b.evaluation["episode_set"]["hash"]
    for h in (latest_a, latest_b):
        if h in common:
            return h
    return common[-1]


def _set_file(run: RunResult, file: str) -> str:
    path = Path(file)
    return str(path if path.is_absolute() or path.exists() else run.path / path)
