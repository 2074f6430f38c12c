"""``--init-from RUN_DIR``: meta-training from another run's backbone. A new run starts with exactly that backbone
and its own seeded head; results.json records the source checkpoint by content; ``--resume`` never reads the
source again; every mismatch is one line before anything is written; grid files can set it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig, identity_values
from fewshot_sla.config.grid import cell_identity, load_grid
from fewshot_sla.engine.plan import plan_run
from fewshot_sla.finished_run import FinishedRun

# 4 steps of 2 episodes, validation and checkpoints every 2 steps, conv4 with 8 channels on 16-pixel images.
SETTINGS = {
    "device": "cpu",
    "train_episodes": 8,
    "meta_batch": 2,
    "val_every": 4,
    "val_episodes": 8,
    "eval_episodes": 16,
    "queries": 4,
    "train_queries": 4,
    "backbone": "conv4",
    "backbone_options": {"hidden": 8},
    "image_size": 16,
}
FLAGS = [
    "--quiet",
    *("--device", "cpu", "--train-episodes", "8", "--meta-batch", "2", "--val-every", "4", "--val-episodes", "8"),
    *("--eval-episodes", "16", "--queries", "4", "--train-queries", "4", "--backbone", "conv4"),
    *("--backbone-option", "hidden=8", "--image-size", "16"),
]
# The learner that starts from the source's backbone: MetaOptNet-RR (a learnable scale besides the backbone).
TARGET = ["--method", "metaoptnet-ridge"]


def run(data_root: Path, out: Path, *extra: str) -> int:
    return main(["--data-root", str(data_root), "run", *FLAGS, "--out", str(out), *extra])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ProtoNet run: the backbone the others start from."""
    out = tmp_path_factory.mktemp("source") / "protonet"
    assert run(data_root, out, "--method", "protonet") == 0
    return out


@pytest.fixture(scope="module")
def initialised(data_root: Path, source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MetaOptNet-RR run from the source's best checkpoint, uninterrupted."""
    out = tmp_path_factory.mktemp("initialised") / "ridge"
    assert run(data_root, out, *TARGET, "--init-from", str(source)) == 0
    return out


def backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def test_a_new_run_starts_with_the_source_backbone_and_its_own_fresh_head(
    data_root: Path, source: Path, tmp_path: Path
) -> None:
    cfg = RunConfig(method="metaoptnet-ridge", **SETTINGS)
    fresh = plan_run(cfg, overrides={}, out=tmp_path / "fresh", data_root=data_root, fit_memory="off")
    started = plan_run(
        cfg.updated({"init_from": str(source)}),
        overrides={},
        out=tmp_path / "started",
        data_root=data_root,
        fit_memory="off",
    )
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "started").exists()  # planning writes nothing
    best = torch.load(source / "checkpoints" / "best.pt", weights_only=True)["model"]
    expected = backbone_of(best)
    loaded = started.learner.backbone.state_dict()
    assert loaded.keys() == expected.keys() and expected  # parameters and buffers (BatchNorm statistics)
    for key, value in expected.items():
        assert torch.equal(loaded[key].cpu(), value), key
    seeded = fresh.learner.backbone.state_dict()
    assert any(not torch.equal(seeded[k], expected[k]) for k in expected)  # the load replaced something
    others = {k: v for k, v in started.learner.state_dict().items() if not k.startswith("backbone.")}
    fresh_others = {k: v for k, v in fresh.learner.state_dict().items() if not k.startswith("backbone.")}
    assert others.keys() == fresh_others.keys() == {"scale"}
    for key in others:  # everything else is this run's own seeded initialisation
        assert torch.equal(others[key], fresh_others[key]), key
    assert started.init is not None and fresh.init is None
    assert started.init.checkpoint == "best" and started.init.sha256 == sha256(source / "checkpoints" / "best.pt")
    # the last checkpoint of the source, on request
    last = plan_run(
        cfg.updated({"init_from": str(source), "init_checkpoint": "last"}),
        overrides={},
        out=tmp_path / "last",
        data_root=data_root,
        fit_memory="off",
    )
    final = backbone_of(torch.load(source / "checkpoints" / "last.pt", weights_only=True)["model"])
    for key, value in last.learner.backbone.state_dict().items():
        assert torch.equal(value.cpu(), final[key]), key
    assert last.init is not None and last.init.checkpoint == "last"
    assert last.init.sha256 == sha256(source / "checkpoints" / "last.pt")


