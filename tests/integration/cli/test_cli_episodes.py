"""``fewshot-sla episodes make|info|verify`` through ``fewshot_sla.cli.main``: outputs, messages, exit codes."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import numpy as np
import pytest

from fewshot_sla.cli import main
from fewshot_sla.data.store import append_rows, create_split, finish_store
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec


def write_store(root, dataset: str, splits: dict[str, tuple[list[str], list[int], list[str]]], size: int = 4) -> None:
    """A small, complete store of ``dataset`` (class names, labels, identifiers per split; random pixels)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / f"{dataset}.h5", "w") as h5:
        for name, (classes, labels, ids) in splits.items():
            images = rng.integers(0, 256, (len(ids), size, size, 3), dtype=np.uint8)
            append_rows(create_split(h5, name, classes, size), images, np.asarray(labels, dtype=np.int64), ids)
        finish_store(h5, {"dataset": dataset, "image_size": size, "source_format": "test", "split_convention": "test"})


def toy_split(classes: int = 6, per_class: int = 25, prefix: str = "") -> tuple[list[str], list[int], list[str]]:
    ids = [f"{prefix}img{c:02d}_{i:03d}" for c in range(classes) for i in range(per_class)]
    return [f"cls{c:02d}" for c in range(classes)], [c for c in range(classes) for _ in range(per_class)], ids


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def files_in(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_make_mini_imagenet_from_the_packaged_split_list_then_info_and_verify(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        capsys,
        "--data-root",
        str(tmp_path / "data"),
        "episodes",
        "make",
        "--dataset",
        "miniimagenet",
        "--count",
        "30",
        "--seed",
        "4",
    )
    assert code == 0, err
    path = tmp_path / "episodes" / "miniimagenet-test-5w1s15q-30-seed4.npz"
    assert "packaged ravi split list" in out and path.is_file()
    episode_set = EpisodeSet.load(path)
    assert f"content sha256 {episode_set.content_hash}" in out
    assert (episode_set.count, episode_set.seed, episode_set.spec) == (30, 4, EpisodeSpec(5, 1, 15))
    assert len(episode_set.identifiers) == 12000 and len(episode_set.class_names) == 20
    assert episode_set.identifiers[0].startswith("n") and episode_set.identifiers[0].endswith(".jpg")

    code, out, _ = run(capsys, "episodes", "info", str(path), "--json")
    info = json.loads(out)
    assert code == 0 and info["content_sha256"] == episode_set.content_hash and info["count"] == 30
    assert info["make_command"] == (
        "fewshot-sla episodes make --dataset miniimagenet --split test --ways 5 "
        "--shots 1 --queries 15 --count 30 --seed 4"
    )
    code, out, _ = run(capsys, "episodes", "info", str(path))
    assert code == 0 and "miniimagenet/test (20 classes, 12000 images" in out

    code, out, _ = run(
        capsys, "--data-root", str(tmp_path / "data"), "episodes", "verify", str(path), "--dataset", "miniimagenet"
    )
    assert code == 0 and out.startswith("ok: ") and "regenerates     yes, bit for bit" in out
    assert files_in(tmp_path) == ["episodes/miniimagenet-test-5w1s15q-30-seed4.npz"]


def test_make_from_a_store_verify_and_a_store_that_lacks_images(tmp_path, capsys):
    data = tmp_path / "data"
    write_store(data, "synthetic", {"test": toy_split(), "train": toy_split(prefix="t")})
    out_file = tmp_path / "sets" / "toy.npz"
    code, out, err = run(
        capsys,
        "--data-root",
        str(data),
        "episodes",
        "make",
        "--dataset",
        "synthetic",
        "--ways",
        "3",
        "--shots",
        "2",
        "--queries",
        "4",
        "--count",
        "12",
        "--out",
        str(out_file),
    )
    assert code == 0, err
    assert f"drawn from the store {data / 'synthetic.h5'}" in out
    made = EpisodeSet.load(out_file)
    classes, labels, ids = toy_split()
    expected = EpisodeSet.make(
        CanonicalOrder(classes, labels, ids),
        dataset="synthetic",
        split="test",
        spec=EpisodeSpec(3, 2, 4),
        count=12,
        seed=0,
    )
    assert made.content_hash == expected.content_hash

    code, out, _ = run(capsys, "--data-root", str(data), "episodes", "verify", str(out_file), "--dataset", "synthetic")
    assert code == 0 and "regenerates     yes" in out

    # A store rebuilt with extra images still resolves every episode, but no longer regenerates it.
    write_store(data, "synthetic", {"test": (classes, labels + [0], ids + ["zz_extra"])})
    code, out, _ = run(capsys, "--data-root", str(data), "episodes", "verify", str(out_file), "--dataset", "synthetic")
    assert code == 0 and "differs from the one the set was drawn from" in out

    # A store from another source (other identifiers) cannot serve the set.
    write_store(data, "synthetic", {"test": toy_split(prefix="other-")})
    code, out, err = run(
        capsys, "--data-root", str(data), "episodes", "verify", str(out_file), "--dataset", "synthetic"
    )
    assert code == 2 and out == ""
    assert err.startswith("fewshot-sla: error: ") and "images of this episode set are not in synthetic/test" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (
            ["--ways", "30"],
            "30-way episodes need 30 classes but miniimagenet/test (packaged split list) has 20; "
            "use --ways 20 or fewer",
        ),
        (["--shots", "0"], "shots must be a whole number >= 1, got 0"),
        (["--queries", "-3"], "queries must be a whole number >= 1, got -3"),
        (["--ways", "0"], "ways must be a whole number >= 1"),
        (
            ["--shots", "590", "--queries", "15"],
            "need 605 images per class but class 'n01930112' of miniimagenet/test (packaged split list) has 600",
        ),
        (["--count", "0"], "--count must be >= 1 and --seed >= 0 (got 0 and 0)"),
        (["--seed", "-1"], "--count must be >= 1 and --seed >= 0 (got 1000 and -1)"),
        (["--split", "holdout"], "miniimagenet has no split 'holdout'; choose one of: train, val, test"),
    ],
)
def test_impossible_requests_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, flags, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        capsys, "--data-root", str(tmp_path / "data"), "episodes", "make", "--dataset", "miniimagenet", *flags
    )
    assert code == 2 and out == ""
    assert err == f"fewshot-sla: error: {err.removeprefix('fewshot-sla: error: ')}" and err.count("\n") == 1
    assert fragment in err
    assert files_in(tmp_path) == []


