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


GIB = 1024**3
INIT_PHASES = ("process_group", "build", "load", "wrap", "first_step")
# Notes that belong in the record's "memory" block rather than at its top level.
_MEMORY_NOTES = ("param_gib",)


class MetricsCollector:
    """Times phases and steps of one rank and produces its rank record."""

    def __init__(self, device: torch.device | str, rank: int, world_size: int) -> None:
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.init_phases_s: dict[str, float] = {}
        self.other_phases_s: dict[str, float] = {}
        self.step_times_s: list[float] = []
        self.warmup_steps = 0
        self.workload: dict[str, Any] = {}
        self.notes: dict[str, Any] = {}
        self._nvml_peak_bytes: Optional[int] = None
        self._nvml_handle = _nvml_handle(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ timing
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase (init phases are listed in INIT_PHASES; a name met twice adds up)."""
        start = time.perf_counter()
        yield
        self._sync()
        elapsed = time.perf_counter() - start
        target = self.init_phases_s if name in INIT_PHASES else self.other_phases_s
        target[name] = target.get(name, 0.0) + elapsed
        self._sample_nvml()

    @contextmanager
    def step(self, measured: bool = True) -> Iterator[None]:
        """Time one step. Warm-up steps (measured=False) are counted but not timed into
        the record. The step begins where the previous one ended its synchronisation."""
        start = time.perf_counter()
        yield
        self._sync()
        if measured:
            self.step_times_s.append(time.perf_counter() - start)
        else:
            self.warmup_steps += 1

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
        mem: dict[str, Optional[float]] = {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB if on_cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB if on_cuda else None,
            "nvml_used_gib": self._nvml_peak_bytes / GIB if self._nvml_peak_bytes is not None else None,
            "alloc_retries": stats.get("num_alloc_retries") if on_cuda else None,
            "ooms": stats.get("num_ooms") if on_cuda else None,
            # ru_maxrss is in KiB on Linux
            "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
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
        }
        record.update({k: v for k, v in self.notes.items() if k not in _MEMORY_NOTES})
        return record


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
