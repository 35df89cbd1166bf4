"""Per-rank measurements and the job-level summary (DESIGN.md §8).

One :class:`MetricsCollector` lives in each rank. It times the initialisation phases and
the measured steps, reads the memory figures once at the end, and turns all of that into
the rank record of docs/architecture.md. :func:`gather_records` brings every rank's
record to rank 0, and :func:`summarize` turns the records into the job's comparison
metrics (balance, throughput, TFLOP/s, MFU). Metrics measure; they never drive the work.

Timing rule: a phase or a step ends with exactly one device synchronisation, so the time
covers the work the host queued inside it; the collector adds no other. (The S2V forward
itself reads its token-frame table on the host once per forward.)
On the CPU every GPU figure is None (absent), never 0.
"""
from __future__ import annotations

import os
import resource
import socket
import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from wan_exp.metrics.comm import CommCounter, totals
from wan_exp.metrics.flops import mfu, peak_flops

GIB = 1024**3
INIT_PHASES = ("process_group", "build", "load", "wrap", "first_step")
# the generate workload's stages, in pipeline order (MetricsCollector.stage)
PIPELINE_STAGES = ("text_encode", "audio_encode", "reference_encode", "motion_encode", "denoise",
                   "vae_decode", "video_write")
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
        # collectives per kind; counting while the worker holds it entered (`with comm:`)
        self.comm = CommCounter()
        self.stages: dict[str, dict[str, Any]] = {}
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
        start = time.perf_counter()
        yield
        self._sync()
        elapsed = time.perf_counter() - start
        entry = self.stages.setdefault(name, {"seconds": 0.0, "count": 0, "peak_allocated_gib": None,
                                              "peak_reserved_gib": None, "peak_host_rss_gib": None})
        entry["seconds"] += elapsed
        entry["count"] += 1
        for key, value in self._current_peaks().items():
            if value is not None:
                entry[key] = max(entry[key] or 0.0, value)
                self._folded_peaks[key] = max(self._folded_peaks.get(key, 0.0), value)
        self._sample_nvml()

    def _current_peaks(self) -> dict[str, Optional[float]]:
        on_cuda = self.device.type == "cuda"
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB if on_cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB if on_cuda else None,
            "peak_host_rss_gib": _host_peak_bytes() / GIB,
        }

    def _reset_peaks(self) -> None:
        """Keep the peaks so far (for memory()'s job-wide figures), then reset the counters."""
        for key, value in self._current_peaks().items():
            if value is not None:
                self._folded_peaks[key] = max(self._folded_peaks.get(key, 0.0), value)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
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
        current["peak_host_rss_gib"] = max(current["peak_host_rss_gib"],
                                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB)
        # job-wide: the counters now, and what stages saw before they reset them
        peaks = {k: None if v is None else max(v, self._folded_peaks.get(k, 0.0)) for k, v in current.items()}
        mem: dict[str, Optional[float]] = {
            "peak_allocated_gib": peaks["peak_allocated_gib"],
            "peak_reserved_gib": peaks["peak_reserved_gib"],
            "nvml_used_gib": self._nvml_peak_bytes / GIB if self._nvml_peak_bytes is not None else None,
            "alloc_retries": stats.get("num_alloc_retries") if on_cuda else None,
            "ooms": stats.get("num_ooms") if on_cuda else None,
            "peak_host_rss_gib": peaks["peak_host_rss_gib"],
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


def gather_records(record: dict) -> Optional[list[dict]]:
    """Every rank's record on rank 0 (sorted by rank), None on the other ranks.

    Works on gloo and nccl; for nccl the current CUDA device must be this rank's device
    (object collectives stage through it), so it is set here from the record.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [record]
    if dist.get_backend() == "nccl" and record["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(record["device"]))
    is_root = dist.get_rank() == 0
    gathered: Optional[list] = [None] * dist.get_world_size() if is_root else None
    dist.gather_object(record, gathered, dst=0)
    if not is_root:
        return None
    return sorted(gathered, key=lambda r: r["rank"])


# ---------------------------------------------------------------------------- job level
def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def job_step_times(records: list[dict]) -> list[float]:
    """The job's time of each measured step: the slowest rank's (ranks wait for each
    other in collectives), over the steps every rank measured."""
    n_steps = min((len(r.get("step_times_s", [])) for r in records), default=0)
    return [max(r["step_times_s"][i] for r in records) for i in range(n_steps)]


def summarize(records: list[dict], config: Any) -> dict:
    """Job-level metrics from the rank records (docs/architecture.md, DESIGN.md §8).

    - balance: max/min of peak reserved memory over ranks, and rank 0 over the median of
      the other ranks (the "GPU 0 overloaded" symptom); on CPU, peak host RSS stands in
      and ``balance_basis`` says which was used.
    - time: init phases as the max over ranks (the slowest rank gates the job); a step's
      time is the max over ranks, then median/min/max over the measured steps.
    - throughput from the median step: steps/s, tokens/s, video seconds per second,
      TFLOP/s per GPU, and MFU against the device's dense peak for ``model.dtype``.
    - communication: calls, bytes and bus bytes per measured step and for initialisation,
      of the rank that moves the most (rank records hold every kind, metrics/comm.py).
    """
    if not records:
        return {"ranks_reported": 0}
    records = sorted(records, key=lambda r: r["rank"])
    world_size = records[0]["world_size"]
    rank0 = records[0]

    reserved = [r["memory"].get("peak_reserved_gib") for r in records]
    basis = "peak_reserved_gib"
    if any(v is None for v in reserved):
        reserved = [r["memory"].get("peak_host_rss_gib") for r in records]
        basis = "peak_host_rss_gib"
    others = reserved[1:]
    rank0_over_median = _ratio(reserved[0], statistics.median(others)) if others else None

    def column_max(key: str) -> Optional[float]:
        values = [r["memory"].get(key) for r in records if r["memory"].get(key) is not None]
        return max(values) if values else None

    def column_sum(key: str) -> Optional[float]:
        values = [r["memory"].get(key) for r in records if r["memory"].get(key) is not None]
        return sum(values) if values else None

    phases: dict[str, float] = {}
    for r in records:
        for name, seconds in r.get("init_phases_s", {}).items():
            phases[name] = max(phases.get(name, 0.0), seconds)

    step_times = job_step_times(records)
    # per step: only where steps were measured (init has none: absent, not 0)
    comm_step = [totals(r["comm"]["per_step"]) for r in records if (r.get("comm") or {}).get("per_step") is not None]
    comm_init = [totals((r.get("comm") or {}).get("init")) for r in records]

    def comm_max(figures: list[dict], key: str) -> Optional[float]:
        return max(f[key] for f in figures) if figures else None
    step_median = statistics.median(step_times) if step_times else None

    work = rank0.get("workload", {})
    tokens_per_step = (
        work["tokens_per_forward"] * work.get("forwards_per_step", 1)
        if work.get("tokens_per_forward") is not None
        else None
    )
    flops_per_step = work.get("flops_per_step")
    dtype = str((config.get("model") or {}).get("dtype", "bf16"))  # a dict or a DictConfig
    peak = peak_flops(rank0["device_name"], dtype)

    return {
        "ranks_reported": len(records),
        "world_size": world_size,
        "device_name": rank0["device_name"],
        "peak_allocated_gib_max": column_max("peak_allocated_gib"),
        "peak_reserved_gib_max": column_max("peak_reserved_gib"),
        "peak_reserved_gib_min": min(reserved) if basis == "peak_reserved_gib" else None,
        "nvml_used_gib_max": column_max("nvml_used_gib"),
        "peak_host_rss_gib_max": column_max("peak_host_rss_gib"),
        "alloc_retries": column_sum("alloc_retries"),
        "ooms": column_sum("ooms"),
        "balance_basis": basis,
        "balance_max_over_min": _ratio(max(reserved), min(reserved)),
        "balance_rank0_over_median": rank0_over_median,
        "init_phases_s": phases,
        "init_s": sum(phases.values()) if phases else None,
        "measured_steps": len(step_times),
        "step_time_s_median": step_median,
        "step_time_s_min": min(step_times) if step_times else None,
        "step_time_s_max": max(step_times) if step_times else None,
        "steps_per_s": _ratio(1.0, step_median),
        "tokens_per_s": _ratio(tokens_per_step, step_median),
        "video_s_per_s": _ratio(work.get("video_seconds_per_step"), step_median),
        "flops_per_step": flops_per_step,
        "tflops_per_gpu": _ratio(flops_per_step, step_median * world_size * 1e12) if step_median else None,
        "peak_flops_per_gpu": peak,
        "mfu": mfu(flops_per_step or 0.0, step_median or 0.0, world_size, peak),
        "attention_backend": rank0.get("attention_backend"),
        "attention_lse_backend": rank0.get("attention_lse_backend"),
        "parallel_dims": rank0.get("parallel_dims"),
        # communication: the busiest rank's collectives (metrics/comm.py defines bytes)
        "comm_step_calls_max": comm_max(comm_step, "count"),
        "comm_step_bytes_max": comm_max(comm_step, "bytes"),
        "comm_step_bus_bytes_max": comm_max(comm_step, "bus_bytes"),
        "comm_init_calls_max": comm_max(comm_init, "count"),
        "comm_init_bytes_max": comm_max(comm_init, "bytes"),
        **stage_summary(records),
    }


STAGE_PEAKS = ("peak_allocated_gib", "peak_reserved_gib", "peak_host_rss_gib")


def stage_summary(records: list[dict]) -> dict:
    """Per-stage figures of the job (empty when no rank timed stages): each stage's seconds and
    peaks as the max over ranks (the slowest rank gates the job; the fullest one fails first),
    and the figures people quote: seconds per clip and per second of video (all stages
    together), and the DiT's share of that time (the ``denoise`` stage)."""
    names: list[str] = []
    for r in records:
        names += [n for n in r.get("stages", {}) if n not in names]
    if not names:
        return {}

    def over_ranks(name: str, key: str) -> Optional[float]:
        values = [r["stages"][name][key] for r in records
                  if name in r.get("stages", {}) and r["stages"][name].get(key) is not None]
        return max(values) if values else None

    seconds = {n: over_ranks(n, "seconds") for n in names}
    total = sum(v for v in seconds.values() if v is not None)
    work = records[0].get("workload", {})
    out: dict[str, Any] = {"stages_s": seconds, "pipeline_s": total}
    for key in STAGE_PEAKS:
        out[f"stage_{key}"] = {n: over_ranks(n, key) for n in names}
    out["seconds_per_clip"] = _ratio(total, work.get("clips"))
    out["seconds_per_video_second"] = _ratio(total, work.get("video_seconds"))
    out["dit_share"] = _ratio(seconds.get("denoise"), total)
    return out
