"""The doctor's GPU rows: NVML's GPUs (wan_exp.devices), marked by which ones this
environment's ranks will see, the driver against torch's CUDA, and CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

from typing import Mapping

from wan_exp.devices import HIDE_ALL, Gpu, NvmlView, visible_gpus
from wan_exp.doctor.rows import FAIL, OK, WARN, Row
from wan_exp.units import GIB

# More memory than this in use before a run means another process holds the GPU.
BUSY_FRACTION = 0.10


def gpu_rows(
    nvml: NvmlView, env: Mapping[str, str], torch_cuda: str | None, required_gpus: int
) -> tuple[list[Row], list[Gpu]]:
    """Rows for the GPUs, the driver and CUDA_VISIBLE_DEVICES; also the visible GPUs."""
    if not nvml.gpus:
        why = nvml.error or "NVML reports 0 GPUs"
        if required_gpus:
            return [
                Row("GPUs", FAIL, f"none: {why}", f"--gpus {required_gpus} asked for GPUs; this machine has none")
            ], []
        return [Row("GPUs", OK, f"none: {why}", "CPU only: runs use gloo on the CPU (model=tiny is sized for it)")], []

    cvd = env.get("CUDA_VISIBLE_DEVICES")
    visible, bad_entry = visible_gpus(nvml.gpus, cvd)
    rows = [gpu_row(gpu, gpu in visible) for gpu in nvml.gpus]
    if cvd is not None:
        if bad_entry in HIDE_ALL and not visible:
            rows.append(
                Row(
                    "CUDA_VISIBLE_DEVICES",
                    OK,
                    f"{cvd!r}: all {len(nvml.gpus)} GPUs hidden",
                    "runs use the CPU; unset it to use the GPUs",
                )
            )
        elif bad_entry is not None:
            rows.append(
                Row(
                    "CUDA_VISIBLE_DEVICES",
                    FAIL,
                    f"{cvd!r}: {bad_entry!r} names no GPU (or repeats one)",
                    f"CUDA drops that entry and every one after it, leaving {len(visible)} GPU(s); "
                    f"use indices 0..{len(nvml.gpus) - 1} or GPU UUIDs",
                )
            )
        else:
            rows.append(Row("CUDA_VISIBLE_DEVICES", OK, f"{cvd!r}: {len(visible)} of {len(nvml.gpus)} GPUs visible"))
    rows.append(driver_row(nvml.driver_cuda, torch_cuda))
    if required_gpus > len(visible):
        rows.append(
            Row(
                "requested GPUs",
                FAIL,
                f"--gpus {required_gpus}, {len(visible)} visible",
                "lower launcher.nproc_per_node or free/unhide GPUs",
            )
        )
    return rows, visible


def gpu_row(gpu: Gpu, visible: bool) -> Row:
    used, total = gpu.used_bytes / GIB, gpu.total_bytes / GIB
    busy = "?" if gpu.utilisation_pct is None else gpu.utilisation_pct
    value = f"{gpu.name}, {used:.1f}/{total:.1f} GiB used, {busy}% busy"
    if not visible:
        return Row(f"GPU {gpu.index}", OK, value + " (hidden by CUDA_VISIBLE_DEVICES)")
    if gpu.process_pids or gpu.used_bytes > BUSY_FRACTION * gpu.total_bytes:
        pids = ", ".join(map(str, gpu.process_pids)) or "not visible from here"
        return Row(
            f"GPU {gpu.index}",
            WARN,
            value,
            f"other processes hold this GPU (PIDs {pids}): a rank here gets less memory, "
            "which shows as one GPU fuller than the rest; end them or hide the GPU",
        )
    return Row(f"GPU {gpu.index}", OK, value)


def driver_row(driver_cuda: str | None, torch_cuda: str | None) -> Row:
    value = f"supports CUDA {driver_cuda}"
    if torch_cuda is None:
        return Row(
            "NVIDIA driver",
            WARN,
            value + "; torch is a CPU build",
            "the GPUs stay unused: install the torch build for this CUDA version",
        )
    driver, built = _major_minor(driver_cuda), _major_minor(torch_cuda)
    if built[0] > driver[0]:
        return Row(
            "NVIDIA driver",
            FAIL,
            value + f"; torch needs CUDA {torch_cuda}",
            "CUDA initialisation will fail: update the driver or install a torch built for "
            f"CUDA {driver_cuda} or older",
        )
    if built > driver:
        return Row(
            "NVIDIA driver",
            WARN,
            value + f"; torch built for CUDA {torch_cuda}",
            "runs through CUDA minor-version compatibility; kernels that JIT-compile PTX may fail",
        )
    return Row("NVIDIA driver", OK, value + f"; torch built for CUDA {torch_cuda}")


def _major_minor(version: str | None) -> tuple[int, int]:
    major, minor = (str(version).split(".") + ["0"])[:2]
    return int(major), int(minor)
