"""The machine's GPUs as NVML sees them (nvidia-ml-py), without initialising CUDA.

NVML lists every physical GPU whatever CUDA_VISIBLE_DEVICES says. :func:`visible_gpus` is
the one rule for which GPUs CUDA exposes: the job's rank count (:func:`visible_gpu_count`,
used by wan_exp.host.job, the batch check and the plan), the memory check before launch and
the doctor's rows all go through it. No torch import: the job process on the host uses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

# CUDA_VISIBLE_DEVICES values that hide every GPU on purpose.
HIDE_ALL = ("", "-1")


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str
    used_bytes: int
    total_bytes: int
    utilisation_pct: int | None  # None where NVML cannot say (MIG slices)
    process_pids: list[int] = field(default_factory=list)
    compute_capability: tuple[int, int] | None = None  # (major, minor); None where NVML cannot say


@dataclass
class NvmlView:
    gpus: list[Gpu]
    driver_cuda: str | None  # newest CUDA version the driver supports, e.g. "12.8"
    error: str | None = None  # why NVML could not be read (no driver, no nvidia-ml-py)


def read_nvml() -> NvmlView:
    try:
        import pynvml
    except ImportError:
        return NvmlView([], None, error="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlView([], None, error=f"no NVIDIA driver ({exc})")
    try:
        driver = pynvml.nvmlSystemGetCudaDriverVersion()
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=index,
                    name=pynvml.nvmlDeviceGetName(handle),
                    uuid=pynvml.nvmlDeviceGetUUID(handle),
                    used_bytes=memory.used,
                    total_bytes=memory.total,
                    utilisation_pct=_unless_unsupported(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    process_pids=[
                        p.pid
                        for p in _unless_unsupported(lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
                    ],
                    compute_capability=_unless_unsupported(
                        lambda: tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
                    ),
                )
            )
        return NvmlView(gpus, f"{driver // 1000}.{driver % 1000 // 10}")
    finally:
        pynvml.nvmlShutdown()


def _unless_unsupported(query):
    """NVML answers NotSupported for some queries on some devices (MIG, older boards)."""
    import pynvml

    try:
        return query()
    except pynvml.NVMLError_NotSupported:
        return None


def visible_gpus(gpus: list[Gpu], cuda_visible_devices: str | None) -> tuple[list[Gpu], str | None]:
    """The GPUs CUDA will expose, in CUDA's order, and the first entry of
    CUDA_VISIBLE_DEVICES that names no GPU (CUDA ignores it and every entry after it)."""
    if cuda_visible_devices is None:
        return list(gpus), None
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if entry.lstrip("-").isdigit():
            match = next((g for g in gpus if g.index == int(entry)), None)
        else:  # a UUID, or any unique prefix of one ("GPU-8f3a")
            found = [g for g in gpus if entry and g.uuid.startswith(entry)]
            match = found[0] if len(found) == 1 else None
        if match is None or match in chosen:
            return chosen, entry
        chosen.append(match)
    return chosen, None


def visible_gpu_count(nvml: Optional[NvmlView] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """How many GPUs a job started from this process can give its ranks: NVML's GPUs
    (read now unless given) as CUDA_VISIBLE_DEVICES in `env` (default: this process's
    environment) exposes them; 0 on a machine without an NVIDIA driver."""
    nvml = read_nvml() if nvml is None else nvml
    env = os.environ if env is None else env
    visible, _ = visible_gpus(nvml.gpus, env.get("CUDA_VISIBLE_DEVICES"))
    return len(visible)


def visible_compute_capabilities(
    nvml: NvmlView | None = None, env: Mapping[str, str] | None = None
) -> list[tuple[str, tuple[int, int] | None]]:
    """(name, (major, minor) compute capability) of each GPU a job started from this process can
    use, read through NVML (no CUDA initialisation); [] on a machine without an NVIDIA driver."""
    nvml = read_nvml() if nvml is None else nvml
    env = os.environ if env is None else env
    visible, _ = visible_gpus(nvml.gpus, env.get("CUDA_VISIBLE_DEVICES"))
    return [(gpu.name, gpu.compute_capability) for gpu in visible]


@dataclass(frozen=True)
class JobShape:
    """How many ranks one checked job gets on this machine, and where they run (decided by
    preflight.job_shape, written into job.json; precision_support reads the device and GPUs).

    ``world_size`` is the job's rank count (a simulated job: N); ``nproc_per_node`` the
    processes this host starts (a simulated job: 1)."""

    nproc_per_node: int
    world_size: int
    backend: str  # "nccl" with GPUs, "gloo" without GPUs or with shared GPUs, "fake" simulated
    device: str = "cpu"  # "cuda" or "cpu": what the ranks compute on
    gpus: int = 0  # visible GPUs the ranks take round robin
    shared_gpus: bool = False  # more ranks on this host than GPUs
    simulated_rank: int | None = None  # the rank the one process plays (simulated jobs)

    @property
    def processes(self) -> int:
        """The processes of the job on all hosts (a simulated job: 1)."""
        return 1 if self.simulated_rank is not None else self.world_size
