"""Using a trained run: ``load_run(...).predict`` against the evaluation path, its input formats, the ``predict``
command's CSV and accuracy, and every bad input (one line, exit code 2, no CSV)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_sla import TrainedRun, load_run
from fewshot_sla.cli import main
from fewshot_sla.config import load_config
from fewshot_sla.data.catalog import open_store
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import build_model, pipeline_for
from fewshot_sla.engine.stats import summarize
from fewshot_sla.episodes import EpisodeBatch, EpisodeSampler, EpisodeSpec
from fewshot_sla.errors import UserError
from fewshot_sla.results import RunPaths

TINY = [
    "--device",
    "cpu",
    "--quiet",
    "--train-episodes",
    "4",
    "--val-every",
    "4",
    "--val-episodes",
    "4",
    "--eval-episodes",
    "4",
    "--queries",
    "3",
    "--train-queries",
    "3",
    "--image-size",
    "16",  # the store's images are 32 x 32: evaluation resizes them, so must predict
]
SPEC = EpisodeSpec(ways=5, shots=2, queries=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A tiny finished run (ProtoNet, Conv-4, rotation SLA) on the synthetic set."""
    out = tmp_path_factory.mktemp("predict-runs") / "run"
    with redirect_stdout(io.StringIO()):
        assert main(["--data-root", str(data_root), "run", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(run_dir: Path, data_root: Path) -> TrainedRun:
    return load_run(run_dir, data_root=data_root)


@pytest.fixture(scope="module")
def test_split(data_root: Path) -> Split:
    return open_store("synthetic", data_root).split("test")


@pytest.fixture(scope="module")
def episode(test_split: Split) -> EpisodeBatch:
    """One 5-way 2-shot 3-query test episode drawn from the store."""
    return EpisodeSampler(test_split, SPEC, seed=7).sample(1)


def support_and_query(split: Split, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The episode's support images, labels and query images as the store holds them (uint8 NHWC)."""
    return split.images[batch.support_index[0]], batch.support_labels[0], split.images[batch.query_index[0]]


def evaluation_probabilities(run_dir: Path, data_root: Path, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
    """Softmax of the suite's own evaluation path on ``batch``: the best checkpoint in a freshly built model, the
    run's image pipeline, ``objective.predict``."""
    cfg = load_config(RunPaths(run_dir).config)
    pipeline = pipeline_for(cfg, open_store(cfg.dataset, data_root))
    learner, objective = build_model(cfg, pipeline.image_size, torch.device("cpu"))
    state = torch.load(RunPaths(run_dir).best_checkpoint, map_location="cpu", weights_only=True)
    learner.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])
    learner.eval()
    objective.eval()
    with torch.no_grad():
        logits = objective.predict(learner, pipeline.episode(batch))
    return {kind: torch.softmax(value[0].float(), dim=-1) for kind, value in logits.items()}


# --- the Python API ---------------------------------------------------------------------------------------------


def test_predict_equals_the_evaluation_path_for_every_kind(
    trained: TrainedRun, run_dir: Path, data_root: Path, test_split: Split, episode: EpisodeBatch
) -> None:
    expected = evaluation_probabilities(run_dir, data_root, episode)
    assert set(expected) == set(trained.kinds) == {"si", "ag"}
    support, labels, query = support_and_query(test_split, episode)
    for kind, reference in expected.items():
        probabilities = trained.predict(support, labels, query, kind=kind)
        assert probabilities.shape == (SPEC.ways * SPEC.queries, SPEC.ways)
        assert probabilities.dtype == torch.float32
        torch.testing.assert_close(probabilities, reference, atol=1e-5, rtol=0)
        assert torch.equal(probabilities.argmax(dim=1), reference.argmax(dim=1))
    assert trained.headline == "ag"
    assert torch.equal(trained.predict(support, labels, query), trained.predict(support, labels, query, kind="ag"))


def test_the_model_is_in_eval_mode_and_keeps_no_graph(
    trained: TrainedRun, test_split: Split, episode: EpisodeBatch
) -> None:
    probabilities = trained.predict(*support_and_query(test_split, episode))
    assert not trained.learner.training and not trained.objective.training
    assert not probabilities.requires_grad
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(probabilities.shape[0]))


def test_uint8_float_and_layouts_give_the_same_probabilities(
    trained: TrainedRun, test_split: Split, episode: EpisodeBatch
) -> None:
    support, labels, query = support_and_query(test_split, episode)
    reference = trained.predict(support, labels, query)
    as_float = trained.predict(support.numpy() / 255.0, labels.numpy(), query.float() / 255)
    channels_first = trained.predict(support.permute(0, 3, 1, 2), labels.tolist(), query.permute(0, 3, 1, 2))
    as_list = trained.predict(list(support.numpy()), labels.tolist(), [Image.fromarray(q.numpy()) for q in query])
    for other in (as_float, channels_first, as_list):
        assert torch.equal(other, reference)


def _resized(images: torch.Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    return [np.asarray(Image.fromarray(image.numpy()).resize(size, Image.Resampling.BICUBIC)) for image in images]


def test_images_of_other_sizes_are_brought_to_the_store_size(
    trained: TrainedRun, test_split: Split, episode: EpisodeBatch
) -> None:
    support, labels, query = support_and_query(test_split, episode)
    big_support, big_query = _resized(support, (48, 40)), _resized(query, (48, 40))
    big = trained.predict(np.stack(big_support), labels, np.stack(big_query))
    assert big.shape == (query.shape[0], SPEC.ways)
    torch.testing.assert_close(big.sum(dim=1), torch.ones(query.shape[0]))
    as_float = trained.predict(
        [s / 255.0 for s in big_support], labels, [q.astype(np.float32) / 255 for q in big_query]
    )
    assert torch.equal(as_float, big)
    # ProtoNet classifies each query on its own: resizing one query image leaves the other rows unchanged.
    reference = trained.predict(support, labels, query)
    mixed = trained.predict(support, labels, [*query[:-1], big_query[-1]])
    assert torch.equal(mixed[:-1], reference[:-1])
    assert not torch.equal(mixed[-1], reference[-1])


def test_the_last_checkpoint_loads_too(run_dir: Path, data_root: Path, trained: TrainedRun) -> None:
    last = load_run(run_dir, "last", data_root=data_root)
    assert last.checkpoint == "last" and last.step >= trained.step
    assert last.pipeline == trained.pipeline
    assert (last.pipeline.image_size, last.pipeline.store_size) == (16, 32)


def _bad_predictions(trained: TrainedRun, split: Split, batch: EpisodeBatch) -> dict[str, Callable[[], Any]]:
    support, labels, query = support_and_query(split, batch)
    one_class = labels == 0
    return {
        "a 2-D array": lambda: trained.predict(support[:, :, :, 0], labels, query),
        "grey images": lambda: trained.predict(list(support[:, :, :, :1]), labels, query),
        "no query images": lambda: trained.predict(support, labels, query[:0]),
        "a label per image": lambda: trained.predict(support, labels[:-1], query),
        "integers": lambda: trained.predict(support, np.array([str(v) for v in labels.tolist()]), query),
        "no gaps": lambda: trained.predict(support, labels * 2, query),
        "at least two classes": lambda: trained.predict(support[one_class], labels[one_class], query),
        "outside [0, 1]": lambda: trained.predict(support.float(), labels, query),
        "uint8": lambda: trained.predict(support.long(), labels, query),
        "choose one of: si, ag": lambda: trained.predict(support, labels, query, kind="sd"),
    }


@pytest.mark.parametrize(
    "fix",
    [
        "a 2-D array",
        "grey images",
        "no query images",
        "a label per image",
        "integers",
        "no gaps",
        "at least two classes",
        "outside [0, 1]",
        "uint8",
        "choose one of: si, ag",
    ],
)
def test_bad_input_to_predict_is_one_line(
    fix: str, trained: TrainedRun, test_split: Split, episode: EpisodeBatch
) -> None:
    call = _bad_predictions(trained, test_split, episode)[fix]
    with pytest.raises(UserError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    expected = {
        "a 2-D array": "give [N, H, W, 3]",
        "grey images": "convert other images to RGB",
        "no query images": "query_images holds no images",
        "a label per image": "give one label per support image",
        "integers": "must be integers 0..N-1",
        "no gaps": "with no gaps",
        "at least two classes": "at least two classes",
        "outside [0, 1]": "divide 0..255 images by 255",
        "uint8": "give uint8 images",
        "choose one of: si, ag": "choose one of: si, ag",
    }[fix]
    assert expected in message


def test_load_run_refuses_what_is_not_a_finished_run(tmp_path: Path, run_dir: Path, data_root: Path) -> None:
    with pytest.raises(UserError, match="is not a finished run"):
        load_run(tmp_path, data_root=data_root)
    with pytest.raises(UserError, match="checkpoint must be one of best, last"):
        load_run(run_dir, "worst", data_root=data_root)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "best.pt").unlink()
    with pytest.raises(UserError, match=r"best\.pt is missing"):
        load_run(copy, data_root=data_root)


def test_load_run_needs_no_store_when_results_record_the_image_sizes(
    tmp_path: Path, run_dir: Path, trained: TrainedRun, test_split: Split, episode: EpisodeBatch
) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["image_size"], results["store_image_size"]) == (16, 32)
    alone = load_run(run_dir, data_root=tmp_path / "no-stores-here")
    assert not (tmp_path / "no-stores-here").exists()
    inputs = support_and_query(test_split, episode)
    assert torch.equal(alone.predict(*inputs), trained.predict(*inputs))


def test_an_older_run_needs_its_own_store(tmp_path: Path, run_dir: Path) -> None:
    older = tmp_path / "older"
    shutil.copytree(run_dir, older)
    results = json.loads((older / "results.json").read_text())
    del results["image_size"], results["store_image_size"]  # as results.json files from before they were recorded
    (older / "results.json").write_text(json.dumps(results))
    other = tmp_path / "other-root"
    from fewshot_sla.data import synthetic

    with pytest.MonkeyPatch.context() as patch:  # another synthetic store: same size, other content
        patch.setattr(synthetic, "IMAGES_PER_CLASS", 4)
        open_store("synthetic", other)
    with pytest.raises(UserError, match=r"is not the one .* was trained on") as raised:
        load_run(older, data_root=other)
    assert "\n" not in str(raised.value)


# --- the command line -------------------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], data_root: Path, *args: str) -> tuple[int, str, str]:
    try:
        code = main(["--data-root", str(data_root), "predict", *args])
    except SystemExit as stop:  # argparse's own errors
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def class_name(split: Split, batch: EpisodeBatch, row: int) -> str:
    """The store class name of support row ``row`` of the episode."""
    return split.class_names[int(split.labels[batch.support_index[0, row]])]


@pytest.fixture
def folders(tmp_path: Path, test_split: Split, episode: EpisodeBatch) -> dict[str, Any]:
    """The episode written as PNG files: ``support/<class>/<k>.png`` and ``query/<class>/<q>.png``, and what the
    API gets for the same images in the command's reading order (classes sorted, then files by name)."""
    names = [class_name(test_split, episode, n * SPEC.shots) for n in range(SPEC.ways)]
    order = sorted(names)
    support: dict[str, list[np.ndarray]] = {name: [] for name in order}
    query: dict[str, list[np.ndarray]] = {name: [] for name in order}
    for row, index in enumerate(episode.support_index[0].tolist()):
        support[names[row // SPEC.shots]].append(test_split.images[index].numpy())
    for row, index in enumerate(episode.query_index[0].tolist()):
        query[names[row // SPEC.queries]].append(test_split.images[index].numpy())
    for folder, images in (("support", support), ("query", query)):
        for name, items in images.items():
            (tmp_path / folder / name).mkdir(parents=True)
            for i, image in enumerate(items):
                Image.fromarray(image).save(tmp_path / folder / name / f"{i:02d}.png")
    return {
        "root": tmp_path,
        "classes": order,
        "support": [image for name in order for image in support[name]],
        "labels": [order.index(name) for name in order for _ in support[name]],
        "query": [image for name in order for image in query[name]],
        "query_names": [f"{name}/{i:02d}.png" for name in order for i in range(len(query[name]))],
        "truth": [order.index(name) for name in order for _ in query[name]],
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_command_writes_the_apis_predictions_and_the_accuracy(
    capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, trained: TrainedRun, folders: dict[str, Any]
) -> None:
    root, classes = folders["root"], folders["classes"]
    out = root / "results" / "predictions.csv"
    code, printed, err = cli(
        capsys, data_root, str(run_dir), "--support", str(root / "support"), "--query", str(root / "query"),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    expected = trained.predict(folders["support"], folders["labels"], folders["query"]).numpy()
    rows = read_csv(out)
    assert list(rows[0]) == ["image", "predicted", "probability", *classes]
    assert [row["image"] for row in rows] == folders["query_names"]
    assert [row["predicted"] for row in rows] == [classes[i] for i in expected.argmax(axis=1)]
    got = np.array([[float(row[name]) for name in classes] for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose([float(row["probability"]) for row in rows], expected.max(axis=1), atol=1e-6)
    correct = (expected.argmax(axis=1) == np.array(folders["truth"])).astype(float)
    stats = summarize(correct).scaled(100.0)
    assert f"accuracy: {stats.mean:.2f}% +- {stats.ci95:.2f} (95% CI) over {len(correct)} query images" in printed
    assert "prediction SLA+AG" in printed and str(out) in printed
    assert not list(out.parent.glob("*.tmp"))


def test_loose_query_images_get_predictions_but_no_accuracy(
    capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, trained: TrainedRun, folders: dict[str, Any]
) -> None:
    root = folders["root"]
    loose = root / "loose"
    loose.mkdir()
    for name, image in zip(folders["query_names"], folders["query"]):
        Image.fromarray(image).save(loose / name.replace("/", "_"))
    out = root / "loose.csv"
    code, printed, err = cli(
        capsys, data_root, str(run_dir), "--support", str(root / "support"), "--query", str(loose),
        "--out", str(out), "--kind", "si", "--checkpoint", "last",
    )  # fmt: skip
    assert code == 0, err
    last = load_run(run_dir, "last", data_root=data_root)
    expected = last.predict(folders["support"], folders["labels"], folders["query"], kind="si").numpy()
    rows = read_csv(out)
    assert [row["image"] for row in rows] == [name.replace("/", "_") for name in folders["query_names"]]
    got = np.array([[float(row[name]) for name in folders["classes"]] for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert "accuracy" not in printed and "prediction SLA+SI" in printed and "last checkpoint" in printed


def _break(case: str, root: Path, classes: list[str]) -> dict[str, Path]:
    """Damage the folders of ``folders`` as ``case`` says; returns the RUN, --support and --query to pass."""
    paths = {"support": root / "support", "query": root / "query"}
    if case == "missing support folder":
        paths["support"] = root / "nowhere"
    elif case == "missing query folder":
        paths["query"] = root / "nowhere"
    elif case == "empty class folder":
        (root / "support" / "zz-empty").mkdir()
    elif case == "unreadable image":
        (root / "support" / classes[0] / "broken.png").write_bytes(b"not a PNG file")
    elif case == "query class not in support":
        (root / "query" / classes[0]).rename(root / "query" / "unknown-class")
    elif case == "support with one class":
        for name in classes[1:]:
            shutil.rmtree(root / "support" / name)
    elif case == "loose support file":
        shutil.copy(next((root / "support" / classes[0]).iterdir()), root / "support" / "stray.png")
    return paths


BAD_CASES = {
    "missing support folder": "support folder",
    "missing query folder": "query folder",
    "empty class folder": "holds no images",
    "unreadable image": "cannot read the image",
    "query class not in support": "is not a support class",
    "support with one class": "give at least two classes",
    "loose support file": "beside class subfolders",
    "not a finished run": "is not a finished run",
    "unknown kind": "prediction kind 'sd'",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_no_csv(
    case: str, capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, folders: dict[str, Any]
) -> None:
    root = folders["root"]
    paths = _break(case, root, folders["classes"])
    run = root / "empty-folder" if case == "not a finished run" else run_dir
    run.mkdir(exist_ok=True)
    extra = ["--kind", "sd"] if case == "unknown kind" else []
    out = root / "out" / "predictions.csv"
    code, printed, err = cli(
        capsys, data_root, str(run), "--support", str(paths["support"]), "--query", str(paths["query"]),
        "--out", str(out), *extra,
    )  # fmt: skip
    assert code == 2
    assert err.startswith("fewshot-sla: error: ") and err.count("\n") == 1, err
    assert BAD_CASES[case] in err and "Traceback" not in err
    assert printed == ""
    assert not out.exists() and not list(root.rglob("*.tmp"))


# --- files that are not images, damaged images (--skip-bad), an existing output file (--overwrite) ---------------


def _api_rows(trained: TrainedRun, folders: dict[str, Any]) -> np.ndarray:
    return trained.predict(folders["support"], folders["labels"], folders["query"]).numpy()


def _assert_predictions(out: Path, folders: dict[str, Any], expected: np.ndarray) -> None:
    rows = read_csv(out)
    assert [row["image"] for row in rows] == folders["query_names"]
    got = np.array([[float(row[name]) for name in folders["classes"]] for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_files_that_are_not_images_are_skipped_and_counted_in_one_note(
    capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, trained: TrainedRun, folders: dict[str, Any]
) -> None:
    root, classes = folders["root"], folders["classes"]
    (root / "support" / classes[0] / "notes.txt").write_text("taken on a sunny day")
    (root / "support" / "README.md").write_text("one folder per class")  # beside the class folders
    (root / "query" / classes[1] / "labels.csv").write_text("a,b\n")
    (root / "query" / classes[1] / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, not counted
    out = root / "predictions.csv"
    code, printed, err = cli(
        capsys, data_root, str(run_dir), "--support", str(root / "support"), "--query", str(root / "query"),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    _assert_predictions(out, folders, _api_rows(trained, folders))
    notes = [line for line in printed.splitlines() if "skipped" in line]
    assert len(notes) == 1 and notes[0].startswith("note: skipped 3 files that are not images (e.g. "), printed
    assert "support: 5 classes, 10 images; query: 15 images" in printed


def test_loose_query_files_that_are_not_images_are_skipped(
    capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, folders: dict[str, Any]
) -> None:
    root = folders["root"]
    loose = root / "loose"
    loose.mkdir()
    Image.fromarray(folders["query"][0]).save(loose / "a.png")
    (loose / "b.txt").write_text("not an image")
    out = root / "loose.csv"
    code, printed, err = cli(
        capsys, data_root, str(run_dir), "--support", str(root / "support"), "--query", str(loose), "--out", str(out)
    )
    assert code == 0, err
    assert [row["image"] for row in read_csv(out)] == ["a.png"]
    assert f"note: skipped 1 file that is not an image (e.g. {loose / 'b.txt'})" in printed


@pytest.mark.parametrize("where", ["support", "query"])
def test_a_damaged_image_is_one_line_naming_it_and_suggesting_skip_bad(
    where: str, capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, folders: dict[str, Any]
) -> None:
    root, classes = folders["root"], folders["classes"]
    broken = root / where / classes[1] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    out = root / "out.csv"
    code, printed, err = cli(
        capsys, data_root, str(run_dir), "--support", str(root / "support"), "--query", str(root / "query"),
        "--out", str(out),
    )  # fmt: skip
    assert code == 2 and printed == "" and not out.exists()
    assert err.startswith("fewshot-sla: error: cannot read the image ") and err.count("\n") == 1, err
    assert str(broken) in err and "--skip-bad" in err


def test_skip_bad_skips_and_counts_damaged_images(
    capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, trained: TrainedRun, folders: dict[str, Any]
) -> None:
    root, classes = folders["root"], folders["classes"]
    (root / "support" / classes[0] / "broken.png").write_bytes(b"not a PNG file")
    (root / "query" / classes[2] / "zz.jpg").write_bytes(b"")
    (root / "query" / classes[2] / "zz.txt").write_text("and one that is not an image")
    out = root / "predictions.csv"
    code, printed, err = cli(
        capsys, data_root, str(run_dir), "--support", str(root / "support"), "--query", str(root / "query"),
        "--out", str(out), "--skip-bad",
    )  # fmt: skip
    assert code == 0, err
    _assert_predictions(out, folders, _api_rows(trained, folders))
    notes = [line for line in printed.splitlines() if "skipped" in line]
    assert len(notes) == 1, printed
    assert notes[0].startswith("note: skipped 1 file that is not an image (e.g. ")
    assert " and 2 unreadable images (--skip-bad; e.g. " in notes[0]


@pytest.mark.parametrize("content", ["not an image", "damaged image"])
def test_a_class_folder_left_empty_after_skipping_is_one_line(
    content: str, capsys: pytest.CaptureFixture[str], data_root: Path, run_dir: Path, folders: dict[str, Any]
) -> None:
    root, classes = folders["root"], folders["classes"]
    folder = root / "support" / classes[3]
    for image in folder.iterdir():
        image.unlink()
    if content == "not an image":
        (folder / "notes.txt").write_text("the images are elsewhere")
        expected = "holds no images (skipped 1 file that is not an image)"
    else:
        (folder / "a.png").write_bytes(b"truncated")
        (folder / "b.png").write_bytes(b"truncated")
        expected = "holds no images (skipped 2 unreadable images)"
    out = root / "out.csv"
    code, printed, err = cli(
        capsys, data_root, str(run_dir), "--support", str(root / "support"), "--query", str(root / "query"),
        "--out", str(out), "--skip-bad",
    )  # fmt: skip
    assert code == 2 and printed == "" and not out.exists()
    assert err.startswith("fewshot-sla: error: ") and err.count("\n") == 1, err
    assert f"class folder {folder} {expected}" in err


def test_an_existing_output_file_is_kept_without_overwrite_before_any_model_work(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    data_root: Path,
    run_dir: Path,
    trained: TrainedRun,
    folders: dict[str, Any],
) -> None:
    root = folders["root"]
    monkeypatch.chdir(root)
    default = root / "predictions.csv"
    default.write_text("earlier predictions\n")
    given = root / "mine.csv"
    given.write_text("my own file\n")
    import fewshot_sla.trained

    def no_model(*args: Any, **kwargs: Any) -> TrainedRun:
        raise AssertionError("the output file must be checked before the run is loaded")

    folder_args = ["--support", str(root / "support"), "--query", str(root / "query")]
    with monkeypatch.context() as patch:
        patch.setattr(fewshot_sla.trained, "load_run", no_model)
        for out, extra in ((default, []), (given, ["--out", str(given)])):
            code, printed, err = cli(capsys, data_root, str(run_dir), *folder_args, *extra)
            assert code == 2 and printed == "", err
            assert err.startswith("fewshot-sla: error: ") and err.count("\n") == 1, err
            assert str(out.name) in err and "--overwrite" in err
    assert default.read_text() == "earlier predictions\n" and given.read_text() == "my own file\n"
    code, printed, err = cli(capsys, data_root, str(run_dir), *folder_args, "--overwrite")
    assert code == 0, err
    _assert_predictions(default, folders, _api_rows(trained, folders))
    assert given.read_text() == "my own file\n"
