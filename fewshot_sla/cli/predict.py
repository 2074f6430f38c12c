"""``fewshot-sla predict``: classify a folder of images with a trained run, given a few labelled examples.

The support folder holds one subfolder per class (its name is the class name; classes in sorted order) with a few
images each; the query folder holds the images to classify, loose or in subfolders named like support classes (then
the accuracy is printed with its 95% interval over the query images). Every file not starting with ``.`` is read as
an image (Pillow, converted to RGB). The predictions go to a CSV file, written atomically.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fewshot_sla.errors import UserError

if TYPE_CHECKING:
    from fewshot_sla.trained import TrainedRun


@dataclass(frozen=True)
class ImageFolder:
    """Images read from a folder: each one's path relative to the folder, its pixels, and its class (or None)."""

    names: list[str]
    images: list[np.ndarray]
    classes: list[str | None]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` sub-command."""
    p = subparsers.add_parser(
        "predict",
        help="classify images with a trained run, given a few labelled examples",
        description="Classify the images of --query with a finished run, the classes given by a few examples each "
        "in the subfolders of --support, and write the predictions and class probabilities to a CSV file.",
    )
    p.add_argument("run_dir", metavar="RUN", help="folder of a finished run (made by 'fewshot-sla run')")
    p.add_argument("--support", required=True, metavar="DIR", help="one subfolder of example images per class")
    p.add_argument(
        "--query",
        required=True,
        metavar="DIR",
        help="images to classify: loose, or in subfolders named like the support classes (then the accuracy "
        "is printed)",
    )
    p.add_argument("--out", default="predictions.csv", metavar="FILE.csv", help="CSV file (default predictions.csv)")
    p.add_argument("--kind", help="prediction kind, e.g. ag, si, sd, plain (default: the run's headline kind)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="checkpoint (default best)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), auto, cuda or cuda:N")
    p.set_defaults(handler=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    """``fewshot-sla predict``: read both folders, predict, write the CSV, print a summary."""
    support = read_support(Path(args.support))
    class_names = sorted({name for name in support.classes if name is not None})
    query = read_query(Path(args.query), class_names)
    from fewshot_sla.trained import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, data_root=args.data_root)
    labels = [class_names.index(str(name)) for name in support.classes]
    probabilities = run.predict(support.images, labels, query.images, kind=args.kind).numpy()
    write_predictions(Path(args.out), query.names, class_names, probabilities)
    print(summary(run, args.kind or run.headline, support, query, class_names, probabilities, Path(args.out)))
    return 0


def read_support(folder: Path) -> ImageFolder:
    """The support images: one subfolder per class, at least two classes, none empty."""
    classes = _class_folders(folder, "support")
    if len(classes) < 2:
        raise UserError(f"support folder {folder} has {len(classes)} class subfolder(s); give at least two classes")
    return _read_classes(folder, classes)


def read_query(folder: Path, class_names: list[str]) -> ImageFolder:
    """The query images: loose files, or class subfolders named like support classes."""
    entries = _entries(folder, "query")
    if not any(entry.is_dir() for entry in entries):
        if not entries:
            raise UserError(f"query folder {folder} holds no images; put the images to classify in it")
        return ImageFolder([e.name for e in entries], [_read_image(e) for e in entries], [None] * len(entries))
    classes = _class_folders(folder, "query")
    unknown = [name for name in classes if name not in class_names]
    if unknown:
        raise UserError(
            f"query class folder '{unknown[0]}' in {folder} is not a support class ({', '.join(class_names)}); "
            "rename or remove it"
        )
    return _read_classes(folder, classes)


def _entries(folder: Path, what: str) -> list[Path]:
    """The entries of ``folder`` not starting with ``.``, sorted by name; a missing folder is a UserError."""
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist or is not a folder; give a folder of images")
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _class_folders(folder: Path, what: str) -> list[str]:
    """The class subfolders of ``folder``; a file beside them is a UserError."""
    entries = _entries(folder, what)
    loose = [p.name for p in entries if not p.is_dir()]
    if loose:
        raise UserError(
            f"{what} folder {folder} holds the file '{loose[0]}' beside class subfolders; move every image into "
            "the subfolder of its class"
        )
    return [p.name for p in entries]


def _read_classes(folder: Path, classes: list[str]) -> ImageFolder:
    """Every image of each class subfolder of ``folder``, class by class."""
    names: list[str] = []
    images: list[np.ndarray] = []
    labels: list[str | None] = []
    for name in classes:
        files = _entries(folder / name, "class")
        if not files:
            raise UserError(f"class folder {folder / name} holds no images; add some or remove the folder")
        nested = [p.name for p in files if p.is_dir()]
        if nested:
            raise UserError(f"class folder {folder / name} holds the folder '{nested[0]}'; keep only image files")
        names += [f"{name}/{p.name}" for p in files]
        images += [_read_image(p) for p in files]
        labels += [name] * len(files)
    return ImageFolder(names, images, labels)


def _read_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 ``[H, W, 3]``; one Pillow cannot read is a UserError naming it."""
    from fewshot_sla.data.importers.common import BadImage, read_image_file

    try:
        return read_image_file(path)
    except BadImage as bad:
        reason = " ".join(bad.reason.split())
        raise UserError(f"cannot read the image {path} ({reason}); remove it or save it as PNG or JPEG") from None


def write_predictions(out: Path, names: list[str], class_names: list[str], probabilities: np.ndarray) -> None:
    """The CSV: ``image,predicted,probability`` and one probability column per class, written atomically."""
    from fewshot_sla.atomic import atomic_path

    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "predicted", "probability", *class_names])
        for name, row in zip(names, probabilities):
            best = int(row.argmax())
            writer.writerow([name, class_names[best], f"{row[best]:.6f}", *(f"{p:.6f}" for p in row)])


def summary(
    run: TrainedRun,
    kind: str,
    support: ImageFolder,
    query: ImageFolder,
    class_names: list[str],
    probabilities: np.ndarray,
    out: Path,
) -> str:
    """What the command prints: the run and kind, the episode's size, the accuracy (labelled queries), the CSV."""
    from fewshot_sla.prediction_kinds import kind_label

    cfg = run.config
    lines = [
        f"{cfg.method} / {cfg.backbone} from {run.path} ({run.checkpoint} checkpoint, step {run.step}), "
        f"prediction {kind_label(kind)}",
        f"support: {len(class_names)} classes, {len(support.images)} images; query: {len(query.images)} images",
    ]
    if query.classes[0] is not None:
        lines.append(accuracy_line(query, class_names, probabilities))
    lines.append(f"predictions: {out}")
    return "\n".join(lines)


def accuracy_line(query: ImageFolder, class_names: list[str], probabilities: np.ndarray) -> str:
    """The accuracy over the labelled query images with its 95% interval (each image's correctness a sample)."""
    from fewshot_sla.engine.stats import summarize

    truth = np.array([class_names.index(str(name)) for name in query.classes])
    correct = (probabilities.argmax(axis=1) == truth).astype(np.float64)
    stats = summarize(correct).scaled(100.0)
    interval = f"+- {stats.ci95:.2f} (95% CI)" if stats.n > 1 else "(no interval for one image)"
    return f"accuracy: {stats.mean:.2f}% {interval} over {stats.n} query images"
