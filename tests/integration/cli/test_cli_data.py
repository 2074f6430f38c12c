"""``fewshot-sla data prepare|info`` through ``fewshot_sla.cli.main``: results, re-runs, and every bad input
(one line, exit code 2, no traceback, nothing half-written left behind)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.data.store import DatasetStore


def cli(capsys: pytest.CaptureFixture, root: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--data-root", str(root), "data", *args])
    out, err = capsys.readouterr()
    return code, out, err


def visible(err: str) -> str:
    """What a terminal shows of stderr at the end: the progress bar erases itself with carriage returns."""
    return err.split("\r")[-1]


def leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob("*")) if root.exists() else []


def test_prepare_synthetic_then_reuse_then_force_then_new_seed(
    tmp_path: Path, small_synthetic: int, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "data"
    code, out, _ = cli(capsys, root, "prepare", "synthetic")
    assert code == 0 and out.startswith(f"wrote {root / 'synthetic.h5'}")
    first = DatasetStore(root / "synthetic.h5").fingerprint
    code, out, _ = cli(capsys, root, "prepare", "synthetic")
    assert code == 0 and "already prepared from this source" in out and "reusing it" in out
    code, out, _ = cli(capsys, root, "prepare", "synthetic", "--force")
    assert code == 0 and out.startswith("wrote") and DatasetStore(root / "synthetic.h5").fingerprint == first
    code, out, _ = cli(capsys, root, "prepare", "synthetic", "--seed", "1")
    assert code == 0 and out.startswith("wrote") and DatasetStore(root / "synthetic.h5").fingerprint != first
    assert [p.name for p in leftovers(root)] == ["synthetic.h5"]


def test_info_text_json_all_and_verify(tmp_path: Path, small_synthetic: int, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    assert cli(capsys, root, "prepare", "synthetic")[0] == 0
    code, out, _ = cli(capsys, root, "info", "synthetic")
    assert code == 0
    assert re.search(rf"train +64 classes +{64 * small_synthetic} images", out) and "image size 32" in out
    code, out, _ = cli(capsys, root, "info", "synthetic", "--json", "--verify")
    summary = json.loads(out)
    assert code == 0 and summary["verified"] is True and summary["image_size"] == 32
    assert summary["splits"]["test"] == {"classes": 20, "images": 20 * small_synthetic}
    assert summary["fingerprint"] == DatasetStore(root / "synthetic.h5").fingerprint
    code, out, _ = cli(capsys, root, "info")
    assert code == 0 and "cub: not prepared" in out and "fewshot-sla data prepare cub --source <PATH>" in out
    (root / "cub.h5").write_bytes(b"half a download")
    code, out, _ = cli(capsys, root, "info", "--json")
    assert code == 2  # the listing is printed, then the damaged store is the error
    assert {d["dataset"]: d["prepared"] for d in json.loads(out)} == {
        "cifarfs": False,
        "cub": False,
        "fc100": False,
        "miniimagenet": False,
        "omniglot": False,
        "omniglot-lake": False,
        "omniglot-upright": False,
        "synthetic": True,
        "tieredimagenet": False,
        "tinyimagenet": False,
    }
    code, out, err = cli(capsys, root, "info")
    assert f"cub: store {root / 'cub.h5'} is unreadable" in out
    assert code == 2 and err.count("\n") == 1 and "fewshot-sla data prepare cub --source <PATH> --force" in err


def test_info_verify_reports_changed_content(
    tmp_path: Path, small_synthetic: int, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "data"
    cli(capsys, root, "prepare", "synthetic")
    with h5py.File(root / "synthetic.h5", "r+") as h5:
        h5["train/labels"][0] = 1
    code, _, err = cli(capsys, root, "info", "synthetic", "--verify")
    assert code == 2 and err.count("\n") == 1
    assert "no longer matches its fingerprint" in err and "fewshot-sla data prepare synthetic --force" in err


def test_info_of_a_dataset_not_prepared_names_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(capsys, tmp_path, "info", "cub")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "fewshot-sla data prepare cub --source <PATH>" in err and "Traceback" not in err


def test_prepare_a_ravi_source_and_rebuild_when_an_image_changes(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture
) -> None:
    source, _ = ravi_source()
    root = tmp_path / "data"
    code, out, _ = cli(capsys, root, "prepare", "miniimagenet", "--source", str(source), "--image-size", "8")
    assert code == 0 and f"reading mini-ImageNet from {source}" in out and "split convention: custom from" in out
    before = DatasetStore(root / "miniimagenet.h5")
    assert before.image_size == 8 and before.attrs["source_format"] == "ravi-csv"
    assert "reusing" in cli(capsys, root, "prepare", "miniimagenet", "--source", str(source), "--image-size", "8")[1]
    changed = sorted((source / "images").iterdir())[3]
    Image.new("RGB", (24, 20), (250, 0, 250)).save(changed, quality=95)
    code, out, _ = cli(capsys, root, "prepare", "miniimagenet", "--source", str(source), "--image-size", "8")
    assert code == 0 and "wrote" in out
    assert DatasetStore(root / "miniimagenet.h5").fingerprint != before.fingerprint


def _corrupt(source: Path, which: int = 0) -> Path:
    bad = sorted((source / "images").iterdir())[which]
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    return bad


BAD_INPUTS: dict[str, tuple[Callable[[Path, Callable], list[str]], str]] = {
    "source missing": (lambda t, r: ["prepare", "cub", "--source", str(t / "nowhere")], "does not exist"),
    "source empty": (lambda t, r: ["prepare", "cub", "--source", str(_mkdir(t / "empty"))], "is empty"),
    "source a file": (lambda t, r: ["prepare", "fc100", "--source", str(_touch(t / "c.tar.gz"))], "is a file"),
    "layout unknown": (
        lambda t, r: ["prepare", "miniimagenet", "--source", str(_touch(t / "odd" / "readme.txt").parent)],
        "no mini-ImageNet layout recognised in",
    ),
    "split names absent classes": (
        lambda t, r: ["prepare", "miniimagenet", "--source", str(r(csvs=False)[0])],
        "has no image of 100 class(es) (n01532829",
    ),
    "corrupt image": (
        lambda t, r: ["prepare", "miniimagenet", "--source", str(_source_with(r, _corrupt))],
        "cannot decode",
    ),
    "missing image": (
        lambda t, r: ["prepare", "miniimagenet", "--source", str(_source_with(r, lambda s: _unlink(s, 2)))],
        "(file is missing); replace it, or pass --skip-bad",
    ),
    "unknown dataset": (lambda t, r: ["prepare", "imagenet", "--source", str(t)], "unknown dataset 'imagenet'"),
    "source for synthetic": (lambda t, r: ["prepare", "synthetic", "--source", str(t)], "drop --source"),
    "no source": (lambda t, r: ["prepare", "cub"], "needs --source PATH: CUB_200_2011/"),
    "seed for cub": (lambda t, r: ["prepare", "cub", "--seed", "3", "--source", str(t)], "--seed applies to"),
    "split dir missing": (
        lambda t, r: ["prepare", "miniimagenet", "--source", str(r()[0]), "--split-dir", str(t / "no")],
        "is not a folder",
    ),
    "split dir incomplete": (
        lambda t, r: ["prepare", "cub", "--source", str(_cub_stub(t)), "--split-dir", str(_mkdir(t / "sd"))],
        "train.json is missing",
    ),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


def _unlink(source: Path, which: int) -> Path:
    missing = sorted((source / "images").iterdir())[which]
    missing.unlink()
    return missing


def _source_with(make: Callable, damage: Callable[[Path], Path]) -> Path:
    source, _ = make()
    damage(source)
    return source


def _cub_stub(tmp: Path) -> Path:
    root = _mkdir(tmp / "CUB_200_2011" / "images").parent
    (root / "images.txt").write_text("")
    return root


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture, case: str
) -> None:
    build, fragment = BAD_INPUTS[case]
    args = build(tmp_path, ravi_source)
    root = tmp_path / "data"
    code, _, err = cli(capsys, root, *args)
    assert code == 2, err
    assert visible(err).startswith("fewshot-sla: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in visible(err)
    assert leftovers(root) == []


@pytest.mark.parametrize(
    "command",
    [["data", "info"], ["data", "prepare", "synthetic"], ["run", "--out", "r"], ["episodes", "make"]],
    ids=["info", "prepare", "run", "episodes"],
)
@pytest.mark.parametrize("where", ["is", "below"])
def test_a_data_root_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: list[str], where: str
) -> None:
    blocker = tmp_path / "store-file"
    blocker.write_bytes(b"x")
    root = blocker if where == "is" else blocker / "data"
    args = ["--data-root", str(root), *[str(tmp_path / "r") if a == "r" else a for a in command]]
    if command[0] == "episodes":
        args += ["--dataset", "synthetic", "--out", str(tmp_path / "e.npz")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--data-root {root} " in err and "not a folder; give a folder for the dataset stores" in err
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_a_split_file_that_is_not_utf8_is_one_line(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture
) -> None:
    source, _ = ravi_source()
    splits = _mkdir(tmp_path / "splits")
    for split in ("train", "val", "test"):
        (splits / f"{split}.csv").write_bytes("filename,label\nn0000000100000001.jpg,caf\u00e9\n".encode("latin1"))
    code, _, err = cli(
        capsys, tmp_path / "data", "prepare", "miniimagenet", "--source", str(source), "--split-dir", str(splits)
    )
    assert code == 2 and visible(err).count("\n") == 1
    assert f"split file {splits / 'train.csv'} is not UTF-8 text (byte 0xe9 at offset" in visible(err)
    assert leftovers(tmp_path / "data") == []


def test_corrupt_image_message_names_the_file(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture
) -> None:
    source, _ = ravi_source()
    bad = _corrupt(source, 5)
    code, _, err = cli(capsys, tmp_path / "data", "prepare", "miniimagenet", "--source", str(source))
    assert code == 2 and f"cannot read image {bad} (cannot decode" in err


def test_bad_argument_value_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--data-root", str(tmp_path), "data", "prepare", "synthetic", "--image-size", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--image-size: must be at least 1" in err
    assert leftovers(tmp_path) == []


def test_prepare_help_lists_every_registered_dataset_with_its_stored_size(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fewshot_sla.registry import DATASETS

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    dataset = next(line for line in lines if line.strip().startswith("DATASET "))
    size = next(line for line in lines if line.strip().startswith("--image-size"))
    assert "tinyimagenet" in DATASETS.names() and DATASETS.get("tinyimagenet").image_size == 64
    assert dataset.endswith(f"a registered dataset: {', '.join(DATASETS.names())}")
    sizes = ", ".join(f"{name} {info.image_size}" for name, info in DATASETS.items())
    assert size.endswith(f"(default: the dataset's standard size: {sizes})") and "otherwise" not in size
    assert "tinyimagenet 64" in size and "miniimagenet 84" in size and "cifarfs 32" in size


def test_skip_bad_counts_and_skips_unreadable_images(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture
) -> None:
    source, _ = ravi_source(per_class=4)
    bad = _corrupt(source, 0)
    missing = _unlink(source, 9)
    root = tmp_path / "data"
    code, out, _ = cli(
        capsys, root, "prepare", "miniimagenet", "--source", str(source), "--image-size", "8", "--skip-bad"
    )
    assert code == 0 and "skipped 2 unreadable image(s), e.g." in out
    store = DatasetStore(root / "miniimagenet.h5")
    ids = [i for s in ("train", "val", "test") for i in store.split(s).image_ids]
    assert len(ids) == 7 * 4 - 2 and bad.name not in ids and missing.name not in ids
    assert "2 unreadable source image(s) were skipped" in cli(capsys, root, "info", "miniimagenet")[1]


def test_skip_bad_still_refuses_a_class_left_without_images(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture
) -> None:
    source, _ = ravi_source(per_class=2)
    for which in (0, 1):  # both images of the first class (files sort by class)
        _corrupt(source, which)
    code, _, err = cli(capsys, tmp_path / "data", "prepare", "miniimagenet", "--source", str(source), "--skip-bad")
    assert code == 2 and "every image of class 'n00000001' (train split) is unreadable" in err
    assert leftovers(tmp_path / "data") == []


def test_an_interrupted_prepare_leaves_no_store(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fewshot_sla.data.importers import common

    source, _ = ravi_source(per_class=4)
    calls = []

    def interrupted(path: Path):
        calls.append(path)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real(path)

    real = common.read_image_file
    monkeypatch.setattr(common, "read_image_file", interrupted)
    code, _, err = cli(capsys, tmp_path / "data", "prepare", "miniimagenet", "--source", str(source))
    assert code == 130 and "interrupted" in err
    assert leftovers(tmp_path / "data") == []


def test_a_failed_rebuild_keeps_the_previous_store(
    tmp_path: Path, ravi_source: Callable, capsys: pytest.CaptureFixture
) -> None:
    source, _ = ravi_source()
    root = tmp_path / "data"
    assert cli(capsys, root, "prepare", "miniimagenet", "--source", str(source), "--image-size", "8")[0] == 0
    fingerprint = DatasetStore(root / "miniimagenet.h5").fingerprint
    _corrupt(source, 4)
    code, _, _ = cli(capsys, root, "prepare", "miniimagenet", "--source", str(source), "--image-size", "8", "--force")
    assert code == 2
    assert [p.name for p in leftovers(root)] == ["miniimagenet.h5"]
    assert DatasetStore(root / "miniimagenet.h5").fingerprint == fingerprint
