"""``fewshot-sla data prepare|info``: build dataset stores from raw downloads and show what is prepared."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fewshot_sla.data.catalog import open_store, prepare_command, user_datasets
from fewshot_sla.data.importers.common import DEFAULT_RESIZE_FILTER, RESIZE_FILTERS
from fewshot_sla.data.prepare import LAYOUTS, prepare
from fewshot_sla.data.root import resolve_data_root
from fewshot_sla.data.store import DatasetStore, store_path
from fewshot_sla.errors import UserError, render
from fewshot_sla.registry import ALL_REGISTRIES, DATASETS

# The help texts a parser fills in only when its help is shown: action -> a function making its text.
HelpTexts = dict[argparse.Action, Callable[[], str]]


class _HelpFromRegistries(argparse.Action):
    """``-h/--help`` that first sets the help texts naming registered entries, built-in and plug-ins', so that
    building the parser loads no registry and no plug-in (a broken plug-in fails only its own help)."""

    def __init__(self, option_strings: Sequence[str], dest: str, texts: HelpTexts, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)
        self.texts = texts

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        from fewshot_sla.cli import EXIT_USER_ERROR

        try:
            for action, text in self.texts.items():
                action.help = text()
        except UserError as err:  # a plug-in that fails to load
            parser.exit(EXIT_USER_ERROR, f"fewshot-sla: error: {err}\n")
        parser.print_help()
        parser.exit()


def help_from_registries(parser: argparse.ArgumentParser) -> HelpTexts:
    """Give ``parser`` (made with ``add_help=False``) its ``-h/--help``, which first sets the help of each action
    in the returned mapping from its function; add entries as the actions are made (see ``listed_help``)."""
    texts: HelpTexts = {}
    parser.add_argument("-h", "--help", action=_HelpFromRegistries, texts=texts, help="show this help message and exit")
    return texts


class _RegisteredNames(dict[str, str]):
    """``{kind}`` -> the registered names of that kind (a key of ``ALL_REGISTRIES``), looked up on first use."""

    def __missing__(self, kind: str) -> str:
        self[kind] = ", ".join(ALL_REGISTRIES[kind].names())
        return self[kind]


def listed_help(texts: HelpTexts, action: argparse.Action, template: str) -> None:
    """Help of ``action``: ``template`` with each ``{kind}`` (``{learners}``, ``{datasets}``, ...) the registered
    names of that kind once help is shown; until then it names the listing command."""
    action.help = template.format_map({kind: f"see 'fewshot-sla list {kind}'" for kind in ALL_REGISTRIES})
    texts[action] = lambda: template.format_map(_RegisteredNames())


def _stored_sizes() -> str:
    """Each registered dataset with the side of its stored images, e.g. ``cub 84, fc100 32``."""
    return ", ".join(f"{name} {info.image_size}" for name, info in DATASETS.items())


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_integer(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1)


def _seed(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command family."""
    parser = subparsers.add_parser(
        "data",
        help="prepare dataset stores from raw downloads; show prepared datasets",
        description="Dataset stores live in the data root (--data-root, else $FEWSHOT_SLA_DATA, else "
        "~/.cache/fewshot-sla), one HDF5 file per dataset.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    prep = actions.add_parser(
        "prepare",
        help="build a dataset's store from its raw files (the synthetic set needs none)",
        description="Detect which raw layout --source holds, read it, resize the images and write "
        "<data root>/<DATASET>.h5. Safe to re-run: an up-to-date store is reused.",
        add_help=False,
    )
    texts = help_from_registries(prep)
    listed_help(
        texts,
        prep.add_argument("dataset", metavar="DATASET"),
        "a new name for your own images (with --layout imagefolder), or a registered dataset: {datasets}",
    )
    prep.add_argument("--source", metavar="PATH", help="folder holding the raw dataset (not for synthetic)")
    size = prep.add_argument(
        "--image-size",
        type=positive_integer,
        metavar="PIXELS",
        help="side of the stored square images, 84 for your own images (default: the dataset's standard size)",
    )
    texts[size] = lambda: (
        "side of the stored square images, 84 for your own images (default: the dataset's standard "
        f"size: {_stored_sizes()})"
    )
    prep.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="prepare your own images under a new DATASET name: imagefolder = --source DIR holding one "
        "subfolder of images per class (DIR/<class>/*.jpg|png|...), identifiers the paths relative to DIR; torch = "
        "--source MODULE:FACTORY, a function returning a map-style torch Dataset of (image, label) items, "
        "identifiers the item indices (the dataset is read anew on every prepare); hf = --source DIR, a Hugging "
        "Face datasets folder (save_to_disk, or parquet files) with an Image and a ClassLabel column",
    )
    prep.add_argument(
        "--split-file",
        metavar="FILE.csv",
        help="(imagefolder) the class split: CSV rows 'class,split' (split: train, val or test; optional header "
        "'class,split'; '#' comments), every class folder listed once, at least 2 classes per split",
    )
    prep.add_argument(
        "--split-fractions",
        metavar="TRAIN,VAL,TEST",
        help="(imagefolder, without --split-file) fractions of the classes per split (default 0.64,0.16,0.20): "
        "val and test get round-half-up(fraction x classes), at least 2 each, train the rest",
    )
    prep.add_argument(
        "--split-seed",
        type=_seed,
        metavar="N",
        help="(imagefolder, without --split-file) seed of the class split (default 0): the sorted class names "
        "permuted by numpy's default_rng(N)",
    )
    prep.add_argument(
        "--split-dir",
        metavar="DIR",
        help="folder of split files replacing the packaged ones "
        "(same format: {train,val,test}.csv for mini-ImageNet, .json otherwise); for mini-ImageNet "
        "CSVs beside images/ in --source take precedence over the packaged Ravi split",
    )
    prep.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count) missing or undecodable images instead of stopping at the first one",
    )
    prep.add_argument(
        "--resize-filter",
        choices=tuple(RESIZE_FILTERS),
        help="Pillow's filter resizing the images to --image-size (default lanczos; nearest is what Snell et al.'s "
        "Omniglot code got); the store records it",
    )
    prep.add_argument("--force", action="store_true", help="rebuild even if an up-to-date store exists")
    prep.add_argument("--seed", type=_seed, metavar="N", help="seed of a generated dataset (synthetic; default 0)")
    prep.add_argument(
        "--workers", type=positive_integer, metavar="N", help="threads decoding images (default: CPUs, max 8)"
    )
    prep.set_defaults(handler=run_prepare)

    info = actions.add_parser(
        "info",
        help="per split: classes, images, image size, fingerprint (all datasets when none is named)",
    )
    info.add_argument(
        "dataset",
        metavar="DATASET",
        nargs="?",
        help="a registered dataset or one of your own images prepared in the data root (default: all)",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--verify", action="store_true", help="recompute the fingerprint from the stored content")
    info.set_defaults(handler=run_info)


def run_prepare(args: argparse.Namespace) -> int:
    """Handler of ``data prepare``."""
    generated = args.dataset in DATASETS and DATASETS.get(args.dataset).generator is not None
    if args.seed is not None and not generated:
        seed_of_split = "; the class split of your own images takes --split-seed" if args.layout else ""
        raise UserError(
            f"--seed applies to generated datasets (synthetic) only; drop it for {args.dataset}{seed_of_split}"
        )
    result = prepare(
        args.dataset,
        args.source,
        args.data_root,
        image_size=args.image_size,
        split_dir=args.split_dir,
        skip_bad=args.skip_bad,
        force=args.force,
        seed=args.seed or 0,
        workers=args.workers,
        log=print,
        layout=args.layout,
        split_file=args.split_file,
        split_fractions=args.split_fractions,
        split_seed=args.split_seed,
        resize_filter=args.resize_filter or DEFAULT_RESIZE_FILTER,
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0]}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Handler of ``data info``."""
    if args.dataset is not None:
        summaries = [_summary(open_store(args.dataset, args.data_root), args.verify)]
    else:
        root = resolve_data_root(args.data_root)
        names = DATASETS.names() + user_datasets(root)  # the registered ones, then those of the user's images
        summaries = [_status(name, store_path(name, root), args.verify) for name in names]
    if args.json:
        print(json.dumps(summaries[0] if args.dataset else summaries, indent=2))
    else:
        print("\n".join(_text(s) for s in summaries))
    problems = [s["problem"] for s in summaries if "problem" in s]
    if problems:
        raise UserError(problems[0])
    bad = [s["dataset"] for s in summaries if s.get("verified") is False]
    if bad:
        raise UserError(
            f"stored content of {', '.join(bad)} no longer matches its fingerprint; rebuild with "
            f"'{render(prepare_command(bad[0], force=True))}'"
        )
    return 0


def _status(dataset: str, path: Path, verify: bool) -> dict[str, Any]:
    """A dataset's summary when its store is usable, else why not (for the listing of every dataset)."""
    if not path.exists():
        return {"dataset": dataset, "path": str(path), "prepared": False}
    try:
        return _summary(DatasetStore(path, rebuild=prepare_command(dataset, force=True)), verify)
    except UserError as err:
        return {"dataset": dataset, "path": str(path), "prepared": False, "problem": str(err)}


def _summary(store: DatasetStore, verify: bool) -> dict[str, Any]:
    summary = {**store.summary(), "prepared": True}
    if verify:
        summary["verified"] = store.verify()
    return summary


def _text(s: dict[str, Any]) -> str:
    if "problem" in s:
        return f"{s['dataset']}: {s['problem']}"
    if not s["prepared"]:
        return f"{s['dataset']}: not prepared (no {s['path']}); run '{render(prepare_command(s['dataset']))}'"
    lines = [
        f"{s['dataset']}: {s['path']}",
        f"  source format {s['source_format']}, image size {s['image_size']}"
        + (f" (resized with {s['resize_filter']})" if s.get("resize_filter") else "")
        + f", split convention {s['split_convention']}",
        f"  fingerprint sha256:{s['fingerprint']}"
        + {True: " (verified)", False: " (MISMATCH)", None: ""}[s.get("verified")],
    ]
    if s["skipped_images"]:
        lines.append(f"  {s['skipped_images']} unreadable source image(s) were skipped")
    for split, counts in s["splits"].items():
        lines.append(f"  {split:<6} {counts['classes']:>4} classes {counts['images']:>7} images")
    return "\n".join(lines)
