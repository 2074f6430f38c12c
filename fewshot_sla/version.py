"""The package version, written only here: pyproject.toml reads it and ``fewshot_sla.__version__`` re-exports it."""

__version__ = "0.1.0"
