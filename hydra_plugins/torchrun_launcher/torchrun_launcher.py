"""`hydra/launcher=torchrun`: runs every job of a Hydra sweep under torch's elastic agent.

This module stays light (Hydra imports it while discovering plugins); the work is in
_core.py. Per-job launch settings are in the job config's `launcher` node
(wan_exp.config.LauncherConfig).

Each JobReturn is COMPLETED and carries {"status", "job_dir"}: a failed, OOM or hung job
is a result, and Hydra's sweeper would abort the sweep on a FAILED JobReturn. The job
statuses of this process are kept in JOB_STATUSES so that launch.py can set its exit code.
"""
from __future__ import annotations

from typing import Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# status of every job this process ran, in order ("completed", "failed", "oom", "hang")
JOB_STATUSES: list[str] = []


class TorchrunLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # task_function (launch.py's main) is not called: each job runs in torchrun ranks
        self.hydra_context = hydra_context
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.torchrun_launcher._core import launch_batch
        from wan_exp.config import ConfigError

        assert self.hydra_context is not None and self.config is not None, "setup() comes first"
        try:
            returns = launch_batch(self.hydra_context, self.config, job_overrides, initial_job_idx)
        except ConfigError as exc:
            # a bad setting is the user's to fix, not a crash: the message without a traceback
            raise SystemExit(f"wan-exp: bad config, no job started: {exc}") from None
        JOB_STATUSES.extend(r.return_value["status"] for r in returns)
        return returns


def sweep_exit_code() -> int:
    """1 if any job of this process did not complete, else 0 (also for --info, --cfg)."""
    return 0 if all(s == "completed" for s in JOB_STATUSES) else 1
