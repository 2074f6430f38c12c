"""The meta-training loop: meta-batches of episodes, resume, Ctrl-C and preemption; the rest (validation,
checkpoints, logging, divergence, the progress bar) are callbacks (``callbacks.py``).

A step draws B episodes from the training split, augments and normalises them on the device, and sends
them through ``objective.loss`` in micro-batches of ``micro_batch`` episodes (one backbone pass each; the
losses are weighted by their share of the B episodes and the gradients accumulate, so the step's gradient is
the one of the whole meta-batch). With several processes (``distributed.py``) every process draws the same B
episodes from the same streams, takes its contiguous share, and the gradients and metrics are summed over
processes once per step; process 0 alone writes metrics (to its loggers, ``loggers.py``: ``metrics.jsonl`` and
those the configuration's ``log`` names), checkpoints and plots. Every
``val_every`` episodes the model is validated on a fixed validation episode set; the best model is kept in
``checkpoints/best.pt`` and the full training state (model, optimizer, scheduler, every RNG, step) in
``checkpoints/last.pt``. Resuming from ``last.pt`` replays the same random streams, so an interrupted run
ends with exactly the numbers of an uninterrupted one (on the CPU). Random streams: the episode sampler and the
augmentation have generators of their own; dropout and DropBlock draw from torch's global generator, which a
fresh run seeds from the run's seed.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot_sla import preemption
from fewshot_sla.config import RESUME_FREE_KEYS, RunConfig, required
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import ImagePipeline, derived_seed, episode_specs, training_sampler, validation_spec
from fewshot_sla.engine.callbacks import (
    Callback,
    ClockCheckpoint,
    DivergenceGuard,
    LoggerCallback,
    PeriodicValidation,
    ProgressBar,
    SolverWarnings,
)
from fewshot_sla.engine.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from fewshot_sla.engine.curves import plot_learning_curve
from fewshot_sla.engine.distributed import SINGLE, Processes
from fewshot_sla.engine.evaluate import evaluate, validation_episode_set
from fewshot_sla.engine.loggers import RunLogger, open_loggers, validation_ci95
from fewshot_sla.engine.memory import PeakMeter
from fewshot_sla.episodes import EpisodeBatch, EpisodeSampler
from fewshot_sla.episodes.image_batches import ImageBatchSampler
from fewshot_sla.errors import UserError, setting
from fewshot_sla.learners.base import Learner
from fewshot_sla.objectives import Objective
from fewshot_sla.prediction_kinds import headline_kind
from fewshot_sla.results import RunPaths, TrainSummary


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params``."""
    lr = required(cfg.lr, "lr")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=cfg.momentum or 0.0,
            nesterov=bool(cfg.nesterov),
            weight_decay=cfg.weight_decay or 0.0,
        )
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay or 0.0)


def lr_factor(cfg: RunConfig, step: int, total_steps: int) -> float:
    """The LR multiplier at ``step`` (0-based): the factor of the last milestone reached. Milestones are fractions
    of ``lr_schedule_episodes`` (in steps of ``meta_batch`` episodes), else of the run's ``total_steps``."""
    span = total_steps
    if cfg.lr_schedule_episodes is not None:
        span = math.ceil(cfg.lr_schedule_episodes / required(cfg.meta_batch, "meta_batch"))
    factor = 1.0
    for milestone, value in zip(cfg.lr_milestones or [], cfg.lr_factors or []):
        if step >= milestone * span:
            factor = value
    return factor


