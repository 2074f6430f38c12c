"""FinishedRun.open: a run's results.json read back typed (nothing lost or changed), older files completed on read,
the one-line errors of a folder that holds no usable finished run, and the rule that no module outside the results
modules reads a results block by key."""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fewshot_sla.cli import main
from fewshot_sla.config import load_config
from fewshot_sla.errors import UserError
from fewshot_sla.finished_run import FinishedRun, typed_evaluation, typed_results
from fewshot_sla.package_data import FORMER_SHIPPED_SHOWN
from fewshot_sla.results import (
    SCHEMA_VERSION,
    AccuracySummary,
    EvaluationRecord,
    ResultsFile,
    add_evaluation,
    load_results,
)
from tests.helpers.paths import REPO

PACKAGE = REPO / "fewshot_sla"
TINY = ["--device", "cpu", "--quiet", "--train-episodes", "2", "--val-episodes", "4", "--eval-episodes", "6"]
TINY += ["--queries", "3", "--train-queries", "3", "--backbone-option", "hidden=8", "--image-size", "16"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sla"
    assert main(["--data-root", str(data_root), "run", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder outside pytest's temporary folder, for results files that break the schema on purpose (conftest
    checks every results.json below pytest's folder against it)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def _copy(run_dir: Path, to: Path, edit=None) -> Path:
    """A copy of the run, its results.json edited in place by ``edit(results)``."""
    shutil.copytree(run_dir, to)
    if edit is not None:
        file = to / "results.json"
        results = json.loads(file.read_text())
        edit(results)
        file.write_text(json.dumps(results, indent=2))
    return to


def test_a_runs_results_read_back_typed_and_unchanged(run_dir: Path) -> None:
    written = json.loads((run_dir / "results.json").read_text())
    run = FinishedRun.open(run_dir)
    assert isinstance(run.results, ResultsFile) and run.path == run_dir
    assert run.results.to_dict() == written  # the typed record holds every value of the file, unchanged
    assert run.document == written  # and the file as read, for writing an evaluation back
    ev = run.evaluation
    assert isinstance(ev, EvaluationRecord) and ev.episode_set.hash == written["evaluation"]["episode_set"]["hash"]
    assert ev.episode_set.source in ("shipped", "user", "run", "file") and run.results.status == "finished"
    assert run.evaluations == [ev] and run.evaluation_for(ev.episode_set.hash) is run.evaluations[0]
    assert run.evaluation_for("f" * 64) is None
    assert isinstance(run.accuracy("ag"), AccuracySummary)
    per = run.per_episode(ev.episode_set.hash)
    assert set(per) == set(ev.accuracy) and run.accuracy("ag").mean == pytest.approx(100 * float(np.mean(per["ag"])))
    assert run.store_fingerprint(ev) == run.results.dataset_fingerprint
    assert run.config == load_config(run_dir / "config.yaml")
    assert run.checkpoint("best").is_file() and run.checkpoint("last").is_file()
    assert run.checkpoint("best") == run.paths.best_checkpoint
    assert run.normalization.channels == 3 and list(run.normalization.mean) == written["normalization"]["mean"]
    assert run.episode_set_file(ev).is_file()
    # The same content through the untyped view, and through an evaluation added as 'eval' adds one.
    assert load_results(run_dir).data == written
    other = copy.deepcopy(written["evaluation"])
    other["episode_set"]["hash"] = "e" * 64
    added = add_evaluation(run.document, EvaluationRecord.model_validate(other))
    typed = typed_results(added)
    assert typed.evaluation == ev and typed.evaluations[-1].episode_set.hash == "e" * 64
    assert typed_evaluation(added["evaluations"][-1], typed) == typed.evaluations[-1]


def _older(results: dict) -> None:
    """What a results.json written before the later fields were recorded looks like: no image sizes,
    normalisation, recipe, memory plan, learner settings or validation spec; evaluation blocks without the store
    they read, their solver diagnostics, headline or episode-set source; a baseline's configured transformation."""
    for key in ("image_size", "store_image_size", "normalization", "recipe", "memory", "learner_settings"):
        results.pop(key)
    for key in ("val_ways", "val_shots", "val_queries"):
        results["train"].pop(key)
    for block in [results["evaluation"], *results["evaluations"]]:
        for key in ("dataset_fingerprint", "diagnostics", "headline"):
            block.pop(key)
        block["episode_set"].pop("source")
    results["evaluations"][0]["episode_set"]["file"] = f"{FORMER_SHIPPED_SHOWN}/some-set.npz"
    results["objective"], results["transform"] = "baseline", "rotation"


def test_an_older_file_is_completed_on_read_and_kept_as_it_was(run_dir: Path, scratch: Path) -> None:
    older = _copy(run_dir, scratch / "older", _older)
    written = json.loads((older / "results.json").read_text())
    run = FinishedRun.open(older)
    assert run.results.schema_version == SCHEMA_VERSION == 1
    r = run.results
    assert (r.image_size, r.store_image_size, r.normalization, r.recipe, r.memory) == (None,) * 5
    assert r.learner_settings == {} and (r.train.val_ways, r.train.val_shots, r.train.val_queries) == (None,) * 3
    assert r.transform == "none"  # the label: a baseline uses no transformation, whatever it was configured with
    assert list(run.normalization.mean) == [0.485, 0.456, 0.406]  # ImageNet's, as runs then all used
    for block in (run.evaluation, *run.evaluations):
        assert block.dataset_fingerprint == r.dataset_fingerprint and block.diagnostics == {}
        assert block.headline == "ag"  # the most preferred kind of the block's accuracies
    assert run.evaluation.episode_set.source == "file" and run.evaluations[0].episode_set.source == "shipped"
    assert run.document == written  # what an evaluation is added to: the file as it was, not completed
    # A file without the list of evaluations reads as its main evaluation alone.
    bare = _copy(run_dir, scratch / "bare", lambda results: results.pop("evaluations"))
    assert [b.episode_set.hash for b in FinishedRun.open(bare).evaluations] == [run.evaluation.episode_set.hash]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no folder", r"is not a folder; give the folder of a run made by 'fewshot_sla\.api\.train'"),
        ("empty folder", r"is not a finished run \(no results.json\); give the folder of a run made by"),
        ("no results", r"is not a finished run \(no results.json\); resume it with 'fewshot_sla\.api\.resume\(\""),
        ("cut short", r"results.json is damaged \(not valid JSON\); rebuild it from the run's checkpoints with "),
        ("not utf-8", r"results.json is damaged \(not valid JSON\)"),
        ("no version", r"results.json has no schema_version; it was not written by fewshot-sla"),
        ("newer", r"results.json has schema_version 99, newer than this fewshot-sla reads \(1\); upgrade"),
        ("never written", r"results.json has schema_version 0, which no fewshot-sla reads"),
        ("unfinished", r"results.json records no finished evaluation; rebuild it from the run's checkpoints with"),
        ("no evaluation", r"results.json records no finished evaluation"),
        ("lacks", r"results.json lacks method, config; re-run it with this fewshot-sla$"),
        ("wrong type", r"results.json does not match the results schema at evaluation/accuracy/ag/mean: 'mean': "),
        ("unknown key", r"results.json does not match the results schema at surprise: unknown key 'surprise'"),
        ("unknown source", r"at evaluations/0/episode_set/source: 'source' must be one of"),
    ],
)
def test_a_folder_without_a_usable_finished_run_is_one_line(
    run_dir: Path, scratch: Path, case: str, message: str
) -> None:
    folder = scratch / "run"
    edits = {
        "no version": lambda r: r.pop("schema_version"),
        "newer": lambda r: r.update(schema_version=99),
        "never written": lambda r: r.update(schema_version=0),
        "unfinished": lambda r: r.update(status="running"),
        "no evaluation": lambda r: r.pop("evaluation"),
        "lacks": lambda r: (r.pop("config"), r.pop("method")),
        "wrong type": lambda r: r["evaluation"]["accuracy"]["ag"].update(mean="high"),
        "unknown key": lambda r: r.update(surprise=1),
        "unknown source": lambda r: r["evaluations"][0]["episode_set"].update(source="elsewhere"),
    }
    if case == "empty folder":
        folder.mkdir()
    elif case == "no results":
        _copy(run_dir, folder).joinpath("results.json").unlink()
    elif case == "cut short":
        _copy(run_dir, folder).joinpath("results.json").write_text('{"schema_version": 1, "status": "fini')
    elif case == "not utf-8":
        _copy(run_dir, folder).joinpath("results.json").write_bytes(b"\xff\xfe{}")
    elif case in edits:
        _copy(run_dir, folder, edits[case])
    with pytest.raises(UserError, match=message) as info:
        FinishedRun.open(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    if case not in ("lacks", "wrong type", "unknown key", "unknown source", "never written"):
        # The errors of a folder that holds no finished run are load_results' own, word for word.
        with pytest.raises(UserError) as untyped:
            load_results(folder)
        assert str(untyped.value) == str(info.value)


def test_a_missing_config_is_the_incomplete_run_error_when_the_configuration_is_asked_for(
    run_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(run_dir, tmp_path / "run")
    (folder / "config.yaml").unlink()
    run = FinishedRun.open(folder)  # the results alone read fine (a leaderboard needs no more)
    with pytest.raises(UserError, match="the run folder is incomplete"):
        _ = run.config


# Reads of a results block by key ('block["episode_set"]', 'results.get("evaluations")', a RunResult's '.data[...]')
# belong in results.py and finished_run.py; everything else reads the typed records of FinishedRun.
BLOCK_KEYS = (
    "evaluation|evaluations|episode_set|per_episode_file|dataset_fingerprint|headline|normalization|"
    "store_image_size|learner_settings"
)
UNTYPED_READ = re.compile(
    rf"""\.data\[|\bload_results\b|\bRunResult\b|\bfinished_document\b|(\[|\.get\()\s*["']({BLOCK_KEYS})["']"""
)
RESULTS_MODULES = {"results.py", "finished_run.py"}
# Known reads outside this rule's reach, each with why it is still there; remove an entry when its read goes.
KNOWN: set[tuple[str, str]] = set()


def untyped_reads(package: Path) -> set[tuple[str, str]]:
    """(module, line) of every line of the package outside the results modules that reads results by key."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        module = str(path.relative_to(package))
        if module in RESULTS_MODULES:
            continue
        for line in path.read_text().splitlines():
            if UNTYPED_READ.search(line):
                found.add((module, line.strip()))
    return found


def test_only_the_results_modules_read_results_blocks_by_key() -> None:
    found = untyped_reads(PACKAGE)
    assert found - KNOWN == set(), "read FinishedRun's typed records (fewshot_sla/finished_run.py) instead"
    assert KNOWN - found == set(), "these reads are gone: remove them from KNOWN"


def test_the_rule_catches_reads_by_key(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "engine").mkdir(parents=True)
    (package / "results.py").write_text('x = data["evaluation"]\n')  # the results modules may
    (package / "engine" / "a.py").write_text(
        'h = block["episode_set"]["hash"]\nfirst = run.data["evaluation"]\nfor b in results.get("evaluations", []):\n'
        "    pass\nfrom fewshot_sla.results import load_results\nn = rows['accuracy']  # not a results block\n"
    )
    assert {line for _, line in untyped_reads(package)} == {
        'h = block["episode_set"]["hash"]',
        'first = run.data["evaluation"]',
        'for b in results.get("evaluations", []):',
        "from fewshot_sla.results import load_results",
    }
