"""Benchmark leaderboards: grids of runs (``grid``), their resumable execution (``executors``), the published
reference numbers (``published``), and the tables and plots built from finished runs (``build``)."""
