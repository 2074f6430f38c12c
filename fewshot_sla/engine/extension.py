"""Training a finished run for longer, into a new run folder (``run --extend SOURCE --train-episodes E --out NEW``).

The new run starts from the source's final training state (``last.pt``: weights, optimizer, schedule, random
generators, best validation so far) and its metrics, with the source's configuration but for ``train_episodes``;
the source stays as it was, so both budgets stay in a leaderboard. It ends exactly where a run trained for ``E``
episodes at once would (the same steps, validations and checkpoint choice, bit for bit on the CPU), which holds
when nothing before the source's end depended on its budget; so the source must have

- finished its whole budget (not stopped early by a callback), its last step validated;
- a learning-rate schedule that does not scale with the budget: no milestones, or milestones that are fractions of
  a fixed ``lr_schedule_episodes`` (as the published recipes set it);
- ended on a validation point of the longer run (its episodes a multiple of ``val_every``): a longer run would not
  validate where the shorter one validated last, and its best checkpoint could differ.

Anything else is refused with what to do instead. ``extended_config`` checks (``plan.plan_run``, nothing written);
``start_extension`` writes the new folder (``execute``), which is then resumed like an interrupted run.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewshot_sla.atomic import atomic_path, write_text_atomic
from fewshot_sla.config import RESUME_FREE_KEYS, RunConfig, load_config, required
from fewshot_sla.engine.checkpoint import load_checkpoint, save_checkpoint
from fewshot_sla.engine.train import total_steps
from fewshot_sla.errors import UserError, command, setting
from fewshot_sla.finished_run import FinishedRun
from fewshot_sla.io_errors import read_text, write_error
from fewshot_sla.results import INCOMPLETE_RUN, ExtensionRecord, RunPaths, is_finished

SOURCE_FILES = ("metrics", "best_checkpoint")  # copied as they are (the backbone's origin: ``plan`` reads it)


def extended_config(source: Path, overrides: Mapping[str, Any]) -> RunConfig:
    """The configuration of ``source`` trained to the ``train_episodes`` in ``overrides`` (with the flags a resumed
    run may change), after checking that the longer run equals one trained for that budget at once."""
    paths = RunPaths(source)
    if not (is_finished(source) and paths.last_checkpoint.is_file() and paths.config.is_file()):
        raise UserError(
            f"{setting('extend')} trains a finished run for longer, and {source} is not one (it needs results.json, "
            f"config.yaml and checkpoints/last.pt); finish it first with '{command('run', resume=True, out=source)}'"
        )
    stored = load_config(paths.config, INCOMPLETE_RUN)
    old, new = required(stored.train_episodes, "train_episodes"), overrides.get("train_episodes")
    if new is None or new <= old:
        raise UserError(
            f"{setting('extend')} needs {setting('train_episodes')} above the {old} episodes {source} trained"
            + ("" if new is None else f", got {new}")
        )
    fixed = {k: v for k, v in overrides.items() if k != "train_episodes" and k not in RESUME_FREE_KEYS}
    changed = [k for k, v in fixed.items() if getattr(stored, k) != v]
    if changed:
        raise UserError(
            f"{setting('extend')} keeps the configuration of {source}, which differs in {', '.join(changed)}; drop "
            f"those flags, or start a new run"
        )
    if stored.lr_milestones and stored.lr_schedule_episodes is None:
        raise UserError(
            f"the learning-rate milestones of {source} are fractions of its own {old} episodes, so a longer run "
            f"would follow another schedule; start a new run with {setting('train_episodes')} {new}"
        )
    cfg = stored.updated({k: v for k, v in overrides.items() if k in RESUME_FREE_KEYS}, "command line")
    cfg = cfg.updated({"train_episodes": new}, "command line")
    meta_batch, every = required(cfg.meta_batch, "meta_batch"), required(cfg.val_every, "val_every")
    end = total_steps(stored) * meta_batch
    if end // every == (end - meta_batch) // every:
        raise UserError(
            f"{source} ended at {end} episodes, between two validations (every {every}) of a longer run, which "
            f"would not validate there and could keep another checkpoint; start a new run with "
            f"{setting('train_episodes')} {new}"
        )
    state = load_checkpoint(paths.last_checkpoint, f"train the longer run from the start with {setting('out')}")
    if state.get("step") != total_steps(stored) or not state.get("validated", True):
        raise UserError(
            f"{source} stopped at step {state.get('step')} of {total_steps(stored)} (early, or before its last "
            f"validation), so a longer run from it would differ from one trained at once; start a new run"
        )
    return cfg


def check_same_store(source: Path, fingerprint: str) -> None:
    """The longer run must read the store ``source`` trained on (its ``dataset_fingerprint``)."""
    trained_on = FinishedRun.open(source).results.dataset_fingerprint
    if trained_on != fingerprint:
        raise UserError(
            f"{source} trained on another store of its dataset (fingerprint {trained_on[:8]}, this data root's "
            f"is {fingerprint[:8]}); pass the {setting('data_root')} it trained with"
        )


def start_extension(source: Path, run_dir: Path, cfg: RunConfig) -> None:
    """Write ``run_dir`` (whose configuration ``cfg`` is written) as a run of ``cfg`` saved at the end of ``source``:
    the source's best checkpoint and metrics, the record of where it came from (``recorded_extension``), and the
    source's final training state re-labelled with ``cfg``."""
    src, dst = RunPaths(source), RunPaths(run_dir)
    state = load_checkpoint(src.last_checkpoint, f"train the longer run from the start with {setting('out')}")
    try:
        dst.last_checkpoint.parent.mkdir(parents=True, exist_ok=True)
        for name in SOURCE_FILES:
            path = getattr(src, name)
            if path.is_file():
                with atomic_path(getattr(dst, name)) as tmp:
                    shutil.copyfile(path, tmp)
    except OSError as err:
        raise write_error(err, err.filename or run_dir, "the source run's files") from None
    episodes = int(state["step"]) * required(cfg.meta_batch, "meta_batch")
    digest = hashlib.sha256(src.last_checkpoint.read_bytes()).hexdigest()
    record = ExtensionRecord(run_dir=str(source.resolve()), episodes=episodes, sha256=digest)
    write_text_atomic(dst.extension_source, record.model_dump_json(indent=2) + "\n")
    save_checkpoint(dst.last_checkpoint, {**state, "config": cfg.to_dict()})  # last: the folder is now resumable


def recorded_extension(run_dir: Path) -> ExtensionRecord | None:
    """The finished run that ``run_dir`` continued, as ``start_extension`` recorded it; None for a run trained
    from step 0."""
    file = RunPaths(run_dir).extension_source
    if not file.is_file():
        return None
    try:
        return ExtensionRecord.model_validate_json(read_text(file, "the extension record", INCOMPLETE_RUN))
    except ValueError:
        raise UserError(f"{file} is damaged; {INCOMPLETE_RUN}") from None
