"""fewshot-sla: few-shot meta-learning benchmarks with self-supervised label augmentation (SLA)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fewshot_sla.version import __version__

__all__ = ["TrainedRun", "__version__", "load_run"]

if TYPE_CHECKING:
    from fewshot_sla.trained import TrainedRun, load_run

# Imported from fewshot_sla.trained on first use, so that a plain `import fewshot_sla` stays light (no torch).
_LAZY = {"TrainedRun", "load_run"}


def __getattr__(name: str) -> Any:
    """``load_run`` and ``TrainedRun``, imported from ``fewshot_sla.trained`` when first asked for."""
    if name in _LAZY:
        from fewshot_sla import trained

        return getattr(trained, name)
    raise AttributeError(f"module 'fewshot_sla' has no attribute '{name}'")
