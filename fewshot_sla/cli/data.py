"""``fewshot-sla data prepare|info``: build dataset stores from raw downloads and show what is prepared."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fewshot_sla.data.catalog import open_store, prepare_command
from fewshot_sla.data.prepare import prepare
from fewshot_sla.data.root import resolve_data_root
from fewshot_sla.data.store import DatasetStore, store_path
from fewshot_sla.errors import UserError
from fewshot_sla.registry import DATASETS


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive(text: str) -> int:
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
    )
    prep.add_argument("dataset", metavar="DATASET", help="miniimagenet, cub, fc100, cifarfs or synthetic")
    prep.add_argument("--source", metavar="PATH", help="folder holding the raw dataset (not for synthetic)")
    prep.add_argument(
        "--image-size",
        type=_positive,
        metavar="PIXELS",
        help="side of the stored square images "
        "(default: the dataset's standard size, 84 for mini-ImageNet and CUB, 32 otherwise)",
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
    prep.add_argument("--force", action="store_true", help="rebuild even if an up-to-date store exists")
    prep.add_argument("--seed", type=_seed, metavar="N", help="seed of a generated dataset (synthetic; default 0)")
    prep.add_argument("--workers", type=_positive, metavar="N", help="threads decoding images (default: CPUs, max 8)")
    prep.set_defaults(handler=run_prepare)

    info = actions.add_parser(
        "info",
        help="per split: classes, images, image size, fingerprint (all datasets when none is named)",
    )
    info.add_argument("dataset", metavar="DATASET", nargs="?", help="a registered dataset (default: all)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--verify", action="store_true", help="recompute the fingerprint from the stored content")
    info.set_defaults(handler=run_info)


def run_prepare(args: argparse.Namespace) -> int:
    """Handler of ``data prepare``."""
    if args.seed is not None and DATASETS.get(args.dataset).generator is None:
        raise UserError(f"--seed applies to generated datasets (synthetic) only; drop it for {args.dataset}")
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
        summaries = [_status(name, store_path(name, root), args.verify) for name in DATASETS.names()]
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
            f"'{prepare_command(bad[0])} --force'"
        )
    return 0


def _status(dataset: str, path: Path, verify: bool) -> dict[str, Any]:
    """A dataset's summary when its store is usable, else why not (for the listing of every dataset)."""
    if not path.exists():
        return {"dataset": dataset, "path": str(path), "prepared": False}
    try:
        return _summary(DatasetStore(path, rebuild=f"{prepare_command(dataset)} --force"), verify)
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
        return f"{s['dataset']}: not prepared (no {s['path']}); run '{prepare_command(s['dataset'])}'"
    lines = [
        f"{s['dataset']}: {s['path']}",
        f"  source format {s['source_format']}, image size {s['image_size']}, split convention {s['split_convention']}",
        f"  fingerprint sha256:{s['fingerprint']}"
        + {True: " (verified)", False: " (MISMATCH)", None: ""}[s.get("verified")],
    ]
    if s["skipped_images"]:
        lines.append(f"  {s['skipped_images']} unreadable source image(s) were skipped")
    for split, counts in s["splits"].items():
        lines.append(f"  {split:<6} {counts['classes']:>4} classes {counts['images']:>7} images")
    return "\n".join(lines)
