"""What a run is told to do, resolved before the engine starts: the run configuration (``run_config.py``: every
field defined once), the published recipes that fill what a run leaves unset (``recipes.py``, ``recipes.yaml``),
the rule matcher both recipes and grids use (``rules.py``) and grid files expanded into cells (``grid.py``).

The package re-exports the run configuration's public names; recipes and grids are imported from their modules.
"""

from fewshot_sla.config.run_config import (
    REFERENCE_FILE,
    REGENERATE_REFERENCE,
    RESULT_NEUTRAL_KEYS,
    RESUME_FREE_KEYS,
    Knob,
    RunConfig,
    base_type,
    check_values,
    configuration_reference,
    default_text,
    help_text,
    identity_values,
    knobs,
    load_config,
    read_config_values,
    required,
)

__all__ = [
    "REFERENCE_FILE",
    "REGENERATE_REFERENCE",
    "RESULT_NEUTRAL_KEYS",
    "RESUME_FREE_KEYS",
    "Knob",
    "RunConfig",
    "base_type",
    "check_values",
    "configuration_reference",
    "default_text",
    "help_text",
    "identity_values",
    "knobs",
    "load_config",
    "read_config_values",
    "required",
]
