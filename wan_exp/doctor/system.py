"""The shared-memory filesystem NCCL uses between ranks of one machine."""
from __future__ import annotations

import os
from typing import Mapping

from wan_exp.doctor.rows import OK, WARN, Row
from wan_exp.units import GIB

SHM_PATH = "/dev/shm"
MIN_SHM_BYTES = 1 * GIB


def shm_rows(env: Mapping[str, str], shm_path: str = SHM_PATH) -> list[Row]:
    try:
        stat = os.statvfs(shm_path)
    except OSError as exc:
        return [Row(shm_path, WARN, f"cannot be read ({exc.strerror})",
                    "NCCL's shared-memory transport needs it; set NCCL_SHM_DISABLE=1 (nccl=container)")]
    size = stat.f_blocks * stat.f_frsize
    value = f"{size / GIB:.2f} GiB ({stat.f_bavail * stat.f_frsize / GIB:.2f} GiB free)"
    if size >= MIN_SHM_BYTES:
        return [Row(shm_path, OK, value)]
    if env.get("NCCL_SHM_DISABLE") == "1":
        return [Row(shm_path, OK, value, "small, but NCCL_SHM_DISABLE=1 keeps NCCL off it")]
    return [Row(shm_path, WARN, value,
                "under 1 GiB (Docker's default is 64 MB): multi-GPU NCCL fails to extend it; run the "
                "container with --shm-size=16g or --ipc=host, or use nccl=container (NCCL_SHM_DISABLE=1)")]
