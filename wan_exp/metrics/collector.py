"""Per-rank measurements (how they are counted: docs/facts.md "Metrics").

One :class:`MetricsCollector` lives in each rank. It times the initialisation phases and
the measured steps, reads the memory figures once at the end, and turns all of that into
the rank record of docs/architecture.md, which the rank writes to its own file. The job
process on the host reads every rank's file and summarises them
(:mod:`wan_exp.metrics.summary`). Metrics measure; they never drive the work.

Timing rule: a phase or a step ends with exactly one device synchronisation, so the time
covers the work the host queued inside it; the collector adds no other. (The S2V forward
itself reads its token-frame table on the host once per forward.)
On the CPU every GPU figure is None (absent), never 0.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from wan_exp.metrics.comm import CommCounter
from wan_exp.metrics.phases import INIT_PHASES
from wan_exp.metrics.summary import rank_figures
from wan_exp.metrics.tensor_memory import TensorMemory
from wan_exp.units import GIB

# Notes that belong in the record's "memory" block rather than at its top level.
_MEMORY_NOTES = ("param_gib",)


class MetricsCollector:
    """Times phases and steps of one rank and produces its rank record."""

    def __init__(self, device: torch.device | str, rank: int, world_size: int, count_cpu_tensors: bool = False) -> None:
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.init_phases_s: dict[str, float] = {}
        self.other_phases_s: dict[str, float] = {}
        self.step_times_s: list[float] = []
        self.warmup_steps = 0
        self.workload: dict[str, Any] = {}
        self.notes: dict[str, Any] = {}
        # collectives per kind; counting while the worker holds it entered (`with comm:`)
        self.comm = CommCounter()
        # the bytes of the CPU tensors the rank holds (allocator.count_cpu_tensors; the worker
        # enters it); None on a GPU, whose allocator counts its tensors itself
        self.tensors = TensorMemory() if count_cpu_tensors and self.device.type == "cpu" else None
        self.stages: dict[str, dict[str, Any]] = {}
        self._aside_s = 0.0  # seconds timed by aside(), taken out of the stages around them
        # peaks seen before a stage reset the device's / the host's peak counters
        self._folded_peaks: dict[str, float] = {}
        self._nvml_peak_bytes: Optional[int] = None
        self._nvml_handle = _nvml_handle(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ timing
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase (init phases are listed in INIT_PHASES; a name met twice adds up).
        Collectives inside count as "init" (an init phase) or "other"."""
        start = time.perf_counter()
        with self.comm.in_bucket("init" if name in INIT_PHASES else "other"):
            yield
        self._sync()
        elapsed = time.perf_counter() - start
        target = self.init_phases_s if name in INIT_PHASES else self.other_phases_s
        target[name] = target.get(name, 0.0) + elapsed
        self._sample_nvml()

    @contextmanager
    def step(self, measured: bool = True) -> Iterator[None]:
        """Time one step. Warm-up steps (measured=False) are counted but not timed into
        the record. The step begins where the previous one ended its synchronisation.
        Collectives inside count as "step" (measured) or "warmup"."""
        start = time.perf_counter()
        with self.comm.in_bucket("step" if measured else "warmup"):
            yield
        self._sync()
        if measured:
            self.step_times_s.append(time.perf_counter() - start)
        else:
            self.warmup_steps += 1

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one pipeline stage and its peak memory: device allocated and reserved (the
        allocator's peak counters are reset at the stage's start) and host RSS (the kernel's
        high-water mark is reset too, where /proc allows). A name met again adds its seconds
        and keeps the larger peaks. The job-wide peaks in ``memory()`` are unaffected."""
        self._sync()
        self._reset_peaks()
        start, aside_before = time.perf_counter(), self._aside_s
        yield
        self._sync()
        elapsed = time.perf_counter() - start - (self._aside_s - aside_before)
        entry = self._stage_entry(name)
        entry["seconds"] += elapsed
        entry["count"] += 1
        for key, value in self._current_peaks().items():
            if value is not None:
                entry[key] = max(entry[key] or 0.0, value)
                self._folded_peaks[key] = max(self._folded_peaks.get(key, 0.0), value)
        self._sample_nvml()

    @contextmanager
    def aside(self, name: str) -> Iterator[None]:
        """Time work done inside a stage that is not that stage's (the drift check's reference
        forwards inside denoise): its seconds go to stage ``name`` and are taken out of every
        stage open around it. Peaks are left to the stage around it."""
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        elapsed = time.perf_counter() - start
        self._aside_s += elapsed
        entry = self._stage_entry(name)
        entry["seconds"] += elapsed
        entry["count"] += 1

    def _stage_entry(self, name: str) -> dict:
        return self.stages.setdefault(
            name,
            {
                "seconds": 0.0,
                "count": 0,
                "peak_allocated_gib": None,
                "peak_reserved_gib": None,
                "peak_host_rss_gib": None,
                "peak_tensor_gib": None,
            },
        )

    def _current_peaks(self) -> dict[str, Optional[float]]:
        on_cuda = self.device.type == "cuda"
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB if on_cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB if on_cuda else None,
            "peak_host_rss_gib": _host_peak_bytes() / GIB,
            "peak_tensor_gib": self.tensors.peak_bytes / GIB if self.tensors is not None else None,
        }

    def _reset_peaks(self) -> None:
        """Keep the peaks so far (for memory()'s job-wide figures), then reset the counters."""
        for key, value in self._current_peaks().items():
            if value is not None:
                self._folded_peaks[key] = max(self._folded_peaks.get(key, 0.0), value)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.tensors is not None:
            self.tensors.reset_peak()
        _reset_host_peak()

    # ------------------------------------------------------------------ facts from the rank
    def set_workload_info(self, **info: Any) -> None:
        """tokens_per_forward, forwards_per_step, flops_per_step (the whole job's FLOPs for
        one step, the full sequence counted once), video_seconds_per_step, ..."""
        self.workload.update(info)

    def note(self, key: str, value: Any) -> None:
        """Record one fact about this rank, e.g. attention_backend or param_gib."""
        self.notes[key] = value

    # ------------------------------------------------------------------ memory
    def _sample_nvml(self) -> None:
        """NVML's used memory of this rank's device (includes the CUDA context and NCCL
        buffers); a host-side driver query, no device synchronisation."""
        if self._nvml_handle is None:
            return
        import pynvml

        used = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used
        self._nvml_peak_bytes = max(self._nvml_peak_bytes or 0, used)

    def memory(self) -> dict[str, Optional[float]]:
        on_cuda = self.device.type == "cuda"
        stats = torch.cuda.memory_stats(self.device) if on_cuda else {}
        self._sample_nvml()
        current = self._current_peaks()
        # ru_maxrss is in KiB on Linux
        current["peak_host_rss_gib"] = max(
            current["peak_host_rss_gib"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        )
        # job-wide: the counters now, and what stages saw before they reset them
        peaks = {k: None if v is None else max(v, self._folded_peaks.get(k, 0.0)) for k, v in current.items()}
        mem: dict[str, Optional[float]] = {
            "peak_allocated_gib": peaks["peak_allocated_gib"],
            "peak_reserved_gib": peaks["peak_reserved_gib"],
            "nvml_used_gib": self._nvml_peak_bytes / GIB if self._nvml_peak_bytes is not None else None,
            "alloc_retries": stats.get("num_alloc_retries") if on_cuda else None,
            "ooms": stats.get("num_ooms") if on_cuda else None,
            "peak_host_rss_gib": peaks["peak_host_rss_gib"],
            "peak_tensor_gib": peaks["peak_tensor_gib"],
        }
        for key in _MEMORY_NOTES:
            mem[key] = self.notes.get(key)
        return mem

    def allocator_settings(self) -> Optional[dict]:
        """The caching allocator's settings actually in force (read back, not the env)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory._snapshot().get("allocator_settings")

    # ------------------------------------------------------------------ record
    def rank_record(self) -> dict:
        """This rank's record (docs/architecture.md), without status/error."""
        local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        record = {
            "rank": self.rank,
            "local_rank": local_rank,
            "world_size": self.world_size,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.device),
            "device_name": device_name,
            "init_phases_s": {k: self.init_phases_s[k] for k in INIT_PHASES if k in self.init_phases_s},
            "other_phases_s": dict(self.other_phases_s),
            "warmup_steps": self.warmup_steps,
            "step_times_s": list(self.step_times_s),
            "memory": self.memory(),
            "allocator_settings": self.allocator_settings(),
            "workload": dict(self.workload),
            "comm": self.comm.record(len(self.step_times_s)),
            "stages": {name: dict(entry) for name, entry in self.stages.items()},
        }
        # derived once, here: every reader takes these fields (metrics/summary.py)
        record.update(rank_figures(record["step_times_s"], record["init_phases_s"], record["comm"]))
        record.update({k: v for k, v in self.notes.items() if k not in _MEMORY_NOTES})
        return record


def _host_peak_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM), else its current RSS."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def _reset_host_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); a no-op elsewhere,
    where a stage's host figure is then the process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _nvml_handle(device: torch.device) -> Any:
    """NVML handle of the GPU behind a torch device, matched by UUID (torch's device index
    is relative to CUDA_VISIBLE_DEVICES, NVML's is not). None if NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:  # no driver library, or no UUID support: NVML figures stay absent
        return None


# job-level figures (summarize, job_step_times) live in wan_exp.metrics.summary, which needs no torch
