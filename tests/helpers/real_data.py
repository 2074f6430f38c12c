"""Where the tests find real data: ``$FEWSHOT_SLA_TEST_DATA`` when set (data kept elsewhere), else ``../shared/data``
beside the repository. Tests that need it skip, saying so, when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.paths import REPO

REAL_DATA = Path(os.environ.get("FEWSHOT_SLA_TEST_DATA") or REPO.parent / "shared" / "data")
