"""The names of a rank's phases and stages, in order: written by the MetricsCollector in the ranks,
read by the report on the host. Kept apart from the collector so that readers need no torch."""
from __future__ import annotations

INIT_PHASES = ("process_group", "build", "load", "wrap", "first_step")
# the generate workload's stages, in pipeline order (MetricsCollector.stage)
PIPELINE_STAGES = ("text_encode", "audio_encode", "reference_encode", "motion_encode", "denoise",
                   "vae_decode", "video_write")
