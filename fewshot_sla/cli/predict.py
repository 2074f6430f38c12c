"""``fewshot-sla predict``: classify a folder of images with a trained run, given a few labelled examples.

The support folder holds one subfolder per class (its name is the class name; classes in sorted order) with a few
images each; the query folder holds the images to classify, loose or in subfolders named like support classes (then
the accuracy is printed with its 95% interval over the query images). Files are recognised as images as ``data
prepare`` recognises them (``importers/imagefolder.is_image_file``: an extension Pillow knows); other files are skipped
and counted in one note line, hidden ones (starting with ``.``) ignored. An image that Pillow cannot decode stops the
command with one line naming it, or is skipped and counted with ``--skip-bad``; a class folder left without images is
one line. Images are converted to RGB. The predictions go to a CSV file, written atomically; an existing one
(``predictions.csv`` by default) is replaced only with ``--overwrite``, checked before any model work.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
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


@dataclass
class Reader:
    """Reads image files as ``data prepare`` does, keeping what it skips: files that are not images (by extension)
    and, with ``skip_bad``, images Pillow cannot decode (without it, one is a UserError naming it)."""

    skip_bad: bool = False
    not_images: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    extensions: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        from fewshot_sla.data.importers.imagefolder import image_extensions

        self.extensions = self.extensions or image_extensions()

    def is_image(self, path: Path) -> bool:
        """Whether ``path`` is an image file by the rule of ``data prepare``; a file that is not is counted."""
        from fewshot_sla.data.importers.imagefolder import is_image_file

        if is_image_file(path, self.extensions):
            return True
        self.not_images.append(path)
        return False

    def read(self, paths: list[Path]) -> list[tuple[Path, np.ndarray]]:
        """The decodable images of ``paths`` with their pixels (RGB uint8 ``[H, W, 3]``)."""
        out = []
        for path in paths:
            image = self._read_image(path)
            if image is not None:
                out.append((path, image))
        return out

    def _read_image(self, path: Path) -> np.ndarray | None:
        from fewshot_sla.data.importers.common import BadImage, read_image_file

        try:
            return read_image_file(path)
        except BadImage as bad:
            if self.skip_bad:
                self.unreadable.append(path)
                return None
            reason = " ".join(bad.reason.split())
            raise UserError(
                f"cannot read the image {path} ({reason}); replace or remove it, or pass --skip-bad to skip it"
            ) from None

    def note(self) -> str | None:
        """One line counting the files skipped, with an example of each kind; None when none was."""
        parts = []
        if self.not_images:
            parts.append(f"{_not_images(len(self.not_images))} (e.g. {self.not_images[0]})")
        if self.unreadable:
            parts.append(f"{_unreadable(len(self.unreadable))} (--skip-bad; e.g. {self.unreadable[0]})")
        return f"note: skipped {' and '.join(parts)}" if parts else None


def _not_images(count: int) -> str:
    return f"{count} file that is not an image" if count == 1 else f"{count} files that are not images"


def _unreadable(count: int) -> str:
    return f"{count} unreadable image" if count == 1 else f"{count} unreadable images"


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
    p.add_argument(
        "--out",
        default="predictions.csv",
        metavar="FILE.csv",
        help="CSV file (default predictions.csv); an existing one is replaced only with --overwrite",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the --out file when it exists")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count) images Pillow cannot decode instead of stopping at the first one",
    )
    p.add_argument("--kind", help="prediction kind, e.g. ag, si, sd, plain (default: the run's headline kind)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="checkpoint (default best)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), auto, cuda or cuda:N")
    p.set_defaults(handler=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    """``fewshot-sla predict``: check the output file, read both folders, predict, write the CSV, print a summary."""
    out = Path(args.out)
    check_output(out, args.overwrite)
    reader = Reader(skip_bad=args.skip_bad)
    support = read_support(Path(args.support), reader)
    class_names = sorted({name for name in support.classes if name is not None})
    query = read_query(Path(args.query), class_names, reader)
    from fewshot_sla.trained import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, data_root=args.data_root)
    labels = [class_names.index(str(name)) for name in support.classes]
    probabilities = run.predict(support.images, labels, query.images, kind=args.kind).numpy()
    write_predictions(out, query.names, class_names, probabilities)
    print(summary(run, args.kind or run.headline, support, query, class_names, probabilities, out, reader.note()))
    return 0


def check_output(out: Path, overwrite: bool) -> None:
    """A UserError, before any reading or model work, when ``out`` is a folder, or a file and not ``overwrite``."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of a CSV file")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another file with --out")


