"""The Python API: prepare data, train, resume and evaluate runs without the command line.

    from fewshot_sla import api
    from fewshot_sla.config import RunConfig

    run = api.train(RunConfig(method="protonet", dataset="synthetic", train_episodes=200), out="runs/pn")
    print(run.evaluation.accuracy["ag"].mean)           # a FinishedRun: results.json, typed
    api.evaluate(run.path, eval_episodes=10000)         # another fixed episode set, added to the run's results

Every function takes keyword arguments and returns a typed value; a mistake is a ``UserError`` (``errors.py``) and
a preemption signal a ``Preempted`` (``preemption.py``), both with a one-line message naming configuration fields
and API calls (``train_ways``, ``fewshot_sla.api.resume('DIR')``), not the CLI's flags; notes and warnings go to the
``fewshot_sla`` logger (``logging``). Training here is what ``fewshot-sla run`` does (one process; ``torchrun``
launches the CLI for several), with the same run folder, lock, resume and results. Heavy modules are imported when a
function is called, so ``import fewshot_sla.api`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot_sla.errors import UserError

if TYPE_CHECKING:
    from fewshot_sla.config import RunConfig
    from fewshot_sla.data.prepare import PrepareResult
    from fewshot_sla.engine.callbacks import Callback
    from fewshot_sla.engine.plan import RunPlan
    from fewshot_sla.finished_run import FinishedRun

PathLike = str | os.PathLike[str]


def prepare_dataset(
    dataset: str,
    *,
    source: PathLike | None = None,
    data_root: PathLike | None = None,
    image_size: int | None = None,
    skip_bad: bool = False,
    force: bool = False,
    resize_filter: str = "lanczos",
) -> PrepareResult:
    """Build the store of a registered dataset (``fewshot-sla list datasets``) from its raw download ``source``
    (a generated one, such as ``synthetic``, needs none) in ``data_root`` (default: ``$FEWSHOT_SLA_DATA`` or the
    default data root), its images resized with Pillow's ``resize_filter`` (lanczos, bicubic, bilinear or
    nearest), as ``fewshot-sla data prepare DATASET`` does."""
    from fewshot_sla.data.prepare import prepare
    from fewshot_sla.registry import DATASETS

    if dataset not in DATASETS:
        raise UserError(
            f"'{dataset}' is not a registered dataset; use prepare_image_folder for a folder of your own images"
        )
    return prepare(
        dataset,
        source,
        data_root,
        image_size=image_size,
        skip_bad=skip_bad,
        force=force,
        progress=False,
        resize_filter=resize_filter,
    )


def prepare_image_folder(
    name: str,
    *,
    source: PathLike,
    data_root: PathLike | None = None,
    image_size: int | None = None,
    split_fractions: tuple[float, float, float] | None = None,
    split_seed: int | None = None,
    split_file: PathLike | None = None,
    skip_bad: bool = False,
    force: bool = False,
) -> PrepareResult:
    """Build a store named ``name`` from a folder of the user's own images, ``source/<class>/<image>``: classes split
    into train/val/test by ``split_file`` or by ``split_fractions`` (default 0.64/0.16/0.20, ``split_seed`` 0),
    images resized to ``image_size`` (default 84); as ``fewshot-sla data prepare NAME --layout imagefolder`` does."""
    from fewshot_sla.data.prepare import prepare
    from fewshot_sla.registry import DATASETS

    if name in DATASETS:
        raise UserError(f"'{name}' is a registered dataset; use prepare_dataset, or another name for your images")
    return prepare(
        name,
        source,
        data_root,
        image_size=image_size,
        skip_bad=skip_bad,
        force=force,
        progress=False,
        layout="imagefolder",
        split_file=split_file,
        split_fractions=split_fractions,
        split_seed=split_seed,
    )


def prepare_torch_dataset(
    name: str,
    dataset: Any,
    *,
    data_root: PathLike | None = None,
    image_size: int | None = None,
    split_fractions: tuple[float, float, float] | None = None,
    split_seed: int | None = None,
    split_file: PathLike | None = None,
    skip_bad: bool = False,
) -> PrepareResult:
    """Build a store named ``name`` from a map-style torch ``Dataset`` of ``(image, label)`` items (PIL images,
    uint8 arrays or ``[C, H, W]`` tensors; classes named by ``dataset.classes`` when it has them): classes split
    into train/val/test by ``split_file`` or by ``split_fractions`` (default 0.64/0.16/0.20, ``split_seed`` 0),
    images resized to ``image_size`` (default 84); as ``fewshot-sla data prepare NAME --layout torch --source
    MODULE:FACTORY`` does. The dataset is read anew on every call (its content cannot be checked otherwise)."""
    from fewshot_sla.data.prepare import prepare
    from fewshot_sla.registry import DATASETS

    if name in DATASETS:
        raise UserError(f"'{name}' is a registered dataset; use prepare_dataset, or another name for your images")
    return prepare(
        name,
        None,
        data_root,
        image_size=image_size,
        skip_bad=skip_bad,
        progress=False,
        layout="torch",
        split_file=split_file,
        split_fractions=split_fractions,
        split_seed=split_seed,
        torch_object=dataset,
    )


def train(
    config: RunConfig,
    *,
    out: PathLike | None = None,
    data_root: PathLike | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> FinishedRun:
    """Train the run ``config`` describes (fields left unset take the method's recipe) into ``out`` (default:
    ``runs/<dataset>-<method>-...``), test it on its fixed episode set, and return it. ``callbacks``
    (``engine/callbacks.py``) join the training loop's; one that stops the run early raises ``UserError`` saying so,
    the folder left for ``resume``."""
    from fewshot_sla.engine.plan import plan_run, run_directory

    return _execute(
        run_directory(config, out),
        lambda: plan_run(config, overrides={}, out=out, data_root=data_root, overwrite=overwrite),
        callbacks,
        progress,
    )


def resume(
    run_dir: PathLike,
    *,
    data_root: PathLike | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> FinishedRun:
    """Continue the unfinished run in ``run_dir`` from its last checkpoint with its stored configuration (a
    resumed run ends bit-identical to an uninterrupted one on the CPU), test it, and return it."""
    from fewshot_sla.config import RunConfig
    from fewshot_sla.engine.plan import plan_run

    path = Path(run_dir)
    return _execute(
        path,
        lambda: plan_run(RunConfig(), overrides={}, out=path, data_root=data_root, resume=True),
        callbacks,
        progress,
    )


def extend(
    source: PathLike,
    *,
    train_episodes: int,
    out: PathLike,
    data_root: PathLike | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> FinishedRun:
    """Train the finished run ``source`` for longer, to ``train_episodes``, into the new folder ``out`` (``source``
    is kept): it ends as a run trained for that budget at once would (``engine/extension.py`` says when that holds,
    and anything else is refused), test it, and return it."""
    from fewshot_sla.config import RunConfig
    from fewshot_sla.engine.plan import plan_run

    overrides = {"train_episodes": train_episodes}
    return _execute(
        Path(out),
        lambda: plan_run(RunConfig(), overrides=overrides, out=out, data_root=data_root, extend_from=source),
        callbacks,
        progress,
    )


def _execute(run_dir: Path, plan: Callable[[], RunPlan], callbacks: Sequence[Callback], progress: bool) -> FinishedRun:
    """Plan and execute a run under its folder's lock; the finished run, read back."""
    from fewshot_sla.engine.execute import execute_run
    from fewshot_sla.engine.plan import run_folder_lock
    from fewshot_sla.finished_run import FinishedRun

    with run_folder_lock(run_dir):
        report = execute_run(plan(), progress=progress, callbacks=callbacks)
    if report.status != "finished":
        raise UserError(
            f"the run in {report.run_dir} stopped at step {report.step} ({report.status}); continue it with "
            f"fewshot_sla.api.resume('{report.run_dir}')"
        )
    return FinishedRun.open(report.run_dir)