def accumulate_gradients(
    learner: Learner,
    objective: Objective,
    episodes: EpisodeBatch,
    micro_batch: int,
    meta_batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Backpropagate ``objective.loss`` over ``episodes`` in micro-batches of ``micro_batch`` episodes, each loss
    weighted by its share of the ``meta_batch`` episodes, adding to the parameters' gradients: the gradient of the
    meta-batch's mean loss when ``episodes`` is all of it (or this process's part of it). Returns the metrics,
    weighted the same way (``loss`` as trained on)."""
    totals: dict[str, float] = {}
    for first in range(0, episodes.batch_size, micro_batch):
        part = episodes.select(slice(first, first + micro_batch))
        with autocast():
            loss, metrics = objective.loss(learner, part)
        weight = part.batch_size / meta_batch  # the meta-batch loss is the mean over its episodes
        torch.autograd.backward(loss * weight)
        for key, value in {**metrics, "loss": float(loss.detach())}.items():
            totals[key] = totals.get(key, 0.0) + weight * float(value)
    return totals


def total_steps(cfg: RunConfig) -> int:
    """Optimizer steps of the whole run (each takes ``meta_batch`` episodes)."""
    return math.ceil(required(cfg.train_episodes, "train_episodes") / required(cfg.meta_batch, "meta_batch"))


@dataclass
class TrainState:
    """What changes as training advances, besides model, optimizer and RNG states."""

    step: int = 0
    best_accuracy: float = -math.inf
    best_step: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    time_s: float = 0.0  # wall time of training, validation included
    step_time_s: float = 0.0  # time spent in training steps only


@dataclass
class TrainOutcome:
    """How training ended (``finished``, ``max-steps`` or ``interrupted``), the results block it produced, and
    the peak memory measured while it trained (see ``memory.PeakMeter``)."""

    status: str
    step: int
    summary: TrainSummary | None
    peak_bytes: int | None = None
    baseline_bytes: int | None = None


class Trainer:
    """Meta-trains one run in its run directory (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        learner: Learner,
        objective: Objective,
        train_split: Split,
        val_split: Split,
        pipeline: ImagePipeline,
        device: torch.device,
        progress: bool = True,
        processes: Processes = SINGLE,
    ) -> None:
        self.cfg = cfg
        self.processes = processes
        self.meta_batch = required(cfg.meta_batch, "meta_batch")
        self.share = processes.share(self.meta_batch)  # this process's episodes of each meta-batch
        per_process = self.share.stop - self.share.start
        self.micro_batch = min(cfg.micro_batch or per_process, per_process)
        self.val_every = required(cfg.val_every, "val_every")
        self.paths = RunPaths(run_dir)
        self.learner, self.objective = learner, objective
        self.val_split = val_split
        self.pipeline = pipeline
        self.device = device
        self.progress = progress and processes.writer
        train_spec, _ = episode_specs(cfg)
        self.train_spec = train_spec
        self.val_spec = validation_spec(cfg)
        self.sampler = training_sampler(cfg, train_split, train_spec, derived_seed(cfg.seed, "train-episodes"))
        self.augment_generator = torch.Generator(device=train_split.images.device)
        self.augment_generator.manual_seed(derived_seed(cfg.seed, "augment"))
        self.val_set = validation_episode_set(cfg.dataset, val_split, self.val_spec, cfg.val_episodes)
        self.total_steps = total_steps(cfg)
        params = [p for p in list(learner.parameters()) + list(objective.parameters()) if p.requires_grad]
        self.params = params
        self.optimizer = make_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.total_steps)
        )
        self.state = TrainState()
        self.stop_requested = False  # Ctrl-C
        # A callback ended training early (early stopping): the run stops before its next step and is tested as a
        # finished one. Every process must decide alike (from what they share, e.g. validation accuracies).
        self.finish_requested = False
        self.preempted_by: int | None = None  # the preemption signal every process stops for
        self.pending_validation = False  # the validation of the current step is yet to be done
        self.callbacks: list[Callback] = []  # the loop's, while it runs (``run``)
        self._start = time.perf_counter()  # when training began, less the time of earlier sessions
        self.saved_step: int | None = None  # the step of checkpoints/last.pt, once there is one
        self.saved_at = time.monotonic()  # when checkpoints/last.pt was last written (or training began)

    # ----- state -----
    def _generators(self) -> dict[str, torch.Generator]:
        if isinstance(self.sampler, EpisodeSampler):
            return {"sampler": self.sampler.positions.generator, "augment": self.augment_generator}
        return {"augment": self.augment_generator}  # the image batches' state is their position (``_checkpoint``)

    def _checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "best_accuracy": s.best_accuracy,
            "best_step": s.best_step,
            "best_val": s.best_val,
            "time_s": s.time_s,
            "step_time_s": s.step_time_s,
            "model": self.learner.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self._generators()),
            **({"image_batches": self.sampler.state_dict()} if isinstance(self.sampler, ImageBatchSampler) else {}),
            "config": self.cfg.to_dict(),
            "validated": not self.pending_validation,  # False: saved as the validation of this step began
        }

    def _restore(self) -> None:
        ckpt = load_checkpoint(
            self.paths.last_checkpoint,
            f"delete it to retrain from the start with {setting('resume')}, or start again with {setting('overwrite')}",
        )

        def computed(config: Any) -> dict[str, Any]:
            """What determines the run's numbers (keys newer than the checkpoint count as their defaults)."""
            full = {**RunConfig().to_dict(), **dict(config or {})}
            return {k: v for k, v in full.items() if k not in RESUME_FREE_KEYS}

        if computed(ckpt.get("config")) != computed(self.cfg.to_dict()):
            raise UserError(
                f"{self.paths.last_checkpoint} belongs to another configuration than "
                f"{self.paths.config}; start again with {setting('overwrite')}"
            )
        self.learner.load_state_dict(ckpt["model"])
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng_state(ckpt["rng"], self._generators())
        if isinstance(self.sampler, ImageBatchSampler):
            self.sampler.load_state_dict(ckpt["image_batches"])
        self.saved_step = int(ckpt["step"])
        self.pending_validation = not ckpt.get("validated", True)
        self.state = TrainState(
            ckpt["step"],
            ckpt["best_accuracy"],
            ckpt["best_step"],
            dict(ckpt["best_val"]),
            ckpt["time_s"],
            ckpt["step_time_s"],
        )

    def _loggers(self) -> contextlib.AbstractContextManager[list[RunLogger]]:
        """The run's loggers from the current step on (process 0; the others log nothing). ``metrics.jsonl``
        drops the lines of steps after the restored checkpoint (they will be recomputed)."""
        if not self.processes.writer:
            return contextlib.nullcontext([])
        return open_loggers(self.paths.root, self.cfg, self.state.step, replay_validation=self.pending_validation)

    # ----- control -----
    @contextlib.contextmanager
    def _graceful_interrupt(self) -> Iterator[None]:
        """The first Ctrl-C asks to stop after the current step (and save); a second one interrupts at once.
        Preemption signals (SIGTERM, SIGUSR1, SIGUSR2: ``preemption.py``) stop after the current step too, save,
        and raise ``Preempted``; during a validation they raise at once (its checkpoint is already saved)."""
        with contextlib.ExitStack() as stack:
            if threading.current_thread() is threading.main_thread():
                previous = signal.getsignal(signal.SIGINT)

                def handler(signum: int, frame: Any) -> None:
                    self.stop_requested = True
                    signal.signal(signal.SIGINT, previous)

                signal.signal(signal.SIGINT, handler)
                stack.callback(signal.signal, signal.SIGINT, previous)
            stack.enter_context(preemption.preemption_signals())
            stack.enter_context(preemption.deferred())
            yield

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision (bfloat16) when the run asks for it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp)

    def validate(self) -> tuple[dict[str, float], dict[str, float | None]]:
        """Accuracies (percent) on the fixed validation episodes and their 95% CI half-widths, without touching
        any training RNG."""
        generators = self._generators()
        saved = rng_state(generators)
        outcome = evaluate(
            self.learner,
            self.objective,
            self.val_set,
            self.val_split,
            self.cfg.dataset,
            self.pipeline,
            batch_size=self.cfg.eval_batch,
            use_cache=self.cfg.feature_cache,
            autocast=self.autocast,
            processes=self.processes,
        )
        restore_rng_state(saved, generators)
        accuracy = {kind: 100.0 * float(acc.mean()) for kind, acc in outcome.accuracies.items()}
        return accuracy, validation_ci95(outcome.accuracies)

    # ----- loop -----
    def run(
        self,
        resume: bool = False,
        max_steps: int | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> TrainOutcome:
        """Train until the budget is spent, ``max_steps`` is reached, Ctrl-C or a preemption signal; save the state
        at every stop (a preemption then raises ``Preempted``). ``callbacks`` run after the loggers and before the
        validation and checkpoint callbacks (``callbacks.py``)."""
        if resume and self.paths.last_checkpoint.is_file():
            self._restore()
        else:
            # Training-time randomness that draws from torch's global generator (dropout, DropBlock) starts
            # from the run's seed; checkpoints carry its state on.
            torch.manual_seed(derived_seed(self.cfg.seed, "training"))
        state = self.state
        b = self.meta_batch
        status = "finished"
        self._start = time.perf_counter() - state.time_s
        meter = PeakMeter(self.device)
        meter.start()
        summary = None
        with self._graceful_interrupt(), self._loggers() as loggers:
            self.callbacks = [
                DivergenceGuard(),
                SolverWarnings(),
                ProgressBar(self.progress),
                *(LoggerCallback(logger) for logger in loggers),
                *callbacks,
                PeriodicValidation(),
                ClockCheckpoint(self.cfg.checkpoint_every),
            ]
            for callback in self.callbacks:
                callback.on_train_start(self)
            while state.step < self.total_steps and not self.finish_requested:
                if self.stopping():
                    status = "interrupted"
                    break
                if max_steps is not None and state.step >= max_steps:
                    status = "max-steps"
                    break
                metrics = self.step()
                record = {"kind": "train", "step": state.step, "episodes": state.step * b, **metrics}
                for callback in self.callbacks:
                    callback.on_step_end(self, record)
            state.time_s = time.perf_counter() - self._start
            if self.stopping():  # Ctrl-C or a preemption during the last step: stop before the evaluation
                status = "interrupted"
            for callback in self.callbacks:
                callback.on_train_end(self, status)
            if status == "finished":
                summary = self.summary()
            peak = meter.peak()
            if status != "finished":
                self.save_last()
                self.processes.barrier()
                if self.preempted_by is not None:
                    preemption.clear()  # acted on: saved
                    raise preemption.Preempted(
                        self.preempted_by,
                        f"stopped by {signal.Signals(self.preempted_by).name} at step {state.step}, the state saved",
                    )
                return TrainOutcome(status, state.step, None, peak, meter.baseline)
            if self.processes.writer:
                plot_learning_curve(self.paths.metrics, self.paths.curve)
            self.processes.barrier()  # the best checkpoint is on disk before any process reads it
        return TrainOutcome(status, state.step, summary, peak, meter.baseline)

    def emit_validation(self, record: dict[str, Any]) -> None:
        """Hand a validation record to every callback."""
        for callback in self.callbacks:
            callback.on_validation(self, record)

    def stopping(self) -> bool:
        """Whether the run stops at this step: a Ctrl-C or a preemption signal that every process has seen (their
        flags are summed in each step), or, in a single process, as soon as it arrives."""
        if not self.processes.active and preemption.requested() is not None:
            self.preempted_by = preemption.requested()
        return self.stop_requested or self.preempted_by is not None

    def save_last(self) -> None:
        """Write the training state to ``last.pt`` (process 0), its time counted up to now."""
        self.state.time_s = time.perf_counter() - self._start
        self._save(self.paths.last_checkpoint, self._checkpoint())

    def save_best(self, accuracy: dict[str, float]) -> None:
        """Write the model as ``best.pt`` (process 0), with its validation ``accuracy``."""
        self._save(
            self.paths.best_checkpoint,
            {
                "model": self.learner.state_dict(),
                "objective": self.objective.state_dict(),
                "step": self.state.step,
                "val_accuracy": accuracy,
            },
        )

    def _save(self, path: Path, state: dict[str, Any]) -> None:
        """Write a checkpoint (process 0 only)."""
        if self.processes.writer:
            save_checkpoint(path, state)
        if path == self.paths.last_checkpoint:
            self.saved_step, self.saved_at = int(state["step"]), time.monotonic()

    def step(self) -> dict[str, float]:
        """One optimizer step on a meta-batch; returns the objective's metrics (over the whole meta-batch, every
        process included) and the learning rate used.

        A non-finite loss stops the run with a UserError (the last checkpoint is kept).
        """
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.learner.train()
        self.objective.train()
        batch = self.sampler.sample(self.meta_batch)
        episodes = self.pipeline.episode(batch, self.augment_generator)  # used where the run augments
        mine = episodes.select(self.share)
        self.optimizer.zero_grad(set_to_none=True)
        totals = accumulate_gradients(
            self.learner, self.objective, mine, self.micro_batch, self.meta_batch, self.autocast
        )
        share = mine.batch_size / self.meta_batch  # this process's part of the meta-batch
        totals.update({key: share * value for key, value in self.learner.pop_diagnostics().items()})
        flags = [float(self.stop_requested), float(preemption.requested() is not None)]
        summed = torch.tensor([*totals.values(), *flags], dtype=torch.float64, device=self.device)
        values = self.processes.sum_(summed).tolist()
        totals = dict(zip(totals, values))
        # Any process's Ctrl-C or preemption signal stops them all after this step.
        self.stop_requested = self.stop_requested or values[-2] > 0
        if values[-1] > 0 and self.preempted_by is None:
            self.preempted_by = preemption.requested() or signal.SIGTERM
        for callback in self.callbacks:
            callback.on_gradients(self, totals)
        self.processes.sum_gradients(self.params)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.step_time_s += time.perf_counter() - t0
        return {"lr": lr, **totals}

    def diverged(self, loss: float) -> UserError:
        """The error of a non-finite loss, naming the last good checkpoint if one was saved."""
        if self.saved_step is not None:
            kept = f"the last good checkpoint, {self.paths.last_checkpoint} (step {self.saved_step}), is kept"
            restart = f"start again with {setting('overwrite')}"
        else:
            kept = "no checkpoint had been saved yet"
            restart = "run again"
        amp = f" or turn off {setting('amp')}" if self.cfg.amp else ""
        return UserError(
            f"training diverged: the loss is {loss} at step {self.state.step + 1}; {kept}; lower {setting('lr')} (now "
            f"{self.cfg.lr}){amp}, then {restart}"
        )

    def summary(self) -> TrainSummary:
        """The ``train`` block of results.json."""
        s, cfg = self.state, self.cfg
        episodes = s.step * self.meta_batch
        pretraining = isinstance(self.sampler, ImageBatchSampler)  # an "episode" is one image of the C classes
        return TrainSummary(
            ways=self.train_spec.ways,
            shots=0 if pretraining else self.train_spec.shots,
            queries=1 if pretraining else self.train_spec.queries,
            episodes=episodes,
            meta_batch=self.meta_batch,
            steps=s.step,
            time_s=s.time_s,
            episodes_per_s=episodes / s.step_time_s if s.step_time_s > 0 else None,
            best_step=s.best_step,
            best_episodes=s.best_step * self.meta_batch,
            best_val_accuracy=s.best_accuracy,
            val_key=headline_kind(list(s.best_val)) if s.best_val else None,
            val_episodes=cfg.val_episodes,
            val_ways=self.val_spec.ways,
            val_shots=self.val_spec.shots,
            val_queries=self.val_spec.queries,
        )
