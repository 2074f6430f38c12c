"""Omniglot: the importer (zips, extracted folders, torchvision's omniglot-py/), both protocols, one channel end to
end, and its bad inputs (one line, exit 2, nothing left behind)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig
from fewshot_sla.data.store import DatasetStore
from fewshot_sla.engine.build import pipeline_for
from fewshot_sla.registry import LEARNERS
from tests.helpers.real_data import REAL_DATA

REAL = REAL_DATA / "omniglot"
ALPHABETS = {
    "images_background": {"Alpha_(A)": 3, "Beta": 2},
    "images_evaluation": {"Gamma": 3},
}
DRAWINGS = 3
SPLITS = {  # torchmeta's format: {set: {alphabet: [characters]}}
    "train": {"background": {"Alpha_(A)": ["character01", "character02", "character03"]}, "evaluation": {}},
    "val": {"background": {"Beta": ["character01", "character02"]}, "evaluation": {}},
    "test": {"background": {}, "evaluation": {"Gamma": ["character01", "character02", "character03"]}},
}


def _drawing(seed: int) -> Image.Image:
    """A 1-bit 35x35 'drawing' (ink black on white, as in the release), asymmetric so every rotation differs."""
    rng = np.random.default_rng(seed)
    paper = np.ones((35, 35), dtype=bool)
    paper[5:30, 8:11] = False  # a vertical stroke
    paper[26:29, 8:28] = False  # a foot to its right
    paper[rng.integers(3, 30), rng.integers(14, 30)] = False
    return Image.fromarray(paper)


def _release(folder: Path) -> Path:
    """Write a small release: images_background/ and images_evaluation/ with <Alphabet>/characterNN/<id>_<dd>.png."""
    number = 0
    for image_set, alphabets in ALPHABETS.items():
        for alphabet, characters in alphabets.items():
            for c in range(1, characters + 1):
                number += 1
                target = folder / image_set / alphabet / f"character{c:02d}"
                target.mkdir(parents=True)
                for d in range(1, DRAWINGS + 1):
                    _drawing(100 * number + d).save(target / f"{number:04d}_{d:02d}.png")
    return folder


def _zip(folder: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for image_set in ALPHABETS:
        with zipfile.ZipFile(target / f"{image_set}.zip", "w") as archive:
            for path in sorted((folder / image_set).rglob("*.png")):
                archive.write(path, str(path.relative_to(folder)))
    return target


def _split_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for split, content in SPLITS.items():
        (folder / f"{split}.json").write_text(json.dumps(content))
    return folder


@pytest.fixture
def release(tmp_path: Path) -> dict[str, Path]:
    folders = _release(tmp_path / "extracted")
    return {
        "folders": folders,
        "zips": _zip(folders, tmp_path / "zips"),
        "splits": _split_dir(tmp_path / "splits"),
    }


def cli(capsys: pytest.CaptureFixture, root: Path, *args: str) -> tuple[int, str]:
    try:
        code = main(["--data-root", str(root), *args])
    except SystemExit as stop:
        code = int(stop.code or 0)
    _, err = capsys.readouterr()
    return code, err.split("\r")[-1]  # what a terminal shows: the progress bar erases itself


def prepare(capsys: pytest.CaptureFixture, root: Path, source: Path, splits: Path, dataset: str = "omniglot") -> None:
    code, err = cli(capsys, root, "data", "prepare", dataset, "--source", str(source), "--split-dir", str(splits))
    assert code == 0, err


def test_zips_folders_and_omniglot_py_give_the_same_store(tmp_path, release, capsys):
    stores = {}
    torchvision_layout = tmp_path / "tv"
    (torchvision_layout / "omniglot-py").mkdir(parents=True)
    for image_set in ALPHABETS:
        (torchvision_layout / "omniglot-py" / image_set).symlink_to(release["folders"] / image_set)
    for name, source in (("zips", release["zips"]), ("folders", release["folders"]), ("tv", torchvision_layout)):
        prepare(capsys, tmp_path / name, source, release["splits"])
        stores[name] = DatasetStore(tmp_path / name / "omniglot.h5")
    assert len({s.fingerprint for s in stores.values()}) == 1
    assert {s.attrs["source_format"] for s in stores.values()} == {"omniglot-zips", "omniglot-folders"}


def test_rotated_classes_are_sla_rotations_of_the_upright_image_resized_with_lanczos(tmp_path, release, capsys):
    prepare(capsys, tmp_path, release["zips"], release["splits"])
    store = DatasetStore(tmp_path / "omniglot.h5")
    split = store.split("train")
    assert split.images.shape == (3 * 4 * DRAWINGS, 28, 28, 1)
    assert split.class_names[:4] == [f"Alpha_(A)/character01/rot{d:03d}" for d in (0, 90, 180, 270)]
    upright = split.image_ids[0]
    assert upright == "images_background/Alpha_(A)/character01/0001_01.png@rot000"
    png = release["folders"] / upright.split("@")[0]
    expected = np.asarray(Image.open(png).convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    assert np.array_equal(split.images[0, :, :, 0].numpy(), expected)
    for turns in (1, 2, 3):
        row = turns * DRAWINGS
        assert split.image_ids[row] == upright.replace("@rot000", f"@rot{90 * turns:03d}")
        assert split.labels[row] == turns
        # exactly what SLA's rotation transformation does to the upright image
        assert torch.equal(split.images[row], torch.rot90(split.images[0], turns, dims=(0, 1)))
        assert not torch.equal(split.images[row], split.images[0])


def test_a_nearest_neighbour_store_is_another_store_holding_snells_pixels(tmp_path, release, capsys):
    """--resize-filter nearest: each stored pixel is the drawing's pixel nearest to its centre (an index formula;
    also what Pillow gives the 1-bit image with its default filter, as in Snell et al.'s code); the store records
    the filter, is not mistaken for the Lanczos store of the same source, and ``data info`` names it."""
    prepare(capsys, tmp_path, release["zips"], release["splits"])
    lanczos = DatasetStore(tmp_path / "omniglot.h5")
    code, err = cli(
        capsys, tmp_path, "data", "prepare", "omniglot", "--source", str(release["zips"]),
        "--split-dir", str(release["splits"]), "--resize-filter", "nearest",
    )  # fmt: skip
    assert code == 0, err
    nearest = DatasetStore(tmp_path / "omniglot.h5")
    assert (lanczos.attrs["resize_filter"], nearest.attrs["resize_filter"]) == ("lanczos", "nearest")
    assert nearest.fingerprint != lanczos.fingerprint
    split = nearest.split("train")
    with Image.open(release["folders"] / split.image_ids[0].split("@")[0]) as drawing:
        ink = np.asarray(drawing)
        assert drawing.mode == "1"
        snell = np.asarray(drawing.resize((28, 28)).convert("L"))
    centres = np.floor((np.arange(28) + 0.5) * ink.shape[0] / 28).astype(int)
    expected = np.where(ink[np.ix_(centres, centres)], 255, 0)
    assert np.array_equal(split.images[0, :, :, 0].numpy(), expected)
    assert np.array_equal(snell, expected)
    assert main(["--data-root", str(tmp_path), "data", "info", "omniglot"]) == 0
    assert "(resized with nearest)" in capsys.readouterr().out


def test_a_resize_filter_for_a_generated_dataset_is_one_line(tmp_path, capsys):
    code, err = cli(capsys, tmp_path, "data", "prepare", "synthetic", "--resize-filter", "nearest")
    assert code == 2 and err.count("\n") == 1 and "--resize-filter" in err and "generated" in err
    assert not list(tmp_path.iterdir())


def test_the_lake_protocol_keeps_characters_unrotated(tmp_path, release, capsys):
    prepare(capsys, tmp_path, release["folders"], release["splits"], "omniglot-lake")
    summary = DatasetStore(tmp_path / "omniglot-lake.h5").summary()["splits"]
    assert {s: (v["classes"], v["images"]) for s, v in summary.items()} == {
        "train": (3, 3 * DRAWINGS),
        "val": (2, 2 * DRAWINGS),
        "test": (3, 3 * DRAWINGS),
    }


def test_the_upright_protocol_is_the_rotated_stores_rot000_rows(tmp_path, release, capsys):
    """omniglot-upright: Vinyals et al.'s split lists, one class per character, each image the very pixels of the
    rotated store's 0-degree copy (resized the same way), under the same identifier without its rotation suffix."""
    prepare(capsys, tmp_path, release["zips"], release["splits"], "omniglot-upright")
    prepare(capsys, tmp_path, release["zips"], release["splits"])
    upright = DatasetStore(tmp_path / "omniglot-upright.h5")
    rotated = DatasetStore(tmp_path / "omniglot.h5")
    for name, characters in (("train", 3), ("val", 2), ("test", 3)):
        plain, turned = upright.split(name), rotated.split(name)
        assert plain.class_names == [c.removesuffix("/rot000") for c in turned.class_names[::4]]
        assert len(plain.class_names) == characters and len(plain.image_ids) == characters * DRAWINGS
        rows = {image_id: i for i, image_id in enumerate(turned.image_ids)}
        for i, image_id in enumerate(plain.image_ids):
            assert "@" not in image_id
            j = rows[image_id + "@rot000"]
            assert torch.equal(plain.images[i], turned.images[j])
            assert plain.class_names[int(plain.labels[i])] + "/rot000" == turned.class_names[int(turned.labels[j])]


