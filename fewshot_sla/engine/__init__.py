"""The engine: meta-training (``train``), episodic evaluation with a feature cache (``evaluate``,
``feature_cache``), statistics (``stats``), checkpoints, recipes, and whole commands as calls (``runner``)."""