def evaluate(
    run_dir: PathLike,
    *,
    episodes_file: PathLike | None = None,
    eval_episodes: int | None = None,
    dataset: str | None = None,
    data_root: PathLike | None = None,
    out: PathLike | None = None,
    eval_head: str | None = None,
    progress: bool = False,
) -> FinishedRun:
    """Test a finished run's best checkpoint on another fixed episode set (a file, or the seed-0 set of
    ``eval_episodes`` episodes; ``dataset``: another prepared dataset's, cross-domain), add the evaluation to its
    results (or, with ``out``, to a copy of them there, leaving the run untouched) and return the run as read back
    from where it was written; as ``fewshot-sla eval`` does. ``eval_head``: a pretraining run's embedding tested
    with another head (nearest-centroid, logistic-regression, protonet), written to ``out`` only."""
    from fewshot_sla.engine.plan import run_folder_lock
    from fewshot_sla.engine.run_evaluation import evaluate_run
    from fewshot_sla.finished_run import FinishedRun

    target = Path(out) if out is not None else Path(run_dir)
    if out is not None:
        target.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(target):
        evaluate_run(
            run_dir,
            data_root=data_root,
            episodes_file=None if episodes_file is None else str(episodes_file),
            eval_episodes=eval_episodes,
            dataset=dataset,
            progress=progress,
            out_dir=out,
            eval_head=eval_head,
        )
    return FinishedRun.open(target)
