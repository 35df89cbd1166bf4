"""A Hydra callback for tests: a pause after each job, so that a test can stop a sweep
between two jobs. Used as ``+hydra.callbacks.pause._target_=pause_callback.PauseAfterJob``
with the tests folder on PYTHONPATH."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PauseAfterJob(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Say which job just ended (``<sweep dir>/between_jobs``), then wait."""
        (Path(str(config.hydra.sweep.dir)) / "between_jobs").write_text(str(config.hydra.job.num))
        time.sleep(self.seconds)