def test_results_record_the_source_checkpoint_by_content(source: Path, initialised: Path) -> None:
    results = json.loads((initialised / "results.json").read_text())
    best = source / "checkpoints" / "best.pt"
    assert results["init_from"] == {
        "run_dir": str(source.resolve()),
        "checkpoint": "best",
        "sha256": sha256(best),
        "step": torch.load(best, weights_only=True)["step"],
    }
    assert results["config"]["init_from"] == str(source) and results["config"]["init_checkpoint"] is None
    assert yaml.safe_load((initialised / "config.yaml").read_text())["init_from"] == str(source)  # as given
    typed = FinishedRun.open(initialised).results.init_from
    assert typed is not None and typed.sha256 == sha256(best)
    # a run from the seeded initialisation records none
    assert FinishedRun.open(source).results.init_from is None


def assert_same_run(a: Path, b: Path) -> None:
    """Same test accuracies, per-episode results, training metrics and best checkpoint."""
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["evaluation"]["accuracy"] == rb["evaluation"]["accuracy"]
    assert ra["train"]["best_step"] == rb["train"]["best_step"]
    assert ra["train"]["best_val_accuracy"] == rb["train"]["best_val_accuracy"]
    pa, pb = np.load(a / ra["evaluation"]["per_episode_file"]), np.load(b / rb["evaluation"]["per_episode_file"])
    for kind in ra["evaluation"]["accuracy"]:
        np.testing.assert_array_equal(pa[kind], pb[kind])
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    best_a = torch.load(a / "checkpoints" / "best.pt", weights_only=True)["model"]
    best_b = torch.load(b / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert best_a.keys() == best_b.keys()
    for key in best_a:
        assert torch.equal(best_a[key], best_b[key]), key


def test_resume_does_not_read_the_source_again(
    data_root: Path, source: Path, initialised: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = tmp_path / "source-copy"
    shutil.copytree(source, copy)
    out = tmp_path / "run"
    assert run(data_root, out, *TARGET, "--init-from", str(copy), "--max-steps", "1") == 0
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    shutil.rmtree(copy)  # the source is gone: the run's own checkpoint holds the weights
    capsys.readouterr()
    assert run(data_root, out, "--resume") == 0
    assert_same_run(initialised, out)
    record = json.loads((out / "results.json").read_text())["init_from"]
    expected = json.loads((initialised / "results.json").read_text())["init_from"]
    assert record == {**expected, "run_dir": str(copy.resolve())}  # the same bytes, read from the copy
    # eval re-tests the run's own checkpoint: no source needed either
    assert main(["--data-root", str(data_root), "eval", str(out), "--eval-episodes", "8", "--device", "cpu"]) == 0


def test_a_run_resumed_before_its_first_checkpoint_reads_the_source(
    data_root: Path, source: Path, initialised: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(initialised / "config.yaml", out / "config.yaml")  # killed before its first checkpoint
    assert run(data_root, out, "--resume") == 0
    assert_same_run(initialised, out)
    assert json.loads((out / "results.json").read_text())["init_from"]["sha256"] == sha256(
        source / "checkpoints" / "best.pt"
    )


def test_resuming_without_the_record_of_the_source_is_one_line(
    data_root: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, *TARGET, "--init-from", str(source), "--max-steps", "1") == 0
    (out / "init_from.json").unlink()
    capsys.readouterr()
    assert run(data_root, out, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "init_from.json is missing" in err


def damaged_copy(source: Path, tmp_path: Path, change: str) -> Path:
    """A copy of the source run with one thing about it changed."""
    copy = tmp_path / f"source-{change}"
    shutil.copytree(source, copy)
    best = copy / "checkpoints" / "best.pt"
    if change == "no-best":
        best.unlink()
    elif change == "cut-short":
        best.write_bytes(best.read_bytes()[:1000])
    elif change in ("shape", "key"):
        state = torch.load(best, weights_only=True)
        key = next(k for k in state["model"] if k.endswith("weight") and k.startswith("backbone."))
        if change == "shape":
            state["model"][key] = torch.zeros(3, 3)
        else:
            del state["model"][key]
        torch.save(state, best)
    elif change == "greyscale":  # as if trained on Omniglot, not finished (no recorded normalisation)
        config = yaml.safe_load((copy / "config.yaml").read_text())
        (copy / "config.yaml").write_text(yaml.safe_dump({**config, "dataset": "omniglot"}, sort_keys=False))
        (copy / "results.json").unlink()
    elif change == "not-a-run":
        (copy / "config.yaml").unlink()
    return copy


@pytest.mark.parametrize(
    ("change", "flags", "expected"),
    [
        (None, ["--backbone-option", "hidden=16"], "backbone conv4 {hidden: 8}, this run builds conv4 {hidden: 16}"),
        (None, ["--backbone", "resnet12"], "was trained with backbone conv4 {hidden: 8}, this run builds resnet12"),
        ("no-best", [], "has no best checkpoint ("),
        ("no-best", [], "best.pt is missing); use --init-checkpoint last"),
        ("cut-short", [], "best.pt is damaged"),
        ("shape", [], "the backbone of "),
        ("shape", [], "is [3, 3] there, [8, 3, 3, 3] here"),
        ("key", [], "differs from this run's: it lacks "),
        ("greyscale", [], "was trained on 1-channel images (omniglot), but this run's synthetic has 3"),
        ("not-a-run", [], "is not a run folder (no config.yaml)"),
    ],
)
def test_a_source_that_does_not_fit_is_refused_in_one_line_before_anything_is_written(
    data_root: Path,
    source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    change: str | None,
    flags: list[str],
    expected: str,
) -> None:
    given = damaged_copy(source, tmp_path, change) if change else source
    out = tmp_path / "run"
    capsys.readouterr()
    assert run(data_root, out, *TARGET, "--init-from", str(given), *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_a_missing_folder_a_checkpoint_choice_without_a_source_and_the_run_itself_are_refused(
    data_root: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    missing = tmp_path / "nowhere"
    assert run(data_root, out, "--init-from", str(missing)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--init-from {missing} is missing" in err
    assert run(data_root, out, "--init-checkpoint", "last") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-checkpoint last chooses a checkpoint of --init-from" in err
    assert run(data_root, out, "--init-checkpoint", "latest") == 2
    assert "'init_checkpoint' must be one of 'best' or 'last'" in capsys.readouterr().err
    assert not out.exists()
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    assert run(data_root, copy, "--overwrite", "--init-from", str(copy)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is this run's own folder" in err
    assert (copy / "results.json").is_file()  # left as it was


def test_a_grid_file_sets_init_from_and_its_cells_start_from_the_source(
    data_root: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    settings = {k: v for k, v in SETTINGS.items() if k not in ("device", "backbone")}
    grid = tmp_path / "grid.yaml"
    text = (
        "name: from-pretrained\ndatasets: [synthetic]\nmethods: [metaoptnet-ridge]\nbackbones: conv4\n"
        "variants:\n  - {transform: rotation, objective: sla}\nshots: [1]\n"
    )
    grid.write_text(text + f"settings: {json.dumps({**settings, 'init_from': str(source)})}\n")
    (cell,) = load_grid(grid).cells
    assert cell.config.init_from == str(source) and cell.config.init_checkpoint is None
    # a cell that does not set them keeps the identity it had before the fields existed
    plain = grid.with_name("plain.yaml")
    plain.write_text(text + f"settings: {json.dumps(settings)}\n")
    (plain_cell,) = load_grid(plain).cells
    assert not {"init_from", "init_checkpoint"} & set(identity_values(plain_cell.config))
    assert cell_identity(cell.config) != cell_identity(plain_cell.config) and cell.name != plain_cell.name
    runs = tmp_path / "runs"
    argv = ["--data-root", str(data_root), "leaderboard", "run", str(grid), "--runs-dir", str(runs)]
    assert main(argv) == 0, capsys.readouterr()
    record = json.loads((runs / cell.name / "results.json").read_text())["init_from"]
    assert record["sha256"] == sha256(source / "checkpoints" / "best.pt")
