"""Executing a planned run: train (or continue training), then test the best checkpoint and write results.json."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot_sla.atomic import write_text_atomic
from fewshot_sla.config.recipes import recipe_record
from fewshot_sla.engine.build import describe_device, episode_specs
from fewshot_sla.engine.callbacks import Callback
from fewshot_sla.engine.evaluate import fixed_test_set
from fewshot_sla.engine.extension import recorded_extension, start_extension
from fewshot_sla.engine.plan import RunPlan
from fewshot_sla.engine.run_evaluation import evaluate_checkpoint
from fewshot_sla.engine.train import Trainer
from fewshot_sla.errors import command, render
from fewshot_sla.io_errors import IOFailure, write_error
from fewshot_sla.preemption import Preempted, preemption_signals
from fewshot_sla.results import MemoryRecord, RunPaths, RunRecord, git_commit, now_iso, transform_label, versions


@dataclass
class RunReport:
    """What ``execute_run`` did: status ``finished``, ``max-steps`` or ``interrupted``; results when finished."""

    status: str
    step: int
    run_dir: Path
    results: dict[str, Any] | None


def execute_run(
    plan: RunPlan,
    *,
    max_steps: int | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> RunReport:
    """Train (or continue training) the planned model, then evaluate its best checkpoint and write results.json.

    A failure leaves a folder that ``--resume`` continues, or nothing: a new run that fails before its first
    checkpoint removes its folder. A preemption signal (``preemption.py``) raises ``Preempted`` and never removes
    the folder: training saves its state at the current step first; elsewhere the last checkpoint, or the
    configuration of a run not yet started, is what ``--resume`` continues."""
    try:
        with preemption_signals():
            return _execute(plan, max_steps, progress, callbacks)
    except BaseException as err:
        replacement = _after_failure(plan, err) if plan.processes.writer else err
        if replacement is not err:
            raise replacement from None
        raise


def _after_failure(plan: RunPlan, err: BaseException) -> BaseException:
    """Clean up after a failed run and say what to do next."""
    paths = RunPaths(plan.run_dir)
    resume = f"continue with '{command('run', resume=True, out=plan.run_dir)}'"
    if isinstance(err, Preempted):
        return err.then(resume if paths.config.is_file() else "run the command again (nothing was written yet)")
    if isinstance(err, OSError):  # a plain write into the run folder failed (a full disk, say)
        err = write_error(err, err.filename or plan.run_dir, None if err.filename else "into the run folder")
    if paths.last_checkpoint.is_file():
        if isinstance(err, IOFailure):
            return err.then(resume)
        return err
    if not plan.resume and plan.run_dir.is_dir():
        shutil.rmtree(plan.run_dir, ignore_errors=True)  # nothing worth resuming was written yet
        if isinstance(err, IOFailure):
            return err.then("run the command again (the new run folder was removed)")
    return err


def _execute(plan: RunPlan, max_steps: int | None, progress: bool, callbacks: Sequence[Callback]) -> RunReport:
    cfg, paths, processes = plan.cfg, RunPaths(plan.run_dir), plan.processes
    if processes.writer:
        if plan.overwrite and plan.run_dir.exists():
            shutil.rmtree(plan.run_dir)
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        if not plan.resume:
            write_text_atomic(paths.config, cfg.to_yaml())
        if plan.extend_from is not None:  # the source's final state, saved as this run's
            start_extension(plan.extend_from, plan.run_dir, cfg)
        if plan.init is not None:  # where the backbone started, for the results of this and any resumed session
            write_text_atomic(paths.init_source, plan.init.model_dump_json(indent=2) + "\n")
    processes.barrier()
    trainer = Trainer(
        cfg,
        plan.run_dir,
        plan.learner,
        plan.objective,
        plan.splits["train"],
        plan.splits["val"],
        plan.pipeline,
        plan.device,
        progress=progress,
        processes=processes,
    )
    outcome = trainer.run(resume=plan.resume or plan.extend_from is not None, max_steps=max_steps, callbacks=callbacks)
    if outcome.status != "finished":
        return RunReport(outcome.status, outcome.step, plan.run_dir, None)
    assert outcome.summary is not None
    record = RunRecord(
        status="finished",
        method=cfg.method,
        backbone=str(cfg.backbone),
        dataset=cfg.dataset,
        dataset_fingerprint=plan.store.fingerprint,
        transform=transform_label(cfg.objective, cfg.transform),
        objective=cfg.objective,
        seed=cfg.seed,
        ways=cfg.ways,
        shots=cfg.shots,
        queries=cfg.queries,
        train=outcome.summary,
        device=describe_device(plan.device),
        amp=cfg.amp,
        versions=versions(),
        git_commit=git_commit(),
        created=now_iso(),
        config=cfg.to_dict(),
        learner_settings=plan.learner.settings(),
        init_from=plan.init,
        extended_from=recorded_extension(plan.run_dir),
        image_size=plan.pipeline.image_size,
        store_image_size=plan.pipeline.store_size,
        normalization={"mean": list(plan.pipeline.normalization.mean), "std": list(plan.pipeline.normalization.std)},
        recipe=recipe_record(cfg),
        memory=MemoryRecord(
            micro_batch=plan.memory.micro_batch,
            checkpointing=plan.memory.checkpointing,
            processes=processes.world_size,
            estimated_step_bytes=plan.memory.estimate,
            budget_bytes=plan.memory.budget,
            budget=render(plan.memory.source),  # in the voice of the caller: --memory-budget from the CLI
            available_bytes=plan.memory.available,
            measured_peak_bytes=outcome.peak_bytes,
            measured_baseline_bytes=outcome.baseline_bytes,
        ),
    )
    if plan.episode_file is not None:
        episode_set, set_path, set_source = plan.episode_file, Path(str(cfg.episodes_file)), "file"
    else:
        episode_set, set_path, set_source = fixed_test_set(
            cfg.dataset,
            plan.splits["test"],
            episode_specs(cfg)[1],
            cfg.eval_episodes,
            plan.run_dir,
            plan.store.path.parent,
            processes.writer,
        )
    results = evaluate_checkpoint(
        record.to_dict(),
        plan.run_dir,
        cfg,
        plan.learner,
        plan.objective,
        episode_set,
        set_path,
        set_source,
        plan.splits[episode_set.split],
        plan.pipeline,
        plan.device,
        plan.store.fingerprint,
        progress,
        processes,
    )
    return RunReport("finished", outcome.step, plan.run_dir, results)
