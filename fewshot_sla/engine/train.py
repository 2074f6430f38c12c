"""The meta-training loop: meta-batches of episodes, periodic validation, checkpoints, resume, Ctrl-C.

A step draws B episodes from the training split, augments and normalises them on the device, and sends
them through ``objective.loss`` in one call (one backbone pass for the whole meta-batch). Every
``val_every`` episodes the model is validated on a fixed validation episode set; the best model is kept in
``checkpoints/best.pt`` and the full training state (model, optimizer, scheduler, every RNG, step) in
``checkpoints/last.pt``. Resuming from ``last.pt`` replays the same random streams, so an interrupted run
ends with exactly the numbers of an uninterrupted one (on the CPU). Random streams: the episode sampler and the
augmentation have generators of their own; dropout and DropBlock draw from torch's global generator, which a
fresh run seeds from the run's seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fewshot_sla.atomic import write_text_atomic
from fewshot_sla.config import RunConfig, required
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import ImagePipeline, derived_seed, episode_specs
from fewshot_sla.engine.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from fewshot_sla.engine.curves import plot_learning_curve
from fewshot_sla.engine.evaluate import evaluate, validation_episode_set
from fewshot_sla.episodes import EpisodeSampler
from fewshot_sla.errors import UserError
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
    """The LR multiplier at ``step`` (0-based): the factor of the last milestone (a fraction of the budget) reached."""
    factor = 1.0
    for milestone, value in zip(cfg.lr_milestones or [], cfg.lr_factors or []):
        if step >= milestone * total_steps:
            factor = value
    return factor


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
    """How training ended (``finished``, ``max-steps`` or ``interrupted``) and the results block it produced."""

    status: str
    step: int
    summary: TrainSummary | None


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
    ) -> None:
        self.cfg = cfg
        self.meta_batch = required(cfg.meta_batch, "meta_batch")
        self.val_every = required(cfg.val_every, "val_every")
        self.paths = RunPaths(run_dir)
        self.learner, self.objective = learner, objective
        self.val_split = val_split
        self.pipeline = pipeline
        self.device = device
        self.progress = progress
        train_spec, test_spec = episode_specs(cfg)
        self.train_spec = train_spec
        self.sampler = EpisodeSampler(train_split, train_spec, seed=derived_seed(cfg.seed, "train-episodes"))
        self.augment_generator = torch.Generator(device=train_split.images.device)
        self.augment_generator.manual_seed(derived_seed(cfg.seed, "augment"))
        self.val_set = validation_episode_set(cfg.dataset, val_split, test_spec, cfg.val_episodes)
        self.total_steps = total_steps(cfg)
        params = [p for p in list(learner.parameters()) + list(objective.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.total_steps)
        )
        self.state = TrainState()
        self.stop_requested = False

    # ----- state -----
    def _generators(self) -> dict[str, torch.Generator]:
        return {"sampler": self.sampler.positions.generator, "augment": self.augment_generator}

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
            "config": self.cfg.to_dict(),
        }

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.paths.last_checkpoint)
        if ckpt.get("config") != self.cfg.to_dict():
            raise UserError(
                f"{self.paths.last_checkpoint} belongs to another configuration than "
                f"{self.paths.config}; start again with --overwrite"
            )
        self.learner.load_state_dict(ckpt["model"])
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng_state(ckpt["rng"], self._generators())
        self.state = TrainState(
            ckpt["step"],
            ckpt["best_accuracy"],
            ckpt["best_step"],
            dict(ckpt["best_val"]),
            ckpt["time_s"],
            ckpt["step_time_s"],
        )

    def _truncate_metrics(self) -> None:
        """Drop metrics lines of steps after the restored checkpoint (they will be recomputed)."""
        if not self.paths.metrics.is_file():
            return
        kept = []
        for line in self.paths.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if record.get("step", math.inf) <= self.state.step:
                kept.append(json.dumps(record) + "\n")
        write_text_atomic(self.paths.metrics, "".join(kept))

    # ----- control -----
    @contextlib.contextmanager
    def _graceful_interrupt(self) -> Iterator[None]:
        """The first Ctrl-C asks to stop after the current step (and save); a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            self.stop_requested = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision (bfloat16) when the run asks for it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp)

    def validate(self) -> dict[str, float]:
        """Accuracies (percent) on the fixed validation episodes, without touching any training RNG."""
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
        )
        restore_rng_state(saved, generators)
        return {kind: 100.0 * float(acc.mean()) for kind, acc in outcome.accuracies.items()}

    # ----- loop -----
    def run(
        self, resume: bool = False, max_steps: int | None = None, step_hook: Callable[[int], None] | None = None
    ) -> TrainOutcome:
        """Train until the budget is spent, ``max_steps`` is reached, or Ctrl-C; save state at every stop."""
        if resume and self.paths.last_checkpoint.is_file():
            self._restore()
        else:
            # Training-time randomness that draws from torch's global generator (dropout, DropBlock) starts
            # from the run's seed; checkpoints carry its state on.
            torch.manual_seed(derived_seed(self.cfg.seed, "training"))
        self._truncate_metrics()
        state = self.state
        b = self.meta_batch
        status = "finished"
        start = time.perf_counter() - state.time_s
        with self._graceful_interrupt(), open(self.paths.metrics, "a") as log:
            bar = tqdm(
                total=self.total_steps,
                initial=state.step,
                desc="train",
                unit="step",
                disable=not self.progress,
                dynamic_ncols=True,
            )
            while state.step < self.total_steps:
                if self.stop_requested or (max_steps is not None and state.step >= max_steps):
                    status = "interrupted" if self.stop_requested else "max-steps"
                    break
                metrics = self.step(step_hook)
                record = {"kind": "train", "step": state.step, "episodes": state.step * b, **metrics}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "acc")}, refresh=False)
                done = state.step * b
                if done // self.val_every > (done - b) // self.val_every or state.step == self.total_steps:
                    self._validate_and_save(log, bar, start)
            bar.close()
        state.time_s = time.perf_counter() - start
        if self.stop_requested:  # Ctrl-C during the last step: stop before the evaluation
            status = "interrupted"
        if status != "finished":
            save_checkpoint(self.paths.last_checkpoint, self._checkpoint())
            return TrainOutcome(status, state.step, None)
        plot_learning_curve(self.paths.metrics, self.paths.curve)
        return TrainOutcome(status, state.step, self.summary())

    def step(self, step_hook: Callable[[int], None] | None = None) -> dict[str, float]:
        """One optimizer step on a meta-batch; returns the objective's metrics and the learning rate used.

        A non-finite loss stops the run with a UserError (the last checkpoint is kept).
        """
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.learner.train()
        self.objective.train()
        batch = self.sampler.sample(self.meta_batch)
        episode = self.pipeline.episode(batch, self.augment_generator if self.cfg.augment else None)
        with self.autocast():
            loss, metrics = self.objective.loss(self.learner, episode)
        if not bool(torch.isfinite(loss.detach())):
            raise UserError(
                f"training diverged: the loss is {float(loss.detach())} at step {self.state.step + 1}; "
                f"the last good checkpoint is kept in {self.paths.last_checkpoint}; lower --lr (now "
                f"{self.cfg.lr}) or turn off --amp, then start again with --overwrite"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.step_time_s += time.perf_counter() - t0
        if step_hook is not None:
            step_hook(self.state.step)
        return {"lr": lr, **{k: float(v) for k, v in metrics.items()}}

    def _validate_and_save(self, log: Any, bar: tqdm, start: float) -> None:
        state = self.state
        accuracy = self.validate()
        key = headline_kind(list(accuracy))
        log.write(
            json.dumps(
                {
                    "kind": "val",
                    "step": state.step,
                    "episodes": state.step * self.meta_batch,
                    "accuracy": accuracy,
                    "key": key,
                }
            )
            + "\n"
        )
        log.flush()
        if self.progress:
            bar.write(f"step {state.step}: validation " + ", ".join(f"{k} {v:.2f}%" for k, v in accuracy.items()))
        if accuracy[key] > state.best_accuracy:
            state.best_accuracy, state.best_step, state.best_val = accuracy[key], state.step, accuracy
            save_checkpoint(
                self.paths.best_checkpoint,
                {
                    "model": self.learner.state_dict(),
                    "objective": self.objective.state_dict(),
                    "step": state.step,
                    "val_accuracy": accuracy,
                },
            )
        state.time_s = time.perf_counter() - start
        save_checkpoint(self.paths.last_checkpoint, self._checkpoint())

    def summary(self) -> TrainSummary:
        """The ``train`` block of results.json."""
        s, cfg = self.state, self.cfg
        episodes = s.step * self.meta_batch
        return TrainSummary(
            ways=self.train_spec.ways,
            shots=self.train_spec.shots,
            queries=self.train_spec.queries,
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
        )
