"""Testing a run's best checkpoint on a fixed episode set and recording it in the run's results.json.

``evaluate_checkpoint`` is the last step of every run and the whole of ``fewshot-sla eval``; ``evaluate_run``
re-tests a finished run (on another episode set or count) from its folder alone.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewshot_sla.atomic import atomic_path
from fewshot_sla.config import RunConfig
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import (
    ImagePipeline,
    build_model,
    check_names,
    check_split,
    describe_device,
    episode_specs,
    load_episode_file,
    open_dataset,
    pipeline_for,
    regime,
    resolve_device,
)
from fewshot_sla.engine.checkpoint import load_checkpoint
from fewshot_sla.engine.data_placement import load_splits
from fewshot_sla.engine.distributed import SINGLE, Processes, process_device
from fewshot_sla.engine.evaluate import evaluate, fixed_test_set, unconverged_message
from fewshot_sla.engine.stats import summarize
from fewshot_sla.episodes import EpisodeSet
from fewshot_sla.errors import UserError, setting
from fewshot_sla.finished_run import FinishedRun
from fewshot_sla.learners.base import PRETRAINING, UNCONVERGED, Learner
from fewshot_sla.learners.pretrain import DEFAULT_EVAL_HEAD, EVAL_HEADS
from fewshot_sla.objectives import Objective
from fewshot_sla.package_data import SHIPPED_SHOWN
from fewshot_sla.prediction_kinds import headline_kind
from fewshot_sla.results import (
    AccuracySummary,
    EpisodeSetInfo,
    EvaluationRecord,
    RunPaths,
    add_evaluation,
    episode_set_source,
    save_per_episode,
    with_learner,
    write_results,
)

log = logging.getLogger(__name__)


def autocast_for(device: torch.device, amp: bool) -> Callable[[], Any]:
    """The autocast context of a run: bfloat16 mixed precision when it asks for AMP."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def evaluate_checkpoint(
    results: dict[str, Any],
    run_dir: Path,
    cfg: RunConfig,
    learner: Learner,
    objective: Objective,
    episode_set: EpisodeSet,
    set_path: Path,
    set_source: str,
    split: Split,
    pipeline: ImagePipeline,
    device: torch.device,
    fingerprint: str,
    progress: bool,
    processes: Processes = SINGLE,
    dataset: str | None = None,
    out_dir: Path | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Load the best checkpoint, evaluate it on ``episode_set`` (each process its share), store per-episode results
    and write results.json (process 0) into ``out_dir`` (default: the run folder; ``save=False``: nowhere); every
    process returns the results."""
    paths = RunPaths(run_dir)
    out_dir = out_dir or run_dir
    best = load_checkpoint(paths.best_checkpoint)
    learner.load_state_dict(best["model"])
    objective.load_state_dict(best["objective"])
    outcome = evaluate(
        learner,
        objective,
        episode_set,
        split,
        dataset or cfg.dataset,
        pipeline,
        batch_size=cfg.eval_batch,
        use_cache=cfg.feature_cache,
        autocast=autocast_for(device, cfg.amp),
        progress=progress and processes.writer,
        processes=processes,
    )
    per_episode = RunPaths(out_dir).per_episode(episode_set.content_hash)
    if processes.writer and save:
        save_per_episode(per_episode, outcome.accuracies, episode_set.content_hash, fingerprint)
    if set_source == "shipped":
        shown_path = f"{SHIPPED_SHOWN}/{set_path.name}"
    elif set_source == "run":
        shown_path = str(set_path.resolve().relative_to(out_dir.resolve()))
    else:
        shown_path = str(set_path)
    spec = episode_set.spec
    record = EvaluationRecord(
        episode_set=EpisodeSetInfo(
            hash=episode_set.content_hash,
            file=shown_path,
            source=episode_set_source(set_source),
            dataset=episode_set.dataset,
            split=episode_set.split,
            ways=spec.ways,
            shots=spec.shots,
            queries=spec.queries,
            count=episode_set.count,
            seed=episode_set.seed,
        ),
        episodes=outcome.episodes,
        checkpoint="best",
        best_step=int(best["step"]),
        cached=outcome.cached,
        time_s=outcome.time_s,
        episodes_per_s=outcome.episodes / outcome.time_s if outcome.time_s > 0 else None,
        accuracy={
            kind: AccuracySummary.model_validate(summarize(acc).scaled(100.0).as_dict())
            for kind, acc in outcome.accuracies.items()
        },
        headline=headline_kind(list(outcome.accuracies)),
        per_episode_file=str(per_episode.relative_to(out_dir)),
        device=describe_device(device),
        dataset_fingerprint=fingerprint,
        diagnostics=dict[str, float | None](outcome.diagnostics),
    )
    stopped = {k: v for k, v in outcome.diagnostics.items() if k.endswith(UNCONVERGED) and v > 0}
    if stopped and processes.writer:
        log.warning("%s in this evaluation (recorded in results.json)", unconverged_message(stopped))
    results = add_evaluation(results, record)
    if processes.writer and save:
        write_results(out_dir, results)
    return results


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    data_root: Any,
    episodes_file: str | None = None,
    eval_episodes: int | None = None,
    dataset: str | None = None,
    device: str | None = None,
    use_cache: bool | None = None,
    progress: bool = True,
    processes: Processes = SINGLE,
    data_memory_gb: float | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    save: bool = True,
    eval_head: str | None = None,
) -> dict[str, Any]:
    """Re-evaluate a finished run's best checkpoint on another (or the same) fixed episode set (with several
    processes, each evaluates its share of the episodes; process 0 writes).

    The evaluation is added to the run's results.json, or, with ``out_dir`` (a run someone else owns, a read-only
    folder), to a copy of it in ``out_dir`` that holds the run's earlier evaluations too (their per-episode files
    and episode sets copied), so that ``compare`` and ``leaderboard build`` read it as the run; ``save=False``
    writes nothing (the results are returned only).

    ``dataset``: test on that prepared dataset's test split instead (cross-domain, e.g. trained on mini-ImageNet,
    tested on CUB): its images are resized to the size the run's model saw in training, and its own fixed
    episode sets are used. Runs whose results.json predates ``image_size`` need their own store too, for that
    size.

    ``eval_head``: a pretraining run's embedding tested with another evaluation head (``pretrain``'s ``eval_head``
    option: nearest-centroid, logistic-regression, protonet); the run's results describe its own head, so another
    one is written to ``out_dir`` only, as a copy of the results that names it."""
    run_dir = Path(run_dir)
    run = previous = FinishedRun.open(run_dir)
    target_dir = Path(out_dir) if out_dir is not None else run_dir
    cfg = run.config
    if eval_head is not None:
        cfg = _with_eval_head(cfg, eval_head, run_dir, moved=target_dir.resolve() != run_dir.resolve())
    if target_dir.resolve() != run_dir.resolve():
        previous = _results_in(target_dir, run, save and processes.writer, cfg)
    changes: dict[str, Any] = {}
    if device is not None:
        changes["device"] = device
    if use_cache is not None:
        changes["feature_cache"] = use_cache
    cfg = cfg.updated(changes, "command line")
    dev = process_device(processes, cfg.device) if processes.active else resolve_device(cfg.device)
    check_names(cfg)
    target_name = dataset or cfg.dataset
    model_size = previous.results.image_size
    if target_name == cfg.dataset or not model_size:  # the run's own store: its test split, or its image size
        store = open_dataset(cfg, data_root)
        trained_on = previous.results.dataset_fingerprint
        if store.fingerprint != trained_on:
            raise UserError(
                f"the {cfg.dataset} store changed since {run_dir} was trained (fingerprint "
                f"{store.fingerprint[:12]} vs {trained_on[:12]}); "
                "rebuild the original store or train a new run"
            )
        model_size = model_size or pipeline_for(cfg, store).image_size
    if target_name != cfg.dataset:
        target_cfg = cfg.updated({"dataset": target_name}, "command line")
        check_names(target_cfg)
        store = open_dataset(target_cfg, data_root)
    file_set = load_episode_file(episodes_file, target_name, store) if episodes_file is not None else None
    split_name = file_set.split if file_set is not None else "test"
    split = load_splits(store, [split_name], dev, processes.local_world_size, data_memory_gb).splits[split_name]
    if file_set is not None:
        episode_set, set_path, set_source = file_set, Path(str(episodes_file)), "file"
    else:
        spec = episode_specs(cfg)[1]
        check_split(split, spec, "test")
        count = eval_episodes or cfg.eval_episodes
        episode_set, set_path, set_source = fixed_test_set(
            target_name, split, spec, count, target_dir, store.path.parent, processes.writer and save
        )
    episode_set.rows_in(split, target_name)
    channels = previous.normalization.channels
    if store.normalization.channels != channels:
        raise UserError(
            f"{run_dir} was trained on {channels}-channel images, but {target_name} has "
            f"{store.normalization.channels}; evaluate it on a dataset with the same channels"
        )
    pipeline = ImagePipeline(model_size, store.image_size, None, store.normalization)
    learner, objective = build_model(cfg, pipeline.image_size, dev, channels)
    document = previous.document
    if eval_head is not None:  # the copy names the head it was tested with
        document = with_learner(document, cfg.learner_options, learner.settings())
    return evaluate_checkpoint(
        document,
        run_dir,
        cfg,
        learner,
        objective,
        episode_set,
        set_path,
        set_source,
        split,
        pipeline,
        dev,
        store.fingerprint,
        progress,
        processes,
        target_name,
        target_dir,
        save,
    )


def _with_eval_head(cfg: RunConfig, head: str, run_dir: Path, *, moved: bool) -> RunConfig:
    """A pretraining run's configuration with another evaluation head; anything else is a UserError."""
    if regime(cfg) != PRETRAINING:
        raise UserError(
            f"{run_dir} was trained by '{cfg.method}', which has no evaluation head to choose; "
            f"{setting('eval_head')} is for runs of the pretraining regime ('pretrain')"
        )
    options = cfg.learner_options or {}
    if head == options.get("eval_head", DEFAULT_EVAL_HEAD):
        return cfg
    if head not in EVAL_HEADS:
        raise UserError(f"{setting('eval_head')} must be one of {', '.join(EVAL_HEADS)}, got '{head}'")
    if not moved:
        raise UserError(
            f"the results of {run_dir} describe its own evaluation head, "
            f"{options.get('eval_head', DEFAULT_EVAL_HEAD)}; write this one elsewhere with {setting('out')} DIR "
            "(a copy of the run's results naming the head)"
        )
    return cfg.updated({"learner_options": {**options, "eval_head": head}}, "command line")


def _results_in(out_dir: Path, run: FinishedRun, write: bool, cfg: RunConfig) -> FinishedRun:
    """The results that an evaluation written to ``out_dir`` adds to: those of an earlier evaluation of the same
    run (with the same configuration ``cfg``) there, else a copy of the run's own, with the files its evaluations
    refer to (``write``: copied)."""
    if RunPaths(out_dir).results.is_file():
        held = FinishedRun.open(out_dir)
        expected = {**run.results.config, "learner_options": cfg.learner_options}
        if (held.results.created, held.results.config) != (run.results.created, expected):
            raise UserError(
                f"{setting('out')} {out_dir} holds the results of another run; choose another {setting('out')}"
            )
        return held
    if write:
        blocks = [run.evaluation, *run.evaluations]
        files = {b.per_episode_file for b in blocks if b.per_episode_file}
        files |= {b.episode_set.file for b in blocks if b.episode_set.source == "run"}
        for name in sorted(files):
            source = run.path / name
            if source.is_file():
                with atomic_path(out_dir / name) as tmp:
                    shutil.copyfile(source, tmp)
    return run.moved(out_dir)