def test_unknown_or_unprepared_datasets(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "--data-root", str(tmp_path), "episodes", "make", "--dataset", "imagenet-21k")
    assert code == 2 and "unknown dataset 'imagenet-21k'; choose one of:" in err and "miniimagenet" in err
    code, _, err = run(capsys, "--data-root", str(tmp_path), "episodes", "make", "--dataset", "cub")
    assert code == 2 and "fewshot-sla data prepare cub --source <PATH>" in err and err.count("\n") == 1
    assert files_in(tmp_path) == []


def test_bad_flags_are_argparse_errors_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["episodes", "make", "--dataset", "miniimagenet", "--shots", "five"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shots: invalid int value: 'five'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["episodes", "verify", "x.npz"])
    assert exit_info.value.code == 2 and "--dataset" in capsys.readouterr().err
    assert files_in(tmp_path) == []


def test_out_pointing_at_a_folder_is_a_user_error(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    code, _, err = run(
        capsys,
        "--data-root",
        str(tmp_path),
        "episodes",
        "make",
        "--dataset",
        "miniimagenet",
        "--count",
        "5",
        "--out",
        str(tmp_path / "folder"),
    )
    assert code == 2 and "is a folder; give a file name" in err
    assert files_in(tmp_path) == []


def test_info_and_verify_refuse_missing_tampered_and_foreign_files(tmp_path, capsys):
    code, _, err = run(capsys, "episodes", "info", str(tmp_path / "none.npz"))
    assert code == 2 and "no episode set at" in err

    path = tmp_path / "set.npz"
    code, _, _ = run(
        capsys,
        "--data-root",
        str(tmp_path),
        "episodes",
        "make",
        "--dataset",
        "miniimagenet",
        "--count",
        "5",
        "--out",
        str(path),
    )
    assert code == 0
    code, _, err = run(capsys, "--data-root", str(tmp_path), "episodes", "verify", str(path), "--dataset", "synthetic")
    assert code == 2 and "made for dataset 'miniimagenet', not 'synthetic'" in err
    assert not (tmp_path / "synthetic.h5").exists()  # refused before touching (or generating) any store

    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    meta = json.loads(np.load(path)["meta"].tobytes())
    meta["count"] = 4  # a field derived from the arrays: still an edit
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.frombuffer(json.dumps(meta).encode(), np.uint8))
    members["meta.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    for argv in (["episodes", "info", str(path)], ["episodes", "verify", str(path), "--dataset", "miniimagenet"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and "was altered or damaged" in err and err.count("\n") == 1
