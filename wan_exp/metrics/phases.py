"""The names of a rank's phases and stages, in order: written by the MetricsCollector in the ranks,
read by the report on the host. Kept apart from the collector so that readers need no torch."""

from __future__ import annotations

from wan_exp.config import PIPELINE_STAGES  # noqa: F401  (the one definition; readers import it here)

INIT_PHASES = ("process_group", "build", "load", "wrap", "first_step")
