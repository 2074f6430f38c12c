"""Comparing two finished runs episode by episode on an episode set both were evaluated on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

from fewshot_sla.engine.stats import PairedComparison, paired_comparison
from fewshot_sla.errors import UserError, command, render, setting
from fewshot_sla.finished_run import FinishedRun
from fewshot_sla.prediction_kinds import display_order, headline_kind, kind_label


class PairedResult(NamedTuple):
    """One compared pair of prediction kinds: A's kind against B's, their mean accuracies (percent) on the paired
    episodes, and the paired statistics of A - B (fractions, as ``paired_comparison`` gives them)."""

    kind_a: str
    kind_b: str
    mean_a: float
    mean_b: float
    stats: PairedComparison


@dataclass
class Comparison:
    """A paired comparison of two runs on one episode set: one entry per (kind of A, kind of B) pair.

    ``note``: for the reader, how the kinds were paired when no flag chose them and the runs share none (each run's
    headline kind), and that the runs were tested on different stores when ``across_stores`` allowed it; None
    otherwise.
    """

    run_a: FinishedRun
    run_b: FinishedRun
    episode_set_hash: str
    pairs: list[PairedResult]
    note: str | None = None  # with errors.py markers: read it through errors.render

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (accuracies and differences in percent, p-values as they are)."""
        out = []
        for pair in self.pairs:
            d = pair.stats.as_dict()
            for key in ("mean_diff", "std_diff", "ci95", "ci95_t"):
                d[key] = 100.0 * d[key]
            out.append(
                {"kind_a": pair.kind_a, "kind_b": pair.kind_b, "mean_a": pair.mean_a, "mean_b": pair.mean_b, **d}
            )
        return {
            "run_a": str(self.run_a.path),
            "run_b": str(self.run_b.path),
            "episode_set_hash": self.episode_set_hash,
            "note": None if self.note is None else render(self.note),  # in the voice in effect (errors.py)
            "comparisons": out,
        }


def compare_runs(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    *,
    kind: str | None = None,
    kind_a: str | None = None,
    kind_b: str | None = None,
    episode_set: str | None = None,
    across_stores: bool = False,
) -> Comparison:
    """Compare two finished runs episode by episode on an episode set both were evaluated on.

    Without ``kind``/``kind_a``/``kind_b``, every kind the runs share is compared; runs that share none (an SLA
    run against a baseline) pair their headline kinds (SLA+AG with plain), and the comparison's ``note`` says so.
    A kind a flag leaves open is the run's headline kind.

    Runs tested on different stores of the episode set's dataset are refused unless ``across_stores``: an episode
    set names its images by class and identifier, so both runs saw the same images, but the stores may hold
    different pixels for them (another resize filter, another copy of the source). With ``across_stores`` the
    difference measured is that of model and store together (a preprocessing comparison), and the note says so.
    """
    a, b = FinishedRun.open(run_a), FinishedRun.open(run_b)
    set_hash = _common_episode_set(a, b, episode_set)
    block_a, block_b = a.evaluation_for(set_hash), b.evaluation_for(set_hash)
    assert block_a is not None and block_b is not None
    # Paired episodes must come from one store (the runs may have trained on different ones: cross-domain).
    store_a, store_b = a.store_fingerprint(block_a), b.store_fingerprint(block_b)
    notes = []
    if store_a != store_b:
        stores = f"different {block_a.episode_set.dataset} stores ({store_a[:12]} vs {store_b[:12]})"
        if not across_stores:
            raise UserError(
                f"the runs were tested on {stores}; compare runs tested on the same store, or pass "
                f"{setting('across_stores')} to pair the episodes by the images they name (a preprocessing comparison)"
            )
        notes.append(f"tested on {stores}: the same images, their pixels as each store holds them")
    kinds_a, kinds_b = list(block_a.accuracy), list(block_b.accuracy)
    if kind is not None:
        kind_a, kind_b = kind_a or kind, kind_b or kind
    shared = display_order([k for k in kinds_a if k in kinds_b])
    if kind_a is not None or kind_b is not None:
        wanted = [(kind_a or headline_kind(kinds_a), kind_b or headline_kind(kinds_b))]
    elif shared:
        wanted = [(k, k) for k in shared]
    else:  # e.g. an SLA run (si, ag) against a baseline (plain): each run's headline
        wanted = [(headline_kind(kinds_a), headline_kind(kinds_b))]
        notes.append(
            f"pairing A's {kind_label(wanted[0][0])} with B's {kind_label(wanted[0][1])} (the runs share no "
            f"prediction kind; choose others with {setting('kind_a')}/{setting('kind_b')})"
        )
    for ka, kb in wanted:
        for k, kinds, run in ((ka, kinds_a, run_a), (kb, kinds_b, run_b)):
            if k not in kinds:
                raise UserError(f"run {run} has no '{k}' predictions; it has: {', '.join(kinds)}")
    per_a, per_b = a.per_episode(set_hash), b.per_episode(set_hash)
    pairs = [
        PairedResult(
            ka,
            kb,
            100.0 * float(per_a[ka].mean()),
            100.0 * float(per_b[kb].mean()),
            paired_comparison(per_a[ka], per_b[kb]),
        )
        for ka, kb in wanted
    ]
    return Comparison(a, b, set_hash, pairs, "; ".join(notes) or None)


def _common_episode_set(a: FinishedRun, b: FinishedRun, prefix: str | None) -> str:
    hashes_a = [blk.episode_set.hash for blk in a.evaluations]
    hashes_b = [blk.episode_set.hash for blk in b.evaluations]
    common = [h for h in hashes_a if h in hashes_b]
    if prefix is not None:
        common = [h for h in common if h.startswith(prefix)]
        if not common:
            raise UserError(
                f"no episode set with hash {prefix}... was used to evaluate both runs; "
                "see 'episode_set' in their results.json"
            )
    if not common:
        target = a.evaluation.episode_set.dataset
        other = target if target != b.results.dataset else None  # B tested on A's data: cross-domain
        raise UserError(
            f"the runs were evaluated on different episode sets ({a.path}: "
            f"{a.evaluation.episode_set.hash[:12]}, {b.path}: "
            f"{b.evaluation.episode_set.hash[:12]}); evaluate both on one set, e.g. "
            f"'{command('eval', b.path, dataset=other, episodes_file=a.episode_set_file(a.evaluation))}'"
        )
    latest_a, latest_b = a.evaluation.episode_set.hash, b.evaluation.episode_set.hash
    for h in (latest_a, latest_b):
        if h in common:
            return h
    return common[-1]
