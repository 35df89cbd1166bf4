"""Measurements: per-rank collector, job summary, FLOP counting (docs/architecture.md "Metrics")."""
from wan_exp.metrics.collector import MetricsCollector, gather_records, summarize
from wan_exp.metrics.flops import DEVICE_PEAKS, dit_forward_flops, mfu, peak_flops

__all__ = [
    "DEVICE_PEAKS",
    "MetricsCollector",
    "dit_forward_flops",
    "gather_records",
    "mfu",
    "peak_flops",
    "summarize",
]