def test_the_model_sees_one_channel_as_ink_one_on_zero(tmp_path, release, capsys):
    prepare(capsys, tmp_path, release["zips"], release["splits"])
    store = DatasetStore(tmp_path / "omniglot.h5")
    pipeline = pipeline_for(RunConfig(dataset="omniglot"), store)
    images = store.split("test").images[:4].permute(0, 3, 1, 2)  # [R, 1, H, W]
    x = pipeline.images(images)
    assert x.shape == (4, 1, 28, 28)
    assert torch.allclose(x, 1 - images.float() / 255, atol=1e-6)


def test_a_truncated_zip_is_one_line_and_leaves_nothing(tmp_path, release, capsys):
    damaged = release["zips"] / "images_evaluation.zip"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    root = tmp_path / "root"
    code, err = cli(capsys, root, "data", "prepare", "omniglot", "--source", str(release["zips"]))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "images_evaluation.zip" in err and "download it again" in err
    assert not [p for p in root.glob("*") if not p.name.endswith(".lock")]


def test_a_missing_alphabet_is_named(tmp_path, release, capsys):
    for path in sorted((release["folders"] / "images_background" / "Beta").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (release["folders"] / "images_background" / "Beta").rmdir()
    root = tmp_path / "root"
    code, err = cli(
        capsys,
        root,
        "data",
        "prepare",
        "omniglot",
        "--source",
        str(release["folders"]),
        "--split-dir",
        str(release["splits"]),
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Beta/character01" in err and "val split" in err
    assert not list(root.glob("*.h5"))


def test_an_image_tree_that_is_not_omniglot_is_one_line(tmp_path, capsys):
    source = tmp_path / "photos"
    for image_set in ALPHABETS:
        (source / image_set).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(source / image_set / "cat.jpg")
    code, err = cli(capsys, tmp_path / "root", "data", "prepare", "omniglot", "--source", str(source))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no Omniglot character images" in err
    code, err = cli(capsys, tmp_path / "root", "data", "prepare", "omniglot", "--source", str(tmp_path))
    assert code == 2 and "no Omniglot" in err and len(err.strip().splitlines()) == 1, err


TINY = ["--device", "cpu", "--quiet", "--ways", "2", "--shots", "1", "--queries", "1", "--train-ways", "2",
        "--train-shots", "1", "--train-queries", "1", "--train-episodes", "2", "--val-every", "1",
        "--val-episodes", "2", "--eval-episodes", "4", "--meta-batch", "1"]  # fmt: skip


def test_colour_transformations_of_greyscale_data_are_refused(tmp_path, release, capsys):
    prepare(capsys, tmp_path, release["zips"], release["splits"])
    out = tmp_path / "run"
    code, err = cli(capsys, tmp_path, "run", "--dataset", "omniglot", "--transform", "color_perm", *TINY,
                    "--out", str(out))  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "color_perm" in err and "3-channel" in err and "has 1" in err
    assert "--transform rotation" in err
    assert not out.exists()


def test_random_turns_under_an_objective_that_labels_rotations_are_refused(tmp_path, release, capsys):
    prepare(capsys, tmp_path, release["zips"], release["splits"], "omniglot-upright")
    out = tmp_path / "run"
    for objective in ("sla", "mt"):
        code, err = cli(capsys, tmp_path, "run", "--dataset", "omniglot-upright", "--transform", "rotation",
                        "--objective", objective, "--augment-rotations", *TINY, "--out", str(out))  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--augment-rotations" in err and f"'{objective}'" in err and "--objective baseline or da" in err
        assert not out.exists()
    code, err = cli(capsys, tmp_path, "run", "--dataset", "omniglot-upright", "--transform", "none",
                    "--objective", "baseline", "--augment-rotations", *TINY, "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["config"]["augment_rotations"] is True


@pytest.mark.parametrize("transform", ["none", "rotation"])
@pytest.mark.parametrize("method", sorted(LEARNERS.names()))
def test_every_learner_trains_on_omniglot_with_and_without_sla(tmp_path, release, capsys, method, transform):
    prepare(capsys, tmp_path, release["zips"], release["splits"])
    objective = "sla" if transform == "rotation" else "baseline"
    out = tmp_path / "run"
    backbone = ["--backbone", "relation-conv4"] if method == "relationnet" else ["--backbone-option", "hidden=8"]
    flags = TINY
    if method == "pretrain":  # batches of single images of every training class: no training episode shape
        flags = [f for i, f in enumerate(TINY) if not (f.startswith("--train-") or TINY[i - 1].startswith("--train-"))]
        flags += ["--train-episodes", "2"]
    code, err = cli(capsys, tmp_path, "run", "--dataset", "omniglot", "--method", method, "--transform", transform,
                    "--objective", objective, *backbone, *flags, "--out", str(out))  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["normalization"] == {"mean": [1.0], "std": [-1.0]}
    published_by = {"protonet": "Snell", "matchingnet": "Vinyals", "relationnet": "Sung", "maml": "Finn"}
    assert published_by.get(method, "") in results["recipe"]["source"]
    assert 0 <= results["evaluation"]["accuracy"][results["evaluation"]["headline"]]["mean"] <= 100


@pytest.mark.slow
@pytest.mark.skipif(
    not REAL.is_dir(), reason="the Omniglot release is not in $FEWSHOT_SLA_TEST_DATA/omniglot (default ../shared/data)"
)
def test_the_real_release_gives_the_vinyals_lake_and_upright_splits(tmp_path, capsys):
    expected = {
        "omniglot": {"train": 4112, "val": 688, "test": 1692},
        "omniglot-lake": {"train": 806, "val": 158, "test": 659},
        "omniglot-upright": {"train": 1028, "val": 172, "test": 423},
    }
    for dataset, classes in expected.items():
        code, err = cli(capsys, tmp_path, "data", "prepare", dataset, "--source", str(REAL))
        assert code == 0, err
        store = DatasetStore(tmp_path / f"{dataset}.h5")
        splits = store.summary()["splits"]
        assert {s: v["classes"] for s, v in splits.items()} == classes
        assert {s: v["images"] for s, v in splits.items()} == {s: 20 * c for s, c in classes.items()}
        with h5py.File(store.path) as h5:
            assert h5["test"]["images"].shape[1:] == (28, 28, 1)
