"""``fewshot-sla list``: everything registered, built in or from plug-ins."""

from __future__ import annotations

import argparse
import json

from fewshot_sla.registry import ALL_REGISTRIES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="list registered datasets, backbones, learners, transforms, objectives")
    p.add_argument("kind", nargs="?", choices=sorted(ALL_REGISTRIES), help="only this kind")
    p.add_argument("--pattern", default="*", help="shell-style wildcard on names, e.g. 'maml*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else sorted(ALL_REGISTRIES)
    listing = {kind: ALL_REGISTRIES[kind].names(args.pattern) for kind in kinds}
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        for kind, names in listing.items():
            print(f"{kind}: {', '.join(names) if names else '(none)'}")
    return 0
