"""Metric buffers with explicit aggregation rules, reduced over grad-accum micro-steps and DDP ranks."""

from coordexp.telemetry.metrics import MetricBuffer, reduce_buffers

__all__ = ["MetricBuffer", "reduce_buffers"]
