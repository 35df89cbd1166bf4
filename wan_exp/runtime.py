"""RankContext: what one rank knows about itself, and how it reports progress.

Every phase and step of a rank goes through :meth:`RankContext.phase` /
:meth:`RankContext.step`, which do three things in one place:
- write the heartbeat ``<job>/progress/rank_<r>.json`` (the launcher's hang watchdog
  reads these: no new heartbeat from any rank for launcher.hang_timeout_s = hang),
- give fault injection its hook (on entry to the phase), and
- time the phase or step in the rank's MetricsCollector.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from wan_exp.faults import FaultInjector
from wan_exp.metrics.collector import MetricsCollector
from wan_exp.results import heartbeat_path, write_json_atomic


class RankContext:
    """One rank's identity, device, metrics and progress reporting.

    job_dir None (tests, benchmarks): no heartbeat files and no fault injection.
    """

    def __init__(self, cfg: Any, rank: int, local_rank: int, world_size: int,
                 device: torch.device, job_dir: Optional[Path]) -> None:
        self.cfg = cfg
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.job_dir = Path(job_dir) if job_dir is not None else None
        self.metrics = MetricsCollector(self.device, rank, world_size)
        self.current_phase = "start"
        self._heartbeats_sent = 0
        self._faults = FaultInjector(cfg.fault, rank, self.device) if self.job_dir else None
        self.heartbeat("start")

    def heartbeat(self, phase: str, step: Optional[int] = None) -> None:
        """Tell the launcher this rank is alive and where it is."""
        self.current_phase = phase
        if self.job_dir is None:
            return
        # seq counts this rank's heartbeats: ranks run the same program, so on a hang the
        # rank with the lowest seq is the one the others are waiting for
        self._heartbeats_sent += 1
        write_json_atomic(heartbeat_path(self.job_dir, self.rank), {
            "rank": self.rank, "pid": os.getpid(), "phase": phase, "step": step,
            "seq": self._heartbeats_sent, "time": time.time(),
        }, durable=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """One initialisation phase: process_group, build, load, wrap or first_step."""
        self.heartbeat(name)
        with self.metrics.phase(name):
            if self._faults:
                self._faults.on_phase(name)  # inside the timing: an injected sleep counts
            yield

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """One pipeline stage of a workload (text_encode, denoise, vae_decode, ...): heartbeat,
        fault hook, and its time and peak memory in the collector (metrics.stage)."""
        self.heartbeat(name)
        with self.metrics.stage(name):
            if self._faults:
                self._faults.on_phase(name)
            yield

    @contextmanager
    def step(self, index: int, measured: bool) -> Iterator[None]:
        """One workload step (warm-up steps have measured=False)."""
        self.heartbeat("step", index)
        with self.metrics.step(measured):
            if self._faults:
                self._faults.on_phase("step")
            yield
