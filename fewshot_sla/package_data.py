"""Files shipped inside the package, read through ``importlib.resources`` so that a wheel install has them: the
fixed episode sets (the repository's top-level ``episodes/`` folder, installed as ``fewshot_sla.episode_sets``) and
the table of published results (``leaderboard/published.csv``).

A user adds or overrides episode sets by putting files of the same names into ``DATA_ROOT/episodes/``, beside
the dataset stores: a set found there is used before the shipped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

USER_EPISODES = "episodes"  # the folder, inside the data root, that holds a user's own episode sets
SHIPPED_SHOWN = "episodes"  # how results.json names the folder of a shipped set
FORMER_SHIPPED_SHOWN = "fewshot_sla/episode_sets"  # how results.json files written before the move name it


@dataclass(frozen=True)
class FoundSet:
    """Where a named episode set was found: ``source`` is ``"user"`` (the data root) or ``"shipped"``."""

    path: Path
    source: str


def _packaged(package: str, *parts: str) -> Path:
    # Installed packages (wheel, editable or source tree) are folders on disk, so the resource is a plain path.
    return Path(str(resources.files(package).joinpath(*parts)))


def shipped_episode_sets() -> Path:
    """The folder of episode sets shipped with the package."""
    return _packaged("fewshot_sla.episode_sets")


def find_episode_set(name: str, data_root: Path | None) -> FoundSet | None:
    """The episode set file ``name``: the user's copy in ``data_root/episodes/`` first, then the shipped one."""
    if data_root is not None:
        user = Path(data_root) / USER_EPISODES / name
        if user.is_file():
            return FoundSet(user, "user")
    shipped = shipped_episode_sets() / name
    return FoundSet(shipped, "shipped") if shipped.is_file() else None


def published_table() -> Path:
    """The table of published results shipped with the package."""
    return _packaged("fewshot_sla", "leaderboard", "published.csv")
