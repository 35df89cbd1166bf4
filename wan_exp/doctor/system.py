"""The shared-memory filesystem NCCL uses between ranks of one machine; the CPU cores, the
thread settings and the load other processes put on them (wan_exp.host.machine)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from wan_exp.doctor.rows import OK, WARN, Row
from wan_exp.host.machine import BUSY_SHARE, THREAD_VARIABLES, positive_int, usable_cores
from wan_exp.units import GIB

SHM_PATH = "/dev/shm"
MIN_SHM_BYTES = 1 * GIB


def shm_rows(env: Mapping[str, str], shm_path: str = SHM_PATH) -> list[Row]:
    try:
        stat = os.statvfs(shm_path)
    except OSError as exc:
        return [
            Row(
                shm_path,
                WARN,
                f"cannot be read ({exc.strerror})",
                "NCCL's shared-memory transport needs it; set NCCL_SHM_DISABLE=1 (nccl=container)",
            )
        ]
    size = stat.f_blocks * stat.f_frsize
    value = f"{size / GIB:.2f} GiB ({stat.f_bavail * stat.f_frsize / GIB:.2f} GiB free)"
    if size >= MIN_SHM_BYTES:
        return [Row(shm_path, OK, value)]
    if env.get("NCCL_SHM_DISABLE") == "1":
        return [Row(shm_path, OK, value, "small, but NCCL_SHM_DISABLE=1 keeps NCCL off it")]
    return [
        Row(
            shm_path,
            WARN,
            value,
            "under 1 GiB (Docker's default is 64 MB): multi-GPU NCCL fails to extend it; run the "
            "container with --shm-size=16g or --ipc=host, or use nccl=container (NCCL_SHM_DISABLE=1)",
        )
    ]


def machine_rows(env: Mapping[str, str], cores: int | None = None, load_1m: float | None = None) -> list[Row]:
    """The cores this process may use, OMP_NUM_THREADS / MKL_NUM_THREADS, and the 1-minute load
    average (no job of ours runs under the doctor, so the load is other processes')."""
    cores = usable_cores() if cores is None else cores
    load_1m = os.getloadavg()[0] if load_1m is None else load_1m
    rows = [
        Row(
            "CPU cores",
            OK,
            f"{cores} usable (affinity) of {os.cpu_count()}",
            "launcher.nproc_per_node above this makes the ranks take turns on the cores (a warning in results.json)",
        )
    ]
    for name in THREAD_VARIABLES:
        value = env.get(name)
        if value is None:
            rows.append(
                Row(name, OK, "unset", "the launcher gives each rank cores / ranks" if name.startswith("OMP") else "")
            )
        elif positive_int(value) is None:
            rows.append(
                Row(
                    name,
                    WARN,
                    repr(value),
                    "not a positive integer: OpenMP ignores it and each rank takes "
                    "every core; the launcher replaces it by cores / ranks for the ranks (and warns); "
                    "set a number or unset it",
                )
            )
        elif positive_int(value) > cores:
            rows.append(Row(name, WARN, value, f"more threads than the {cores} usable cores, per rank"))
        else:
            rows.append(Row(name, OK, value))
    busy = load_1m > BUSY_SHARE * cores
    rows.append(
        Row(
            "load average (1 min)",
            WARN if busy else OK,
            f"{load_1m:.2f} on {cores} core(s)",
            "other processes are keeping the cores busy: job times will be slower and not comparable "
            "(results.json says so when it lasts through a job)"
            if busy
            else "",
        )
    )
    return rows
