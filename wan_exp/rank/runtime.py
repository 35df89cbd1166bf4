"""RankContext: what one rank knows about itself, and how it reports progress.

Every phase and step of a rank goes through :meth:`RankContext.phase` /
:meth:`RankContext.step`, which do three things in one place:
- write the heartbeat ``<job>/progress/rank_<r>.json`` (the launcher's hang watchdog
  reads these: no new heartbeat from any rank for launcher.hang_timeout_s = hang),
- give fault injection its hook (on entry to the phase), and
- time the phase or step in the rank's MetricsCollector.

Inside a long stage the work itself reports progress: ``wan_exp.liveness.beat()`` (one per
latent frame of the VAE, weight tensor read, audio chunk, video frame, compiled graph) lands
in :meth:`RankContext.beat`, which moves "time" (what the watchdog reads) but not "seq" (the
ranks' beats within a stage need not match in number), at most once per BEAT_MIN_INTERVAL_S.
The watchdog's bound is thus on silence, not on a stage's length.

The heartbeat also carries the rank's host memory (RSS now and its peak). A rank that
the kernel's OOM killer ends writes nothing more, so a background thread refreshes those
figures every MEMORY_SAMPLE_S between heartbeats, leaving "seq" and "time" (progress, what
the hang watchdog reads) as they were.
"""

from __future__ import annotations

import importlib.abc
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil
import torch

from wan_exp import liveness
from wan_exp.metrics.collector import MetricsCollector
from wan_exp.rank.faults import FaultInjector
from wan_exp.results import heartbeat_path, write_json_atomic
from wan_exp.units import GIB

MEMORY_SAMPLE_S = 2.0  # how often the heartbeat's host memory figures are refreshed
BEAT_MIN_INTERVAL_S = 0.5  # in-stage beats closer than this rewrite no file (the watchdog polls at 0.2 s)


def host_memory_gib() -> tuple[float, float]:
    """(RSS now, peak RSS since the process started) of this process, in GiB."""
    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return rss / GIB, max(rss, peak) / GIB


class RankContext:
    """One rank's identity, device, metrics and progress reporting.

    job_dir None (tests, benchmarks): no heartbeat files and no fault injection.
    """

    def __init__(
        self,
        cfg: Any,
        rank: int,
        local_rank: int,
        world_size: int,
        device: torch.device,
        job_dir: Optional[Path],
        process_rank: Optional[int] = None,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        # the index of this process's files in the job dir: the rank, except in a simulated
        # job, whose one process plays rank `rank` of world_size and writes as process 0
        self.process_rank = rank if process_rank is None else process_rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.job_dir = Path(job_dir) if job_dir is not None else None
        self.metrics = MetricsCollector(self.device, rank, world_size, cfg.allocator.count_cpu_tensors)
        self.current_phase = "start"
        self.current_step: Optional[int] = None
        self._beat: dict = {}
        self._beat_lock = threading.Lock()
        self._faults = FaultInjector(cfg.fault, rank, self.device, self.refresh_memory) if self.job_dir else None
        self._last_write = 0.0
        self.heartbeat("start")
        if self.job_dir is not None:
            liveness.set_listener(self.beat)
            if not any(isinstance(f, _BeatOnImport) for f in sys.meta_path):
                sys.meta_path.insert(0, _BeatOnImport())
            if cfg.model.compile:
                _beat_on_compile()
            threading.Thread(target=self._sample_memory, name="wan-exp-memory-sampler", daemon=True).start()

    def heartbeat(self, phase: str, step: Optional[int] = None) -> None:
        """Tell the launcher this rank is alive and where it is."""
        self.current_phase, self.current_step = phase, step
        if self.job_dir is None:
            return
        with self._beat_lock:
            # seq counts this rank's heartbeats: ranks run the same program, so on a hang the
            # rank with the lowest seq is the one the others are waiting for
            self._beat = {
                "rank": self.process_rank,
                "pid": os.getpid(),
                "phase": phase,
                "step": step,
                "seq": self._beat.get("seq", 0) + 1,
                "time": time.time(),
                "detail": "",
            }
            self._write_beat()
            self._last_write = self._beat["time"]

    def beat(self, detail: str = "") -> None:
        """Progress inside the current phase or stage (wan_exp.liveness.beat lands here): the
        heartbeat's time and detail move, its phase, step and seq stay."""
        if self.job_dir is None:
            return
        if self._faults:
            self._faults.on_beat(self.current_phase)
        now = time.time()
        if now - self._last_write < BEAT_MIN_INTERVAL_S:
            return
        with self._beat_lock:
            self._beat.update(time=now, detail=detail)
            self._write_beat()
            self._last_write = now

    def refresh_memory(self) -> None:
        """Rewrite the heartbeat with this moment's host memory, progress unchanged."""
        if self.job_dir is None:
            return
        with self._beat_lock:
            self._write_beat()

    def _write_beat(self) -> None:  # under _beat_lock
        rss, peak = host_memory_gib()
        write_json_atomic(
            heartbeat_path(self.job_dir, self.process_rank),
            {
                **self._beat,
                "host_rss_gib": rss,
                "host_rss_peak_gib": peak,
                "memory_time": time.time(),
            },
            durable=False,
        )

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


class _BeatOnImport(importlib.abc.MetaPathFinder):
    """A heartbeat per module imported (rate-limited like every beat): the rank's first imports
    of transformers, diffusers and the like take many seconds on a busy machine, after its first
    heartbeat. Finds nothing itself; the next finders import the module."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        liveness.beat(f"import {fullname.split('.')[0]}")


_compile_hooked = False


def _beat_on_compile() -> None:
    """A heartbeat as torch.compile starts and ends each graph (dynamo's callbacks; the
    compiling happens lazily inside the first forward, which may outlast hang_timeout_s)."""
    global _compile_hooked
    if _compile_hooked:
        return
    # imported only for a compiling model: torch._dynamo costs ~2 s at start-up
    from torch._dynamo.callback import on_compile_end, on_compile_start

    on_compile_start(lambda *args, **kwargs: liveness.beat("compile start"))
    on_compile_end(lambda *args, **kwargs: liveness.beat("compile end"))
    _compile_hooked = True
