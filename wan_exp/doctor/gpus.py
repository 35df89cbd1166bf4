"""GPUs as NVML sees them (nvidia-ml-py), without initialising CUDA in this process.

NVML lists every physical GPU whatever CUDA_VISIBLE_DEVICES says, so the rows mark which
ones this environment's ranks will see. :func:`visible_gpus` is the one rule for which
GPUs CUDA exposes: the doctor's rows, its ``--gpus N`` check and the job's rank count
(:func:`visible_gpu_count`, used by wan_exp.job and the batch check) all go through it.
No torch import: the job process on the host uses this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import os
from typing import Mapping, Optional

from wan_exp.doctor.rows import FAIL, OK, WARN, Row

GIB = 1024**3
# CUDA_VISIBLE_DEVICES values that hide every GPU on purpose.
HIDE_ALL = ("", "-1")
# More memory than this in use before a run means another process holds the GPU.
BUSY_FRACTION = 0.10


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str
    used_bytes: int
    total_bytes: int
    utilisation_pct: int | None  # None where NVML cannot say (MIG slices)
    process_pids: list[int] = field(default_factory=list)


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
            gpus.append(Gpu(
                index=index,
                name=pynvml.nvmlDeviceGetName(handle),
                uuid=pynvml.nvmlDeviceGetUUID(handle),
                used_bytes=memory.used,
                total_bytes=memory.total,
                utilisation_pct=_unless_unsupported(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                process_pids=[p.pid for p in _unless_unsupported(
                    lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []],
            ))
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


def gpu_rows(nvml: NvmlView, env: Mapping[str, str], torch_cuda: str | None,
             required_gpus: int) -> tuple[list[Row], list[Gpu]]:
    """Rows for the GPUs, the driver and CUDA_VISIBLE_DEVICES; also the visible GPUs."""
    if not nvml.gpus:
        why = nvml.error or "NVML reports 0 GPUs"
        if required_gpus:
            return [Row("GPUs", FAIL, f"none: {why}", f"--gpus {required_gpus} asked for GPUs; this machine has none")], []
        return [Row("GPUs", OK, f"none: {why}", "CPU only: runs use gloo on the CPU (model=tiny is sized for it)")], []

    cvd = env.get("CUDA_VISIBLE_DEVICES")
    visible, bad_entry = visible_gpus(nvml.gpus, cvd)
    rows = [gpu_row(gpu, gpu in visible) for gpu in nvml.gpus]
    if cvd is not None:
        if bad_entry in HIDE_ALL and not visible:
            rows.append(Row("CUDA_VISIBLE_DEVICES", OK, f"{cvd!r}: all {len(nvml.gpus)} GPUs hidden",
                            "runs use the CPU; unset it to use the GPUs"))
        elif bad_entry is not None:
            rows.append(Row("CUDA_VISIBLE_DEVICES", FAIL, f"{cvd!r}: {bad_entry!r} names no GPU (or repeats one)",
                            f"CUDA drops that entry and every one after it, leaving {len(visible)} GPU(s); "
                            f"use indices 0..{len(nvml.gpus) - 1} or GPU UUIDs"))
        else:
            rows.append(Row("CUDA_VISIBLE_DEVICES", OK, f"{cvd!r}: {len(visible)} of {len(nvml.gpus)} GPUs visible"))
    rows.append(driver_row(nvml.driver_cuda, torch_cuda))
    if required_gpus > len(visible):
        rows.append(Row("requested GPUs", FAIL, f"--gpus {required_gpus}, {len(visible)} visible",
                        "lower launcher.nproc_per_node or free/unhide GPUs"))
    return rows, visible


def gpu_row(gpu: Gpu, visible: bool) -> Row:
    used, total = gpu.used_bytes / GIB, gpu.total_bytes / GIB
    value = f"{gpu.name}, {used:.1f}/{total:.1f} GiB used, {'?' if gpu.utilisation_pct is None else gpu.utilisation_pct}% busy"
    if not visible:
        return Row(f"GPU {gpu.index}", OK, value + " (hidden by CUDA_VISIBLE_DEVICES)")
    if gpu.process_pids or gpu.used_bytes > BUSY_FRACTION * gpu.total_bytes:
        pids = ", ".join(map(str, gpu.process_pids)) or "not visible from here"
        return Row(f"GPU {gpu.index}", WARN, value,
                   f"other processes hold this GPU (PIDs {pids}): a rank here gets less memory, "
                   "which shows as one GPU fuller than the rest; end them or hide the GPU")
    return Row(f"GPU {gpu.index}", OK, value)


def driver_row(driver_cuda: str | None, torch_cuda: str | None) -> Row:
    value = f"supports CUDA {driver_cuda}"
    if torch_cuda is None:
        return Row("NVIDIA driver", WARN, value + "; torch is a CPU build",
                   "the GPUs stay unused: install the torch build for this CUDA version")
    driver, built = _major_minor(driver_cuda), _major_minor(torch_cuda)
    if built[0] > driver[0]:
        return Row("NVIDIA driver", FAIL, value + f"; torch needs CUDA {torch_cuda}",
                   "CUDA initialisation will fail: update the driver or install a torch built for "
                   f"CUDA {driver_cuda} or older")
    if built > driver:
        return Row("NVIDIA driver", WARN, value + f"; torch built for CUDA {torch_cuda}",
                   "runs through CUDA minor-version compatibility; kernels that JIT-compile PTX may fail")
    return Row("NVIDIA driver", OK, value + f"; torch built for CUDA {torch_cuda}")


def _major_minor(version: str | None) -> tuple[int, int]:
    major, minor = (str(version).split(".") + ["0"])[:2]
    return int(major), int(minor)
