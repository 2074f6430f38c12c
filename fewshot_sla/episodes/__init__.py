"""Episodes: the N-way K-shot Q-query spec, a batched seeded sampler, and fixed, hashed episode sets.

Everything works in a split's canonical order, so a seed names the same episodes, image for image, in every store
built from the same source. One concept per module, from the bottom up: ``split`` (what episodes need of a split),
``spec`` (``EpisodeSpec``), ``canonical`` (``CanonicalOrder``), ``batch`` (``EpisodeBatch``), ``rows`` (images taken
from a split, in memory or on disk), ``sampler`` (``PositionSampler``, ``EpisodeSampler``), ``sets`` (``EpisodeSet``).
"""

from fewshot_sla.episodes.batch import EpisodeBatch
from fewshot_sla.episodes.canonical import CanonicalOrder
from fewshot_sla.episodes.rows import episode_batches, gather_episodes, read_ahead, take_rows
from fewshot_sla.episodes.sampler import EpisodeSampler, PositionSampler
from fewshot_sla.episodes.sets import SET_CHUNK, SET_FORMAT, EpisodeSet
from fewshot_sla.episodes.spec import EpisodeSpec
from fewshot_sla.episodes.split import RowReader, SplitLike

__all__ = [
    "SET_CHUNK",
    "SET_FORMAT",
    "CanonicalOrder",
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodeSet",
    "EpisodeSpec",
    "PositionSampler",
    "RowReader",
    "SplitLike",
    "episode_batches",
    "gather_episodes",
    "read_ahead",
    "take_rows",
]
