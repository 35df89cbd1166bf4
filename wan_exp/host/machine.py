"""Is the host busy or misconfigured? Said in results.json and the report, not hidden in the times.

Three things make a CPU job several times slower without any error:
- a thread setting that is not a positive integer (``OMP_NUM_THREADS=abc``): OpenMP ignores
  it, so every rank takes every core; the launcher gives the ranks its own split instead
  (:func:`rank_thread_settings`) and says so;
- more ranks (or ranks x threads) than the cores this process may run on;
- other processes keeping cores busy while the job runs (another sweep, a build): the job
  process samples, with each heartbeat poll, the load average and the CPU time the whole
  host spent outside the job's processes (:class:`LoadSampler`).

Each host's figures (``machine_figures``) go into its ``nodes/node_<n>.json`` and from there
into results.json's ``machine`` ({"hosts": [...], "warnings": [...]}); the report lists the
warnings beside the configuration's figures, and ``python -m wan_exp.doctor`` reports the
same checks for the machine as it is now. No torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import psutil

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what sizes torch's CPU thread pools
# other processes using more than this share of the cores on average make the job's times a
# busy machine's (a quarter: one core of four, half a core of two, is already felt by a CPU job)
BUSY_SHARE = 0.25
SAMPLE_S = 1.0  # how often the job process samples the host's load


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or Slurm's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def positive_int(text: str | None) -> int | None:
    """The value of a thread variable, or None when it is not a positive integer."""
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def rank_thread_settings(
    environ: Mapping[str, str], nproc_per_node: int, cores: int
) -> tuple[dict[str, str], list[str]]:
    """(variables to give the ranks, warnings). Unset OMP_NUM_THREADS: the cores split over the
    ranks (as torchrun does). A thread variable that is not a positive integer is replaced by
    that split, with a warning naming it."""
    split = str(max(1, cores // max(1, nproc_per_node)))
    env: dict[str, str] = {}
    warnings = []
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = split
    for name in THREAD_VARIABLES:
        if name in environ and positive_int(environ[name]) is None:
            env[name] = split
            warnings.append(
                f"{name}={environ[name]!r} is not a positive integer (OpenMP would ignore it and "
                f"give every rank all {cores} cores); the ranks ran with {name}={split}, "
                f"{cores} cores / {nproc_per_node} rank(s); set it to a number, or unset it"
            )
    return env, warnings


def oversubscription_warning(nproc_per_node: int, threads_per_rank: int, cores: int) -> str | None:
    """A warning when this host's ranks, or their threads, outnumber its usable cores."""
    if nproc_per_node > cores:
        return (
            f"{nproc_per_node} ranks on {cores} core(s) of this host: the ranks take turns on the cores, "
            "so times are slower than the split alone; use launcher.nproc_per_node <= the cores"
        )
    if nproc_per_node * threads_per_rank > cores:
        return (
            f"{nproc_per_node} rank(s) x {threads_per_rank} threads (OMP_NUM_THREADS) on {cores} core(s): "
            "the threads take turns on the cores; set OMP_NUM_THREADS to cores / ranks or less"
        )
    return None


def busy_warning(other_cores: float, load_max: float, cores: int) -> str | None:
    """A warning when other processes kept more than BUSY_SHARE of the cores busy on average."""
    if other_cores <= BUSY_SHARE * cores:
        return None
    return (
        f"other processes kept {other_cores:.1f} of {cores} core(s) busy on average during the job "
        f"(1-min load average up to {load_max:.1f}): its times are a busy machine's, not comparable"
    )


@dataclass
class LoadSampler:
    """The host's load while a job runs: the 1-minute load average and the CPU seconds spent
    outside the job's processes, sampled at most every SAMPLE_S (call :meth:`sample` from the
    watchdog's poll with the job's processes)."""

    cores: int = field(default_factory=usable_cores)
    load_max: float = 0.0
    other_cpu_s: float = 0.0
    elapsed_s: float = 0.0
    _last: tuple[float, float, float] | None = None  # (time, host busy CPU s, job CPU s)
    _job_cpu: dict[int, float] = field(default_factory=dict)  # pid -> CPU s seen (exited ones stay)

    def sample(self, job_procs: Callable[[], Iterable[psutil.Process]]) -> None:
        """One sample, unless the last was under SAMPLE_S ago; ``job_procs()`` lists the job's
        processes on this host (called only when a sample is taken)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < SAMPLE_S:
            return
        for proc in job_procs():
            try:
                times = proc.cpu_times()
                self._job_cpu[proc.pid] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        busy = _busy_cpu_s_on_usable_cores()
        job = sum(self._job_cpu.values()) + _own_cpu_s()
        self.load_max = max(self.load_max, os.getloadavg()[0])
        if self._last is not None:
            self.elapsed_s += now - self._last[0]
            self.other_cpu_s += max(0.0, (busy - self._last[1]) - (job - self._last[2]))
        self._last = (now, busy, job)

    def other_cores(self) -> float:
        """Cores the other processes used on average (0 before two samples)."""
        return self.other_cpu_s / self.elapsed_s if self.elapsed_s else 0.0


def _own_cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def machine_figures(
    sampler: LoadSampler, nproc_per_node: int, threads_per_rank: int, thread_warnings: list[str]
) -> dict:
    """This host's record for nodes/node_<n>.json: cores, ranks, threads, load and warnings."""
    warnings = list(thread_warnings)
    for warning in (
        oversubscription_warning(nproc_per_node, threads_per_rank, sampler.cores),
        busy_warning(sampler.other_cores(), sampler.load_max, sampler.cores),
    ):
        if warning:
            warnings.append(warning)
    return {
        "cores": sampler.cores,
        "ranks": nproc_per_node,
        "threads_per_rank": threads_per_rank,
        "load_1m_max": round(sampler.load_max, 2),
        "other_cores_mean": round(sampler.other_cores(), 2),
        "sampled_s": round(sampler.elapsed_s, 1),
        "warnings": warnings,
    }


def _busy_cpu_s_on_usable_cores() -> float:
    """CPU seconds spent on the cores this process may use (its affinity): inside a Slurm or
    container cpuset, other users' work on other cores is not load on this job's cores."""
    try:
        cores = os.sched_getaffinity(0)
    except AttributeError:  # no affinity on this platform: every core
        cores = None
    per_core = psutil.cpu_times(percpu=True)
    return sum(
        times.user
        + times.system
        + getattr(times, "nice", 0.0)
        + getattr(times, "irq", 0.0)
        + getattr(times, "softirq", 0.0)
        for index, times in enumerate(per_core)
        if cores is None or index in cores
    )
