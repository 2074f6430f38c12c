"""fewshot-sla: few-shot meta-learning benchmarks with self-supervised label augmentation (SLA)."""

__version__ = "0.1.0"