def read_support(folder: Path, reader: Reader | None = None) -> ImageFolder:
    """The support images: one subfolder per class, at least two classes, none empty."""
    reader = reader or Reader()
    classes = _class_folders(folder, "support", reader)
    if len(classes) < 2:
        raise UserError(f"support folder {folder} has {len(classes)} class subfolder(s); give at least two classes")
    return _read_classes(folder, classes, reader)


def read_query(folder: Path, class_names: list[str], reader: Reader | None = None) -> ImageFolder:
    """The query images: loose files, or class subfolders named like support classes."""
    reader = reader or Reader()
    entries = _entries(folder, "query")
    if not any(entry.is_dir() for entry in entries):
        read = reader.read([e for e in entries if reader.is_image(e)])
        if not read:
            raise UserError(
                f"query folder {folder} holds no images{_skipped_hint(entries, reader)}; "
                "put the images to classify in it"
            )
        return ImageFolder([path.name for path, _ in read], [image for _, image in read], [None] * len(read))
    classes = _class_folders(folder, "query", reader)
    unknown = [name for name in classes if name not in class_names]
    if unknown:
        raise UserError(
            f"query class folder '{unknown[0]}' in {folder} is not a support class ({', '.join(class_names)}); "
            "rename or remove it"
        )
    return _read_classes(folder, classes, reader)


def _entries(folder: Path, what: str) -> list[Path]:
    """The entries of ``folder`` that are not hidden (``.`` first, as ``data prepare`` ignores them), sorted by name;
    a missing folder is a UserError."""
    from fewshot_sla.data.importers.imagefolder import is_hidden

    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist or is not a folder; give a folder of images")
    return sorted((p for p in folder.iterdir() if not is_hidden(p.name)), key=lambda p: p.name)


def _class_folders(folder: Path, what: str, reader: Reader) -> list[str]:
    """The class subfolders of ``folder``; an image file beside them is a UserError, another file is skipped."""
    entries = _entries(folder, what)
    loose = [p.name for p in entries if not p.is_dir() and reader.is_image(p)]
    if loose:
        raise UserError(
            f"{what} folder {folder} holds the file '{loose[0]}' beside class subfolders; move every image into "
            "the subfolder of its class"
        )
    return [p.name for p in entries if p.is_dir()]


def _read_classes(folder: Path, classes: list[str], reader: Reader) -> ImageFolder:
    """Every image of each class subfolder of ``folder``, class by class; a class left without images is a
    UserError."""
    names: list[str] = []
    images: list[np.ndarray] = []
    labels: list[str | None] = []
    for name in classes:
        files = _entries(folder / name, "class")
        nested = [p.name for p in files if p.is_dir()]
        if nested:
            raise UserError(f"class folder {folder / name} holds the folder '{nested[0]}'; keep only image files")
        read = reader.read([p for p in files if reader.is_image(p)])
        if not read:
            raise UserError(
                f"class folder {folder / name} holds no images{_skipped_hint(files, reader)}; "
                "add some or remove the folder"
            )
        names += [f"{name}/{path.name}" for path, _ in read]
        images += [image for _, image in read]
        labels += [name] * len(read)
    return ImageFolder(names, images, labels)


def _skipped_hint(files: list[Path], reader: Reader) -> str:
    """For a folder none of whose ``files`` gave an image, what was skipped there: `` (skipped 2 files that are not
    images)``; nothing for an empty folder."""
    unreadable = sum(path in reader.unreadable for path in files)
    others = len(files) - unreadable
    kinds = ([_not_images(others)] if others else []) + ([_unreadable(unreadable)] if unreadable else [])
    return f" (skipped {' and '.join(kinds)})" if kinds else ""


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
    note: str | None = None,
) -> str:
    """What the command prints: the run and kind, the episode's size, the accuracy (labelled queries), the CSV."""
    from fewshot_sla.prediction_kinds import kind_label

    cfg = run.config
    lines = [
        f"{cfg.method} / {cfg.backbone} from {run.path} ({run.checkpoint} checkpoint, step {run.step}), "
        f"prediction {kind_label(kind)}",
        f"support: {len(class_names)} classes, {len(support.images)} images; query: {len(query.images)} images",
    ]
    if note:
        lines.append(note)
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
