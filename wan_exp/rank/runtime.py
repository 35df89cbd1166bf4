"""RankContext: what one rank knows about itself, and how it reports progress.

Every phase and step of a rank goes through :meth:`RankContext.phase` /
:meth:`RankContext.step`, which do three things in one place:
- write the heartbeat ``<job>/progress/rank_<r>.json`` (the launcher's hang watchdog
  reads these: no new heartbeat from any rank for launcher.hang_timeout_s = hang),
- give fault injection its hook (on entry to the phase), and
- time the phase or step in the rank's MetricsCollector.

The heartbeat also carries the rank's host memory (RSS now and its peak). A rank that
the kernel's OOM killer ends writes nothing more, so a background thread refreshes those
figures every MEMORY_SAMPLE_S between heartbeats, leaving "seq" and "time" (progress, what
the hang watchdog reads) as they were.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil
import torch

from wan_exp.rank.faults import FaultInjector
from wan_exp.metrics.collector import MetricsCollector
from wan_exp.results import heartbeat_path, write_json_atomic
from wan_exp.units import GIB

MEMORY_SAMPLE_S = 2.0  # how often the heartbeat's host memory figures are refreshed


def host_memory_gib() -> tuple[float, float]:
    """(RSS now, peak RSS since the process started) of this process, in GiB."""
    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return rss / GIB, max(rss, peak) / GIB


class RankContext:
    """One rank's identity, device, metrics and progress reporting.

    job_dir None (tests, benchmarks): no heartbeat files and no fault injection.
    """

    def __init__(self, cfg: Any, rank: int, local_rank: int, world_size: int,
                 device: torch.device, job_dir: Optional[Path], process_rank: Optional[int] = None) -> None:
        self.cfg = cfg
        self.rank = rank
        # the index of this process's files in the job dir: the rank, except in a simulated
        # job, whose one process plays rank `rank` of world_size and writes as process 0
        self.process_rank = rank if process_rank is None else process_rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.job_dir = Path(job_dir) if job_dir is not None else None
        self.metrics = MetricsCollector(self.device, rank, world_size)
        self.current_phase = "start"
        self.current_step: Optional[int] = None
        self._beat: dict = {}
        self._beat_lock = threading.Lock()
        self._faults = (FaultInjector(cfg.fault, rank, self.device, self.refresh_memory)
                        if self.job_dir else None)
        self.heartbeat("start")
        if self.job_dir is not None:
            threading.Thread(target=self._sample_memory, name="wan-exp-memory-sampler", daemon=True).start()

    def heartbeat(self, phase: str, step: Optional[int] = None) -> None:
        """Tell the launcher this rank is alive and where it is."""
        self.current_phase, self.current_step = phase, step
        if self.job_dir is None:
            return
        with self._beat_lock:
            # seq counts this rank's heartbeats: ranks run the same program, so on a hang the
            # rank with the lowest seq is the one the others are waiting for
            self._beat = {"rank": self.process_rank, "pid": os.getpid(), "phase": phase, "step": step,
                          "seq": self._beat.get("seq", 0) + 1, "time": time.time()}
            self._write_beat()

    def refresh_memory(self) -> None:
        """Rewrite the heartbeat with this moment's host memory, progress unchanged."""
        if self.job_dir is None:
            return
        with self._beat_lock:
            self._write_beat()

    def _write_beat(self) -> None:  # under _beat_lock
        rss, peak = host_memory_gib()
        write_json_atomic(heartbeat_path(self.job_dir, self.process_rank), {
            **self._beat, "host_rss_gib": rss, "host_rss_peak_gib": peak, "memory_time": time.time(),
        }, durable=False)

    def _sample_memory(self) -> None:
        progress_dir = heartbeat_path(self.job_dir, self.process_rank).parent
        while True:
            time.sleep(MEMORY_SAMPLE_S)
            if not progress_dir.is_dir():
                return  # the job dir is gone (e.g. a test's temporary folder): never recreate it
            try:
                self.refresh_memory()
            except OSError:  # a full disk: the rank's own writes report it
                pass

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
