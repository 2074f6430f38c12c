"""``fewshot-sla episodes make|info|verify``: fixed, shareable evaluation episode sets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewshot_sla.data.catalog import open_store, packaged_files
from fewshot_sla.data.conventions import load_convention
from fewshot_sla.data.root import resolve_data_root
from fewshot_sla.data.store import store_path
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec
from fewshot_sla.errors import UserError, render


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``episodes`` command family."""
    parser = subparsers.add_parser(
        "episodes",
        help="make, inspect and verify fixed evaluation episode sets",
        description="Fixed evaluation episode sets: files naming the images of every "
        "episode by identifier, with a content hash, shared by every method.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    make = actions.add_parser(
        "make",
        help="draw a fixed episode set and write it (.npz)",
        description="Draw COUNT episodes with SEED from a dataset split and write them. Needs "
        "only identifiers: without a store, mini-ImageNet uses its packaged "
        "Ravi split list (same identifiers, so the same episodes).",
    )
    make.add_argument("--dataset", required=True, help="registered dataset name (see 'fewshot-sla list datasets')")
    make.add_argument("--split", default="test", help="split to draw from (default: test)")
    make.add_argument("--ways", type=int, default=5, help="classes per episode (default 5)")
    make.add_argument("--shots", type=int, default=1, help="support images per class (default 1)")
    make.add_argument("--queries", type=int, default=15, help="query images per class (default 15)")
    make.add_argument("--count", type=int, default=1000, help="number of episodes (default 1000)")
    make.add_argument("--seed", type=int, default=0, help="seed of the episode draw (default 0)")
    make.add_argument(
        "--out",
        metavar="FILE",
        help="output file (default: episodes/<dataset>-<split>-<NwKsQq>-<count>-seed<seed>.npz)",
    )
    make.set_defaults(handler=run_make)

    info = actions.add_parser("info", help="show what an episode set holds (checks its hash)")
    info.add_argument("file", metavar="FILE")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=run_info)

    verify = actions.add_parser(
        "verify",
        help="check an episode set against a dataset's store (or split list)",
        description="Check the file's hash, that every image it uses exists in the "
        "dataset with the same class, and whether it regenerates bit for bit.",
    )
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--dataset", required=True, help="the dataset the set is used with")
    verify.set_defaults(handler=run_verify)


def split_order(dataset: str, split: str, data_root: str | None) -> tuple[CanonicalOrder, str]:
    """The canonical order of a dataset split and where it came from: the prepared store when there is one,
    else the dataset's packaged file list (mini-ImageNet's Ravi CSVs)."""
    packaged = packaged_files(dataset)
    if packaged is not None and not store_path(dataset, resolve_data_root(data_root)).exists():
        convention = load_convention(*packaged)
        per_split = convention.files or {}  # a ravi-csv convention always lists files
        if split not in per_split:
            raise UserError(f"{dataset} has no split '{split}'; choose one of: {', '.join(per_split)}")
        files = per_split[split]
        classes = sorted(files)
        labels = [label for label, cls in enumerate(classes) for _ in files[cls]]
        ids = [ident for cls in classes for ident in files[cls]]
        order = CanonicalOrder(classes, labels, ids, where=f"{dataset}/{split} (packaged split list)")
        return order, f"the packaged {convention.describe()} split list"
    store = open_store(dataset, data_root)
    loaded = store.split(split, in_memory=False)  # identifiers only: the pixels stay on disk
    order = CanonicalOrder(loaded.class_names, loaded.labels, loaded.image_ids, where=f"{dataset}/{split}")
    return order, f"the store {store.path}"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def run_make(args: argparse.Namespace) -> int:
    spec = EpisodeSpec(args.ways, args.shots, args.queries)
    if args.count < 1 or args.seed < 0:
        raise UserError(f"--count must be >= 1 and --seed >= 0 (got {args.count} and {args.seed})")
    order, source = split_order(args.dataset, args.split, args.data_root)
    episode_set = EpisodeSet.make(
        order, dataset=args.dataset, split=args.split, spec=spec, count=args.count, seed=args.seed
    )
    out = (
        Path(args.out)
        if args.out
        else Path("episodes") / EpisodeSet.default_name(args.dataset, args.split, spec, args.count, args.seed)
    )
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'set.npz'}")
    try:
        episode_set.save(out)
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror}); choose a writable --out") from None
    print(
        f"wrote {out} ({_size(out)}): {episode_set.count} {spec.tag} episodes of {args.dataset}/{args.split}, "
        f"seed {args.seed}, drawn from {source}"
    )
    print(f"content sha256 {episode_set.content_hash}")
    return 0


def _describe(episode_set: EpisodeSet, path: Path) -> dict:
    s = episode_set.spec
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "dataset": episode_set.dataset,
        "split": episode_set.split,
        "ways": s.ways,
        "shots": s.shots,
        "queries": s.queries,
        "count": episode_set.count,
        "seed": episode_set.seed,
        "classes": len(episode_set.class_names),
        "identifiers": len(episode_set.identifiers),
        "images_used": len(set(episode_set.positions.ravel().tolist())),
        "identifiers_sha256": episode_set.identifiers_fingerprint,
        "content_sha256": episode_set.content_hash,
        "make_command": render(episode_set.make_command()),
    }


def run_info(args: argparse.Namespace) -> int:
    path = Path(args.file)
    described = _describe(EpisodeSet.load(path), path)
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    d = described
    print(
        f"{d['file']} ({_size(path)}): {d['count']} episodes, {d['ways']}-way {d['shots']}-shot "
        f"{d['queries']}-query, seed {d['seed']}"
    )
    print(
        f"  dataset/split   {d['dataset']}/{d['split']} ({d['classes']} classes, {d['identifiers']} images, "
        f"{d['images_used']} used)"
    )
    print(f"  identifiers     sha256 {d['identifiers_sha256']}")
    print(f"  content         sha256 {d['content_sha256']} (verified)")
    print(f"  regenerate with {d['make_command']}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    path = Path(args.file)
    episode_set = EpisodeSet.load(path)
    episode_set.check_target(args.dataset, episode_set.split)
    order, source = split_order(args.dataset, episode_set.split, args.data_root)
    positions = episode_set.positions_in(order, args.dataset, episode_set.split)
    used = len(set(positions.ravel().tolist()))
    print(f"ok: {path} can be used with {args.dataset}/{episode_set.split}")
    print(f"  content hash    matches (sha256 {episode_set.content_hash})")
    print(f"  images          all {used} images it uses are in {source}, with the same classes")
    if order.fingerprint == episode_set.identifiers_fingerprint:
        again = EpisodeSet.make(
            order,
            dataset=args.dataset,
            split=episode_set.split,
            spec=episode_set.spec,
            count=episode_set.count,
            seed=episode_set.seed,
        )
        same = again.content_hash == episode_set.content_hash
        print("  split content   identical to the one the set was drawn from")
        print(
            f"  regenerates     {'yes, bit for bit, with' if same else 'NO (another sampler version made it):'} "
            f"{render(episode_set.make_command())}"
        )
    else:
        print(
            "  split content   differs from the one the set was drawn from (other or extra images); "
            "the episodes still resolve"
        )
    return 0
