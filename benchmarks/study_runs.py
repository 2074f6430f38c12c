"""Shared by the study scripts: train one run with the CLI in a subprocess and read its results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def train_run(flags: list[str], data_root: str | None, out: Path) -> dict[str, Any]:
    """``fewshot-sla [--data-root R] run FLAGS --out OUT``; its results.json, or exit with the run's last error line."""
    root = ["--data-root", data_root] if data_root else []
    command = [sys.executable, "-m", "fewshot_sla", *root, "run", *flags, "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "results.json").read_text())
