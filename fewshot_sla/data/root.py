"""Where prepared dataset stores live: --data-root, else $FEWSHOT_SLA_DATA, else a per-user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FEWSHOT_SLA_DATA"


def resolve_data_root(cli_value: str | os.PathLike | None = None) -> Path:
    """The data root a command should use, in order of precedence: flag, environment, default."""
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fewshot-sla"
