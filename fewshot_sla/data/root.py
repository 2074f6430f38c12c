"""Where prepared dataset stores live: --data-root, else $FEWSHOT_SLA_DATA, else a per-user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

from fewshot_sla.errors import UserError, setting

ENV_VAR = "FEWSHOT_SLA_DATA"


def resolve_data_root(cli_value: str | os.PathLike | None = None) -> Path:
    """The data root a command should use, in order of precedence: flag, environment, default. A path that is,
    or lies below, a file is a UserError."""
    if cli_value:
        root, source = Path(cli_value).expanduser(), setting("data_root")
    elif os.environ.get(ENV_VAR):
        root, source = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root, source = Path(cache) / "fewshot-sla", "the default data root"
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == root else f"lies below the file {existing}"
        raise UserError(f"{source} {root} {where}, not a folder; give a folder for the dataset stores")
    return root
