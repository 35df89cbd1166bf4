"""`hydra/launcher=checked`: checks every job of a batch, then runs them one after the other
in this process.

Like Hydra's basic launcher, each job is the task function run through Hydra's
``run_job`` (wan-exp's task starts the job's ranks under torch's elastic agent). Its
additions: every job of a batch is checked before the first starts (by any registered
callback that has a ``check_batch(configs)`` method), and a Ctrl-C or SIGTERM that ends
a job (a KeyboardInterrupt out of the task) ends the sweep: the jobs run so far are
returned, no further job starts, and Hydra's sweep-end callbacks still run.

This module and _core.py import nothing of the application and no torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class CheckedLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None
        self.interrupted = False  # a job was interrupted: later batches of the sweep do not start

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.checked_launcher._core import launch

        return launch(self, job_overrides, initial_job_idx)
