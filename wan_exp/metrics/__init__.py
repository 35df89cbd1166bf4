"""Measurements: per-rank collector, job summary, FLOP counting (docs/architecture.md "Metrics").

The collector needs torch; the summary and the FLOP counts do not, so the collector is
imported only when asked for (the job process on the host reads records without torch).
"""

from typing import Any

from wan_exp.metrics.flops import DEVICE_PEAKS, dit_forward_flops, mfu, peak_flops
from wan_exp.metrics.summary import job_step_times, summarize

__all__ = [
    "DEVICE_PEAKS",
    "MetricsCollector",
    "dit_forward_flops",
    "job_step_times",
    "mfu",
    "peak_flops",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name == "MetricsCollector":
        from wan_exp.metrics.collector import MetricsCollector

        return MetricsCollector
    raise AttributeError(f"module 'wan_exp.metrics' has no attribute {name!r}")
