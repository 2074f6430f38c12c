"""engine.build helpers that every run depends on."""

from __future__ import annotations

import numpy as np

from fewshot_sla.engine.build import derived_seed


def test_derived_seed_is_the_top_63_bits_of_two_seedsequence_words() -> None:
    # Independent formulation in Python integers (numpy 1.x cannot shift a uint64 by a Python int).
    for seed, purpose in ((0, "model"), (7, "sampler"), (2**40 + 3, "augment")):
        low, high = np.random.SeedSequence([seed, *map(ord, purpose)]).generate_state(2, dtype=np.uint32)
        expected = (int(low) | int(high) << 32) >> 1
        assert derived_seed(seed, purpose) == expected
        assert 0 <= derived_seed(seed, purpose) < 2**63


def test_derived_seeds_differ_across_purposes_and_seeds() -> None:
    seeds = {derived_seed(s, p) for s in range(3) for p in ("model", "sampler", "augment")}
    assert len(seeds) == 9
