"""Checkpoints: atomic save/load of training state, including every random number generator's state.

A training checkpoint is a dict ``{"step", "model", "optimizer", "scheduler", "rng", ...}`` of tensors
and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fewshot_sla.atomic import atomic_path
from fewshot_sla.errors import UserError


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write keeps the previous checkpoint)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; a missing or corrupt file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} is missing; the run was not trained this far, start it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} cannot be read ({first}); delete it or start with --overwrite") from None


def rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """The state of torch's global CPU (and initialised CUDA) generators and of the named generators."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Put every generator back in the state ``rng_state`` recorded."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["generators"]
    missing = set(generators) - set(saved)
    if missing:
        raise UserError(
            f"checkpoint lacks generator states {sorted(missing)}; it is from another version, "
            "start the run again with --overwrite"
        )
    for name, g in generators.items():
        g.set_state(saved[name])
