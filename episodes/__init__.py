"""The fixed test episode sets shipped with fewshot-sla (``*.npz``, described in ``README.md`` here).

Data, not code: this folder is installed as the package ``fewshot_sla.episode_sets`` (``pyproject.toml`` maps it),
so that a wheel and an editable install both carry it and ``fewshot_sla.package_data`` finds it through
``importlib.resources``; this file makes it a regular package, which an editable install needs for a mapped folder.
"""
